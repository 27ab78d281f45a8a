"""The Method interface: what a missing-modality method tells the engine.

A method owns one or more models (a U-Net; a teacher and a family of
students; one discriminator per student; a learned substitute image) and runs
one or more stages (M3AE: pretrain, then finetune). For each stage it declares

- `init_models(stage, rngs)`: the NNX modules of the stage, by name. A
  *family* (K models of one architecture, `networks.family.stack`) is one
  module whose variables have a leading axis K; `families(stage)` names them
  with their size, so the engine can split that axis along the mesh's
  "model" axis;
- `updates(stage)`: the gradient updates of one train step, applied in order,
  each with its optimiser group, the variables it trains (an NNX filter per
  model; variables outside the filters are frozen; a model no update trains
  gets no optimiser state) and its loss
  ``loss(models, batch, key, context) -> (scalar, {name: scalar}[, shared])``.
  ``shared`` (a dict of arrays) is the *step context*: what this update
  computed that a later update of the same step reads (with no gradient)
  instead of computing it again, e.g. the teacher's and students' outputs
  for the discriminator. Alternating adversarial training is two updates:
  the students', then the discriminator's. The optimiser groups are the
  updates' groups (`groups`);
- `pipeline(stage)`: what the input pipeline must draw (dropout mode, how
  many missing-modality instantiations per sample);
- `carry(stage, fresh, previous)`: how a stage starts from the previous
  stage's models (default: copy every variable whose path and shape match).

and for inference `fill(models, image, modality_mask, case)` on the
whole (padded) case before sliding windows are cut from it (M3AE reads its
substitute image here, in the frame it was trained in; `case` holds the
case's unpadded "shape" and its "box_start" in the source grid), then
`predict(models, window, modality_mask, subset)`: region probabilities
(..., 3) in `labels.REGIONS` order; `subset` is the index of the subset
being served (data, an int32 scalar: a method with one student per subset
picks that student's weights with it, `methods.students`); the method decides how missing inputs
are filled. A method whose prediction starts with work that depends on the window alone (ACDIS's
mono encoders and AFEB, Mind the Gap's teacher's per-modality latents) splits it out:
`window_features(models, window)` is that work (default None: nothing to share) and
`predict_from_features(models, features, window, modality_mask, subset)` the rest, with
``predict(m, w, mask, s) == predict_from_features(m, window_features(m, w), w, mask, s)``; the
15-subset evaluation then computes the features once per window for all subsets (such a method
keeps the default `fill`). `served_subsets()` lists the subsets a method can segment (a
dedicated method: those with a student; the others' rows are null), and
`inference_models(stage)` the models `eval` and `predict` load; `load_trained`
tells the method which stage's models it loaded (`serve`, `self.serving`: Mind the
Gap serves its teacher on all 15 subsets or its students on theirs).
Optional hooks: `setup(train_set)` sees the training cases before the first
stage (M3AE's mean-image ablation), `on_stage_end(stage, models, workdir)`
writes what a finished stage learned (M3AE's substitute image), and
`can_predict(stage)` says which stages' models segment.
The engine (`jaxbrats.engine`) does the rest: jit, sharding, optimisers,
checkpoints, logging; `jaxbrats.evaluation` scores `predict` on all 15 subsets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from jaxbrats.config import Config, OptimizerConfig, build
from jaxbrats.errors import ConfigError
from jaxbrats.modalities import SUBSETS

Models = dict[str, nnx.Module]


#: (models, batch, key, step context) -> (loss, parts) or (loss, parts, shared context)
Loss = Callable[[Models, dict, jax.Array, dict], tuple]


@dataclasses.dataclass(frozen=True)
class Update:
    group: str  # optimiser group, a key of `[stages.<stage>.optimizers]`
    trainable: dict[str, Any]  # model name -> NNX filter of the variables this update trains
    loss: Loss


class Method:
    name: str = ""
    Options: type = object  # dataclass typing the `[method]` section (besides `name`)
    stages: tuple[str, ...] = ("train",)
    #: How `eval.decoding = "auto"` turns region probabilities into labels: "threshold" (each region
    #: at `eval.threshold`) or "argmax" (of the label probabilities: RFNet's evaluation, ACDIS's).
    decoding: str = "threshold"

    def __init__(self, config: Config):
        self.config = config
        self.options = self.parse_options(config)
        self.serving = self.stages[-1]  # the stage whose models `predict` receives (`serve`)
        #: Which checkpoint `inference.trained.load_trained` read: {stage, step, checkpoint: latest|best|step}
        self.served_checkpoint: dict | None = None

    @classmethod
    def parse_options(cls, config: Config):
        return build(cls.Options, {k: v for k, v in config.method.items() if k != "name"}, "method")

    @classmethod
    def stage_length(cls, config: Config, stage: str, steps_per_epoch: int) -> int:
        stage_config = config.stages.get(stage, None)
        if stage_config is None:
            return steps_per_epoch
        return stage_config.steps if stage_config.steps > 0 else stage_config.epochs * steps_per_epoch

    def groups(self, stage: str) -> tuple[str, ...]:
        """The optimiser groups of a stage: its updates' groups, in order."""
        return tuple(dict.fromkeys(update.group for update in self.updates(stage)))

    def known_groups(self, stage: str) -> tuple[str, ...]:
        """The groups a config may set for a stage: `groups`, and those an option switches off
        (RIRN's "discriminator" with `adv = false`: its settings are kept, unused)."""
        return self.groups(stage)

    @classmethod
    def check_config(cls, config: Config) -> None:
        method = cls(config)  # parses (and so checks) the [method] options
        unknown = sorted(set(config.stages) - set(cls.stages))
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown} for method {cls.name} (its stages: {list(cls.stages)})")
        for stage, stage_config in config.stages.items():
            groups = method.known_groups(stage)
            extra = sorted(set(stage_config.optimizers) - set(groups))
            if extra:
                raise ConfigError(f"stages.{stage}.optimizers: unknown group(s) {extra} (groups: {list(groups)})")

    @staticmethod
    def refuse_coupled_clipping(
        config: Config, stage: str, group: str, why: str = "", members: str = "students"
    ) -> None:
        """Stacked members (students, their discriminators) must each train as if alone: one
        global-norm clip over the family would couple them."""
        stage_config = config.stages.get(stage)
        opt = stage_config.optimizers.get(group) if stage_config else None
        if opt is not None and opt.clip_norm > 0:
            raise ConfigError(
                f"stages.{stage}.optimizers.{group}.clip_norm must be 0{why}: one global norm over the "
                f"stacked {members} would couple them (each must train as if alone)"
            )

    def undecayed(self, stage: str, group: str) -> tuple[str, ...]:
        """Models of an optimiser group that weight decay leaves alone (Mind the Gap's P_mix weights)."""
        return ()

    def optimizer(self, stage: str, group: str) -> OptimizerConfig:
        stage_config = self.config.stages.get(stage)
        if stage_config and group in stage_config.optimizers:
            return stage_config.optimizers[group]
        return OptimizerConfig()

    # --- what each method defines -------------------------------------------------
    def init_models(self, stage: str, rngs: nnx.Rngs) -> Models:
        raise NotImplementedError

    def updates(self, stage: str) -> list[Update]:
        raise NotImplementedError

    def families(self, stage: str) -> dict[str, int]:
        """Models of the stage that are families (a leading axis of K members), by name -> K."""
        return {}

    def serve(self, stage: str) -> None:
        """`eval`/`predict` loaded the models of `stage` (Mind the Gap serves its teacher or its students)."""
        self.serving = stage

    def inference_models(self, stage: str) -> tuple[str, ...] | None:
        """The models `eval` and `predict` load (None: all of the stage's models)."""
        return None

    def served_subsets(self) -> tuple[int, ...]:
        """Indices (`modalities.SUBSETS`) of the subsets this method segments; the others' rows are null."""
        return tuple(range(len(SUBSETS)))

    def pipeline(self, stage: str) -> dict:
        """Overrides of `data.pipeline.PipelineConfig` for this stage."""
        return {"dropout": "uniform", "instantiations": 1}

    def fill(self, models: Models, image, modality_mask, case):
        """The whole case (D, H, W, 4) as `predict` should see it.

        `case` (`inference.segment.case_locator`, data): ``{"shape": the unpadded extent, "box_start":
        the case's corner in its source volume's grid}``.
        """
        return image

    def predict(self, models: Models, image, modality_mask, subset):
        """Region probabilities of `image` seen through `modality_mask`, for the subset index `subset`."""
        raise NotImplementedError

    def window_features(self, models: Models, window):
        """What `predict` computes from the window alone, the same for every subset (a pytree), or None:
        nothing to share. With features, the evaluation runs them once per window for all subsets."""
        return None

    def predict_from_features(self, models: Models, features, window, modality_mask, subset):
        """`predict` given `window_features(models, window)` (None: `predict` itself)."""
        if features is None:
            return self.predict(models, window, modality_mask, subset)
        raise NotImplementedError(f"{type(self).__name__} returns window features but no predict_from_features")

    def can_predict(self, stage: str) -> bool:
        """Whether the models of `stage` segment (M3AE's pretraining only reconstructs)."""
        return True

    def setup(self, train_set) -> None:
        """Called with the training `CacheDataset` before the first stage."""

    def on_stage_end(self, stage: str, models: dict[str, nnx.State], workdir) -> None:
        """Called when `stage` has run its last step, and again when a later run skips it as complete."""

    def start_from(self, stage: str, abstract: Callable[[], dict]) -> dict[str, nnx.State]:
        """Models a fresh stage takes from outside this run (RIRN's `teacher_from`), by name;
        `abstract()` gives the stage's models as abstract states (the shapes to restore into)."""
        return {}

    def carry(self, stage: str, fresh: dict[str, nnx.State], previous: dict[str, nnx.State]) -> dict[str, nnx.State]:
        """Start `stage` from the previous stage: variables with equal path and shape are copied."""
        out = {}
        for name, state in fresh.items():
            if name not in previous:
                out[name] = state
                continue
            old = dict(nnx.to_flat_state(previous[name]))
            flat = [
                (path, old[path] if path in old and old[path].shape == v.shape else v)
                for path, v in nnx.to_flat_state(state)
            ]
            out[name] = nnx.from_flat_state(flat)
        return out
