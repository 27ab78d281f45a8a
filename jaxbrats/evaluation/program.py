"""The 15-subset evaluation: every case scored on all 15 modality subsets by one compiled program.

For each case the program (`make_case_program`) takes the padded image,
labels and valid mask and maps over the 15 subset masks of
`modalities.SUBSET_MASKS` with `lax.map` (the mask is data, so the 15 subsets
share one trace). Each subset is segmented by `inference.segment.segment`, the
segmentation `jaxbrats predict` runs too (the method's fill, sliding windows,
decoding, optional ET post-processing), and its Dice counts per region are
computed on the device (`evaluation.metrics.dice_counts`). Every case is
padded to one bucket shape (`bucket_shape`), so the program compiles once for
the whole evaluation; the window grid is that of the case's own extent, so a
case's labels do not depend on the other cases. The label maps come back to
the host for HD95 (`evaluation.metrics.hd95_table`, scipy) and, for the chosen
subsets, NIfTI predictions in the source geometry and label convention
(`inference.nifti.write_prediction`).

A method that shares work between subsets (`Method.window_features`: ACDIS's mono encoders and
AFEB, Mind the Gap's teacher's per-modality latents) runs window-major instead
(`inference.segment.segment_subsets`): each window batch is encoded once, then every subset's
`Method.predict_from_features` runs on it, and each subset's labels equal `segment`'s.

The program runs the subsets the method serves (`Method.served_subsets`:
all 15 for a catch-all method; those with a student for a dedicated one),
each with its index passed to `Method.predict` as data, so a dedicated method
picks that subset's student inside the one compiled program. A subset not
served has null Dice and HD95 (``"served": false`` in summary.json, dashes in
the tables and the heatmap). A row scores only the cases that have all of its
modalities (the manifest's ``present``; `applicability`, a general (case,
subset) mask that callers may narrow with ``evaluate(..., applicable=...)``);
the host leaves the others out of the statistics and of HD95.

Outputs in the output directory, each written atomically (`files.write_atomic`):

- ``cases/<id>.json``: ``{"case", "present": [modalities], "subsets":
  [{"name", "applicable", "dice", "hd95"}, ... 15]}``, null Dice and HD95
  where ``"applicable": false``; with ``eval.lesion_wise`` also BraTS 2023's
  ``"lesion_dice"`` and ``"lesion_hd95"`` (`evaluation.lesion`);
- ``summary.json``, ``summary.md``, ``summary.csv`` and ``dice_heatmap.png``
  (`evaluation.reports`, which describes them);
- ``predictions/<id>[_<subset>].nii.gz`` (``full``: each case with every
  modality it has);
- with ``figures=N``, ``figures/<id>.png`` of the first N cases and the same
  images in ``tensorboard/`` (`evaluation.figures`);
- ``eval_settings.json``: the settings the numbers used (HD95 empty-mask
  convention, ET post-processing, window, decoding, bucket), how often XLA
  compiled the program and how often it was loaded from the persistent
  compilation cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from tqdm import tqdm

from jaxbrats import files
from jaxbrats.config import EvalConfig, to_dict
from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.loading import canonical_shape
from jaxbrats.data.pipeline import box_start
from jaxbrats.errors import JaxbratsError
from jaxbrats.evaluation.figures import CaseFigures
from jaxbrats.evaluation.lesion import lesion_table
from jaxbrats.evaluation.metrics import canonical_spacing, dice_counts, dice_from_counts, hd95_table
from jaxbrats.evaluation.reports import region_row, summarize, write_reports
from jaxbrats.inference.nifti import write_prediction
from jaxbrats.inference.segment import (
    case_locator,
    decoding_of,
    pad_shape,
    pad_to,
    segment,
    segment_subsets,
    shares_window_features,
)
from jaxbrats.labels import REGIONS, regions_of
from jaxbrats.modalities import FULL_SUBSET_INDEX, MODALITIES, SUBSET_MASKS, SUBSET_NAMES, SUBSETS, subset_index
from jaxbrats.runtime import compilation
from jaxbrats.runtime.sharding import OnMesh, eval_mesh


def subset_evaluator(method, graphdefs: dict, cfg: EvalConfig):
    """``(models_state, image, labels, valid, mask, subset, case) -> (Dice counts (3, 3), labels)`` for one subset."""

    def evaluate_subset(models_state, image, labels, valid, mask, subset, case=None):
        models = {n: nnx.merge(g, models_state[n]) for n, g in graphdefs.items()}
        predicted = segment(method, models, image, mask, cfg, valid, case, subset)
        return dice_counts(regions_of(predicted, xp=jnp), regions_of(labels, xp=jnp)), predicted

    return evaluate_subset


PROGRAM_NAME = "eval_15_subsets"


def make_case_program(method, graphdefs: dict, cfg: EvalConfig, subsets=None, mesh=None):
    """The jitted program over the subsets the method serves (`Method.served_subsets`, K of the
    15; all 15 for a catch-all method): (Dice counts (K, 3, 3), labels (K, D, H, W) uint8), in
    the order of `Method.served_subsets`. The subset's mask and index are data (`lax.map`), so every
    subset, and a dedicated method's choice of student, shares one trace. `subsets`: these subset
    indices instead (validation's cheaper choice); `mesh`: this mesh instead of `eval.mesh`'s
    (validation runs on the training mesh)."""
    evaluate_subset = subset_evaluator(method, graphdefs, cfg)
    served = np.asarray(method.served_subsets() if subsets is None else subsets, np.int32)
    masks, indices = jnp.asarray(SUBSET_MASKS[served]), jnp.asarray(served)

    def eval_15_subsets(models_state, image, labels, valid, case=None):
        program.traces += 1
        models = {n: nnx.merge(g, models_state[n]) for n, g in graphdefs.items()}
        if shares_window_features(method, models, cfg, image):  # window-major: each window encoded once
            predicted = segment_subsets(method, models, image, masks, indices, cfg, valid, case)
            truth = regions_of(labels, xp=jnp)
            counts = lax.map(lambda p: dice_counts(regions_of(p, xp=jnp), truth), predicted)
            return counts, predicted
        return lax.map(
            lambda m: evaluate_subset(models_state, image, labels, valid, m[0], m[1], case), (masks, indices)
        )

    # JAX reports its compilations as jit(eval_15_subsets). Under `eval.mesh` each window's depth
    # is split over "space" (the U-Net exchanges halos) and a window batch over "data".
    program = OnMesh(jax.jit(eval_15_subsets), eval_mesh(cfg) if mesh is None else mesh)
    program.traces = 0
    return program


def bucket_shape(shapes, cfg: EvalConfig) -> tuple[int, int, int]:
    """The one padded shape of an evaluation: `eval.bucket`, else `pad_shape` of the largest extent."""
    if cfg.bucket:
        return tuple(cfg.bucket)
    return pad_shape(np.max(np.asarray(shapes), axis=0), cfg)


def served_mask(method) -> np.ndarray:
    """(15,) bool: the subsets the method segments (the others' rows are null)."""
    mask = np.zeros(len(SUBSETS), bool)
    mask[list(method.served_subsets())] = True
    return mask


def applicability(manifests, applicable=None) -> np.ndarray:
    """(cases, 15) bool: whether each subset row scores each case.

    A case counts in a row only if it has every modality of the subset (the
    manifest's `present`): a case without a T2 file is not scored with a
    zero T2 channel. `applicable` ((15,) or (cases, 15) bool) removes more,
    e.g. subsets a method cannot segment.
    """
    present = np.asarray([m.get("present", [True] * len(MODALITIES)) for m in manifests], bool).reshape(
        -1, len(MODALITIES)
    )
    mask = ~(SUBSET_MASKS[None, :, :] & ~present[:, None, :]).any(axis=-1)
    if applicable is not None:
        mask = mask & np.broadcast_to(np.asarray(applicable, bool), mask.shape)
    return mask


def evaluate(
    method,
    graphdefs,
    models_state,
    dataset: CacheDataset,
    cfg: EvalConfig,
    out_dir,
    predictions: str = "full",
    progress: bool = True,
    applicable=None,
    figures: int = 0,
    step: int = 0,
    checkpoint: dict | None = None,
) -> dict:
    """Score every case of `dataset` on all 15 subsets; write the results to `out_dir`.

    Each case is padded to the one bucket and segmented by `inference.segment.segment`
    (the function `jaxbrats predict` runs too); a row scores only the cases
    `applicability` allows (the modalities a case has; `applicable`, (15,)
    or (cases, 15) bool, removes more). `predictions`: "full" writes each
    case segmented with every modality it has (the full subset when it has
    all four), "all" every applicable subset, "none" nothing. `figures`: the first
    that many cases get a figure (`evaluation.figures`: ``figures/<id>.png``, and
    the same image in ``tensorboard/`` at `step`, the evaluated run's step).
    """
    out_dir = Path(out_dir)
    (out_dir / "cases").mkdir(parents=True, exist_ok=True)
    if any(not m.get("has_label") for m in dataset.manifests):
        raise JaxbratsError(f"{dataset.cache_dir}: evaluation needs labelled cases (prepared without --no-labels)")
    views = [center_crop_view(m, cfg.center_crop) for m in dataset.manifests]  # (manifest, slices) of each case
    bucket = bucket_shape([m["cropped_shape"] for m, _ in views], cfg)
    program = make_case_program(method, graphdefs, cfg)
    compilation.watch()
    before = compilation.counts(PROGRAM_NAME)
    dice_all, hd_all, lesion_all = [], [], []
    served = np.asarray(method.served_subsets())
    allowed = applicability(
        dataset.manifests,
        served_mask(method) if applicable is None else served_mask(method) & np.asarray(applicable, bool),
    )
    shown = CaseFigures(out_dir, figures, step)  # the first `figures` cases: PNG + TensorBoard image
    for i in tqdm(range(len(dataset)), desc="eval", unit="case", disable=not progress, dynamic_ncols=True):
        manifest = views[i][0]
        shape = tuple(manifest["cropped_shape"])
        arrays, inputs = case_inputs(dataset, i, views[i], bucket)
        served_counts, served_labels = jax.device_get(program(models_state, *inputs))
        counts = np.zeros((len(SUBSETS),) + served_counts.shape[1:], served_counts.dtype)
        predicted = np.zeros((len(SUBSETS),) + shape, np.uint8)  # rows of subsets not served stay empty
        counts[served] = served_counts
        predicted[served] = served_labels[:, : shape[0], : shape[1], : shape[2]]
        dice = np.where(allowed[i][:, None], dice_from_counts(counts), np.nan)
        spacing = canonical_spacing(manifest["original_affine"])
        hd = (
            hd95_table(predicted, np.asarray(arrays["label"]), spacing, cfg.hd95_empty, allowed[i])
            if cfg.hd95
            else np.full(dice.shape, np.nan)
        )
        dice_all.append(dice)
        hd_all.append(hd)
        lesions = None  # BraTS 2023's lesion-wise (Dice, HD95), (15, 3) each
        if cfg.lesion_wise:
            lesions = lesion_table(predicted, np.asarray(arrays["label"]), spacing, allowed[i])
            lesion_all.append(lesions)
        _write_case(out_dir, manifest["case_id"], dice, hd, allowed[i], manifest, lesions)
        shown.add(i, manifest["case_id"], arrays["image"], arrays["label"], predicted, dice, allowed[i], spacing)
        for s in _prediction_subsets(predictions, manifest, allowed[i]):
            suffix = "" if predictions == "full" else f"_{SUBSET_NAMES[s]}"
            write_prediction(predicted[s], manifest, out_dir / "predictions" / f"{manifest['case_id']}{suffix}.nii.gz")
    shown.close()
    summary = summarize(
        np.asarray(dice_all).reshape(-1, len(SUBSETS), len(REGIONS)),
        np.asarray(hd_all).reshape(-1, len(SUBSETS), len(REGIONS)),
        allowed,
        lesions=np.asarray(lesion_all).reshape(-1, 2, len(SUBSETS), len(REGIONS)) if cfg.lesion_wise else None,
    )
    for row, is_served in zip(summary["subsets"], served_mask(method)):
        row["served"] = bool(is_served)  # False: the method has no model for this subset (a dedicated method's rows)
    if checkpoint is not None:
        summary["checkpoint"] = checkpoint  # which models were scored: {stage, step, checkpoint}
    write_reports(summary, out_dir, cfg)
    after = compilation.counts(PROGRAM_NAME)
    settings = {
        "eval": to_dict(cfg),
        "decoding": decoding_of(method, cfg),
        "bucket": list(bucket),
        "compilations": after["compiled"] - before["compiled"],
        "loaded_from_cache": after["loaded"] - before["loaded"],
    }
    if checkpoint is not None:  # the settings name the models they scored, as summary.json does
        settings["checkpoint"] = checkpoint
    files.write_text_atomic(out_dir / "eval_settings.json", json.dumps(settings, indent=1) + "\n")
    return summary


def case_inputs(dataset: CacheDataset, index: int, view, bucket) -> tuple[dict, tuple]:
    """(the case's image and label arrays, the program's arguments after the models: image, labels,
    valid, case locator, each padded at the end to `bucket`) of case `index` seen through `view`
    (`center_crop_view`'s (manifest, slices))."""
    manifest, slices = view
    arrays = {k: np.asarray(v[slices]) for k, v in dataset.arrays(index).items() if k in ("image", "label")}
    shape = tuple(manifest["cropped_shape"])
    if any(s > b for s, b in zip(shape, bucket)):
        raise JaxbratsError(f"case {manifest['case_id']}: shape {shape} exceeds eval.bucket {bucket}")
    image = pad_to(arrays["image"], bucket)
    labels = pad_to(arrays["label"], bucket)
    valid = pad_to(np.ones(shape, bool), bucket)
    return arrays, (image, labels, valid, case_locator(shape, box_start(manifest)))


def center_crop_view(manifest: dict, crop) -> tuple[dict, tuple[slice, ...]]:
    """(manifest, slices of the cached arrays) of a case cut to `eval.center_crop`.

    The crop is centred in the source volume's RAS+ grid (start (size - crop) // 2, the whole axis
    where the volume is smaller) and intersected with the cached brain box; the manifest's box and
    shape are narrowed to match, so predictions are written in place. Without a crop: the case."""
    whole = tuple(slice(None) for _ in range(3))
    if not crop:
        return manifest, whole
    full = np.asarray(canonical_shape(manifest["original_shape"], manifest["original_affine"]))
    start = np.maximum((full - np.asarray(crop)) // 2, 0)
    stop = start + np.minimum(np.asarray(crop), full)
    box = np.asarray(manifest["crop_box"])
    lo, hi = np.maximum(box[:, 0], start), np.minimum(box[:, 1], stop)
    if np.any(hi <= lo):
        raise JaxbratsError(
            f"case {manifest['case_id']}: its brain box {box.tolist()} lies outside eval.center_crop "
            f"{list(crop)} of its {full.tolist()} volume"
        )
    narrowed = {**manifest, "crop_box": np.stack([lo, hi], 1).tolist(), "cropped_shape": (hi - lo).tolist()}
    return narrowed, tuple(slice(int(a), int(b)) for a, b in zip(lo - box[:, 0], hi - box[:, 0]))


def _prediction_subsets(predictions: str, manifest: dict, allowed) -> list[int]:
    """ "full": the subset of the modalities the case has (what `jaxbrats predict` uses); "all": the applicable ones."""
    if predictions == "full":
        present = np.asarray(manifest.get("present", [True] * len(MODALITIES)), bool)
        own = FULL_SUBSET_INDEX if present.all() else subset_index(present)
        return [own] if allowed[own] else []
    return {"none": [], "all": [s for s in range(len(SUBSETS)) if allowed[s]]}[predictions]


def _write_case(out_dir: Path, case_id: str, dice, hd, allowed, manifest: dict, lesions=None) -> None:
    """Per case: every subset with "applicable" (false: null Dice and HD95, not in the summary);
    with `lesions` ((Dice, HD95) lesion-wise, (15, 3) each) also "lesion_dice" and "lesion_hd95"."""
    rows = [
        {
            "name": SUBSET_NAMES[s],
            "applicable": bool(allowed[s]),
            "dice": region_row(dice[s]),
            "hd95": region_row(hd[s]),
        }
        for s in range(len(SUBSETS))
    ]
    if lesions is not None:
        for s, row in enumerate(rows):
            row["lesion_dice"], row["lesion_hd95"] = region_row(lesions[0][s]), region_row(lesions[1][s])
    present = [m for m, p in zip(MODALITIES, manifest.get("present", [True] * len(MODALITIES))) if p]
    case = {"case": case_id, "present": present, "subsets": rows}
    files.write_text_atomic(out_dir / "cases" / f"{case_id}.json", json.dumps(case, indent=1) + "\n")
