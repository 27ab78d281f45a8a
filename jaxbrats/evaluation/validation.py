"""Validation during training: the val split's Dice every `train.validate_every` steps, and the best checkpoint.

The engine runs a stage's steps; it is a layer below the evaluation, so it is handed `StageValidation`
(``train(..., validator=StageValidation)``, as `jaxbrats train` does) and calls it at each step
it is `due`: every `train.validate_every` steps and at the stage's last step, for stages whose
models segment. A validation:

- runs the 15-subset program (`evaluation.program.make_case_program`: compiled once per stage,
  the train step untouched) on the training mesh over every val case, padded to one bucket; per
  case only the Dice counts come back to the host (one transfer per case, none per window);
- scores the validated subsets (`train.validate_subsets`, default: those the method serves),
  each case in a row only if it has the row's modalities (as `jaxbrats eval`), and returns the
  row the trainer logs: ``val/dice_mean``, ``val/dice_<region>`` and ``val/<subset>/<region>``;
- keeps ``checkpoints/<stage>/best`` (`runtime.checkpoints.best_manager`) when the score
  (`train.best_score`) beats the best so far, read back from that checkpoint's record, so a
  resumed run compares with the best of the steps before it.

Validation runs before the step's checkpoint is written: a run killed while validating resumes
from an earlier checkpoint and redoes the steps and this validation, with the same result.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import numpy as np

from jaxbrats.data.cache import CacheDataset
from jaxbrats.errors import ConfigError
from jaxbrats.evaluation.metrics import dice_from_counts
from jaxbrats.evaluation.program import applicability, bucket_shape, case_inputs, center_crop_view, make_case_program
from jaxbrats.labels import REGIONS
from jaxbrats.modalities import SUBSET_NAMES
from jaxbrats.runtime import checkpoints

__all__ = ["StageValidation", "validation_scores"]


def validated_subsets(method, names) -> np.ndarray:
    """Subset indices validated: `names` (`train.validate_subsets`) if the method serves them, else all it serves."""
    served = list(method.served_subsets())
    if not names:
        return np.asarray(served, np.int32)
    chosen = [SUBSET_NAMES.index(n) for n in names]
    unserved = [SUBSET_NAMES[i] for i in chosen if i not in served]
    if unserved:
        raise ConfigError(f"train.validate_subsets: {method.name} does not segment {', '.join(unserved)}")
    return np.asarray(chosen, np.int32)


def validation_scores(dice: np.ndarray, subsets) -> dict[str, float]:
    """The logged row from per-case Dice (cases, K, 3), NaN where a case does not count in a row.

    ``val/<subset>/<region>``: the mean over the row's cases; ``val/dice_<region>``: over the
    rows (those with a case); ``val/dice_mean``: over rows and regions, the default best score."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a row without a case: its mean is NaN, and says so
        rows = np.nanmean(dice, axis=0)  # (K, 3)
        regions = np.nanmean(rows, axis=0)  # (3,)
        mean = np.nanmean(rows)
    out = {f"val/{SUBSET_NAMES[s]}/{r}": float(v) for s, row in zip(subsets, rows) for r, v in zip(REGIONS, row)}
    out.update({f"val/dice_{r}": float(v) for r, v in zip(REGIONS, regions)})
    out["val/dice_mean"] = float(mean)
    return out


class StageValidation:
    """The validation of one stage of a training run (module docstring); built by the trainer."""

    def __init__(self, trainer, stage: str, graphdefs: dict):
        config, method = trainer.config, trainer.method
        self.every, self.stage, self.workdir = config.train.validate_every, stage, trainer.workdir
        val_ids = trainer.splits.get("val", [])
        if not val_ids:
            raise ConfigError(
                "train.validate_every: the run's val split is empty (set data.split_ratios with a val share, "
                "or data.val_split)"
            )
        self.dataset = CacheDataset(trainer.cache.cache_dir, val_ids)
        self.subsets = validated_subsets(method, config.train.validate_subsets)
        self.score_key = f"val/{config.train.best_score}"
        self.names = method.inference_models(stage) or tuple(graphdefs)
        mesh = trainer.mesh
        # Windows are split along the mesh's "data" axis: a window batch it divides.
        batch = -(-config.eval.window_batch // mesh.shape["data"]) * mesh.shape["data"]
        cfg = dataclasses.replace(config.eval, window_batch=batch)
        self.views = [center_crop_view(m, cfg.center_crop) for m in self.dataset.manifests]
        self.bucket = bucket_shape([m["cropped_shape"] for m, _ in self.views], cfg)
        method.serve(stage)
        self.program = make_case_program(
            method, {n: graphdefs[n] for n in self.names}, cfg, self.subsets, mesh if mesh.size > 1 else None
        )
        self.allowed = applicability(self.dataset.manifests)[:, self.subsets]  # (cases, K)
        self.manager = checkpoints.best_manager(self.workdir, stage)
        record = checkpoints.best_record(self.manager)
        self.best = None if record is None or record.get("score_key") != self.score_key else record["score"]

    def due(self, step: int, total: int) -> bool:
        return step == total or step % self.every == 0

    def __call__(self, models: dict, step: int) -> dict[str, float]:
        """Score the val cases with `models` (the train state's); keep them as the best if they are; the row."""
        dice = []
        for i in range(len(self.dataset)):
            _, inputs = case_inputs(self.dataset, i, self.views[i], self.bucket)
            counts, _ = self.program(models, *inputs)
            dice.append(np.where(self.allowed[i][:, None], dice_from_counts(jax.device_get(counts)), np.nan))
        row = validation_scores(np.asarray(dice), self.subsets)
        score = row[self.score_key]
        if np.isfinite(score) and (self.best is None or score > self.best):
            self.best = score
            record = {"score": score, "score_key": self.score_key, "stage": self.stage}
            checkpoints.save_best(self.manager, {n: models[n] for n in self.names}, step, record)
        if self.best is not None:
            row["val/best"] = float(self.best)
        return {k: v for k, v in row.items() if np.isfinite(v)}  # a row without a val case is left out
