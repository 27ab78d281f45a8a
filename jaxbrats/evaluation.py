"""Evaluation of all 15 modality subsets, one compiled program per run.

For each case the program takes the padded image, labels and valid mask and
maps over the 15 subset masks of `modalities.SUBSET_MASKS` with `lax.map`
(the mask is data, so the 15 subsets share one trace): the method's
`fill` and `predict` fill the missing modalities its own way (`fill` sees
the whole case and its unpadded extent, data too), sliding-window
inference gives region probabilities (blended as probabilities or as
logits: `eval.average`), `decode` gives labels (nested thresholds or the
argmax of the label probabilities: `eval.decoding`, by default the method's
own; optional ET post-processing), and Dice
counts per region are computed on the device. Every case is padded to one
bucket shape, so the program compiles once for the whole evaluation. The
label maps come back to the host for HD95 (scipy) and, for the chosen
subsets, NIfTI predictions in the source geometry and label convention.

One segmentation, `segment`, serves the evaluation and `jaxbrats predict`
(`predict.predict_case`): the case padded at the end, `method.fill` on the
whole padded image, sliding windows, decoding. The window grid is that of
the case's own extent (data, `inferers.sliding_window`'s `extent`), not of
the bucket, so a case's labels do not depend on the other cases of the
evaluation (whose largest sets the bucket), and `predict` of a case (padded
by `pad_shape`, a program of its own) equals its evaluation's labels for
the subset of the modalities it has, still with one compilation per
evaluation.

The program runs the subsets the method serves (`Method.served_subsets`:
all 15 for a catch-all method; those with a student for a dedicated one),
each with its index passed to `predict` as data, so a dedicated method picks
that subset's student inside the one compiled program. A subset not served
has null Dice and HD95 (``"served": false`` in summary.json, dashes in the
tables and the heatmap). A row scores only the cases that have all of its
modalities (the manifest's ``present``; `applicability`, a general (case,
subset) mask that callers may narrow with ``evaluate(..., applicable=...)``);
the host leaves the others out of the statistics and of HD95. Per case, ``cases/<id>.json`` holds ``{"case", "present":
[modalities], "subsets": [{"name", "applicable", "dice", "hd95"}, ... 15]}``
with null Dice and HD95 where ``"applicable": false``.

Outputs in the output directory: ``cases/<id>.json``; ``summary.json``
(shape below); ``summary.md`` and ``summary.csv`` (the papers' layout plus
the number of cases of each row, Dice in percent, ``-`` for a row without
an applicable case); ``dice_heatmap.png`` (rows named with their case
count, such a row grey with dashes); ``predictions/<id>[_<subset>].nii.gz``
(``full``: each case with every modality it has); with ``figures=N``,
``figures/<id>.png`` of the first N cases and the same images in
``tensorboard/`` (`jaxbrats.figures`).

``summary.json``::

    {"regions": ["WT", "TC", "ET"],
     "subsets": [{"name": "flair", "modalities": ["flair"], "cases": n, "served": true,
                  "dice": {"WT": .., "TC": .., "ET": ..}, "hd95": {...}}, ... 15 rows],
     "mean": {"rows": k, "dice": {...}, "hd95": {...}}, "cases": N}

``cases``: the cases a row scores (those with all its modalities; 0: its
values are null); ``mean``: over the ``k`` rows with at least one case;
``cases`` at the top: all cases evaluated.

``eval_settings.json`` records the settings the numbers used (HD95 empty-mask
convention, ET post-processing, window), how often XLA compiled the program
and how often it was loaded from the persistent compilation cache.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
from flax import nnx
from jax import lax
from nibabel import orientations as ornt
from tqdm import tqdm

from jaxbrats import compilation, files
from jaxbrats.config import EvalConfig, to_dict
from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.loading import canonical_shape, from_canonical
from jaxbrats.data.pipeline import box_start
from jaxbrats.errors import JaxbratsError
from jaxbrats.figures import CaseFigures
from jaxbrats.inferers import SlidingWindowConfig, sliding_window
from jaxbrats.labels import ENHANCING, NECROSIS, REGIONS, from_internal, labels_by_argmax, labels_from_regions, regions_of
from jaxbrats.metrics import dice_counts, dice_from_counts, hd95
from jaxbrats.modalities import FULL_SUBSET_INDEX, MODALITIES, SUBSET_MASKS, SUBSET_NAMES, SUBSETS, subset_index
from jaxbrats.sharding import OnMesh, eval_mesh, split_windows


def sliding_config(cfg: EvalConfig) -> SlidingWindowConfig:
    return SlidingWindowConfig(window=cfg.window, overlap=cfg.overlap, blend=cfg.blend, batch=cfg.window_batch)


def postprocess_et(labels, min_voxels: int, xp=jnp):
    """Relabel ET to necrosis when the predicted ET has fewer than `min_voxels` voxels (nnU-Net)."""
    small = xp.sum(labels == ENHANCING) < min_voxels
    return xp.where(small & (labels == ENHANCING), NECROSIS, labels).astype(labels.dtype)


def case_locator(shape, box_start) -> dict:
    """Where a (padded) case is, as data for `Method.fill`: its extent, and its corner in the source grid."""
    return {"shape": np.asarray(shape, np.int32), "box_start": np.asarray(box_start, np.int32)}


def segment(method, models, image, modality_mask, cfg: EvalConfig, valid=None, case=None, subset=None):
    """Internal labels (D, H, W) of one case (D, H, W, 4) seen through `modality_mask`: the one
    segmentation both `evaluate` (each subset) and `predict.predict_case` run. `subset` is the
    index of the subset served (data; default: the full set), passed to `method.predict`.

    `image` holds the case at its start, padded at the end with zeros to any
    shape (the evaluation's bucket; `pad_shape` for one case); `case` locates
    it (data, `case_locator`): ``{"shape": its extent in image, "box_start":
    its corner in the source grid}`` (default: all of `image`, at 0). Steps: pad
    to at least the window, `method.fill` on the whole padded image (the one
    call of it: M3AE reads x_sub into the padding too), sliding windows
    tiling [0, max(case_shape, window)) only (`inferers.sliding_window`'s
    `extent`), `decode`, labels zero outside the case (and outside
    `valid`, if given), optional ET post-processing. The labels inside the
    case do not depend on how far `image` was padded, so a case scores the
    same whatever bucket the other cases of an evaluation need.
    """
    shape = image.shape[:3]
    case = case_locator(shape, (0, 0, 0)) if case is None else case
    subset = jnp.int32(FULL_SUBSET_INDEX) if subset is None else subset
    case_shape = jnp.asarray(case["shape"], jnp.int32)
    padded = tuple(max(s, w) for s, w in zip(shape, cfg.window))
    if padded != shape:  # fill sees the padding the windows read
        image = jnp.pad(image, [(0, p - s) for p, s in zip(padded, shape)] + [(0, 0)])
    image = method.fill(models, image, modality_mask, case)

    def window_scores(x):
        probs = method.predict(models, split_windows(x), modality_mask, subset)
        return to_logits(probs) if cfg.average == "logits" else probs

    scores = sliding_window(window_scores, image, sliding_config(cfg), len(REGIONS), extent=case_shape)
    scores = scores[: shape[0], : shape[1], : shape[2]]
    probs = jax.nn.sigmoid(scores) if cfg.average == "logits" else scores
    inside = jnp.ones(shape, bool)
    for axis in range(3):
        inside = inside & (lax.broadcasted_iota(jnp.int32, shape, axis) < case_shape[axis])
    if valid is not None:
        inside = inside & valid
    labels = decode(probs, decoding_of(method, cfg), cfg.threshold)
    labels = jnp.where(inside, labels, 0).astype(jnp.uint8)
    return postprocess_et(labels, cfg.et_min_voxels) if cfg.et_postprocess else labels


LOGIT_CLIP = 1e-6  # probabilities are clipped this far from 0 and 1 before their logit (+-13.8)


def to_logits(probs):
    """The logit of each region probability (`eval.average = "logits"`)."""
    p = jnp.clip(probs.astype(jnp.float32), LOGIT_CLIP, 1.0 - LOGIT_CLIP)
    return jnp.log(p) - jnp.log1p(-p)


def decoding_of(method, cfg: EvalConfig) -> str:
    """The decoding an evaluation uses: `eval.decoding`, or the method's own for "auto"."""
    return method.decoding if cfg.decoding == "auto" else cfg.decoding


def decode(probs, decoding: str, threshold: float = 0.5):
    """Internal labels from region probabilities (..., 3): each region thresholded and nested
    (`labels.labels_from_regions`), or the argmax of the label probabilities they imply."""
    if decoding == "argmax":
        return labels_by_argmax(probs, xp=jnp)
    return labels_from_regions(probs > threshold, xp=jnp)


def subset_evaluator(method, graphdefs: dict, cfg: EvalConfig):
    """``(models_state, image, labels, valid, mask, subset, case) -> (Dice counts (3, 3), labels)`` for one subset."""

    def evaluate_subset(models_state, image, labels, valid, mask, subset, case=None):
        models = {n: nnx.merge(g, models_state[n]) for n, g in graphdefs.items()}
        predicted = segment(method, models, image, mask, cfg, valid, case, subset)
        return dice_counts(regions_of(predicted, xp=jnp), regions_of(labels, xp=jnp)), predicted

    return evaluate_subset


PROGRAM_NAME = "eval_15_subsets"


def make_case_program(method, graphdefs: dict, cfg: EvalConfig):
    """The jitted program over the subsets the method serves (`Method.served_subsets`, K of the
    15; all 15 for a catch-all method): (Dice counts (K, 3, 3), labels (K, D, H, W) uint8), in
    the order of `served_subsets`. The subset's mask and index are data (`lax.map`), so every
    subset, and a dedicated method's choice of student, shares one trace."""
    evaluate_subset = subset_evaluator(method, graphdefs, cfg)
    served = np.asarray(method.served_subsets(), np.int32)
    masks, indices = jnp.asarray(SUBSET_MASKS[served]), jnp.asarray(served)

    def eval_15_subsets(models_state, image, labels, valid, case=None):
        program.traces += 1
        return lax.map(lambda m: evaluate_subset(models_state, image, labels, valid, m[0], m[1], case), (masks, indices))

    # JAX reports its compilations as jit(eval_15_subsets). Under `eval.mesh` each window's depth
    # is split over "space" (the U-Net exchanges halos) and a window batch over "data".
    program = OnMesh(jax.jit(eval_15_subsets), eval_mesh(cfg))
    program.traces = 0
    return program


def bucket_shape(shapes, cfg: EvalConfig) -> tuple[int, int, int]:
    """The one padded shape of an evaluation: `eval.bucket`, else `pad_shape` of the largest extent."""
    if cfg.bucket:
        return tuple(cfg.bucket)
    return pad_shape(np.max(np.asarray(shapes), axis=0), cfg)


def pad_shape(shape, cfg: EvalConfig) -> tuple[int, int, int]:
    """Each axis rounded up to `eval.bucket_multiple`, at least the window (predict pads one case so)."""
    m = cfg.bucket_multiple
    return tuple(int(max(-(-int(s) // m) * m, w)) for s, w in zip(shape, cfg.window))


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
    present = np.asarray([m.get("present", [True] * len(MODALITIES)) for m in manifests], bool).reshape(-1, len(MODALITIES))
    mask = ~(SUBSET_MASKS[None, :, :] & ~present[:, None, :]).any(axis=-1)
    if applicable is not None:
        mask = mask & np.broadcast_to(np.asarray(applicable, bool), mask.shape)
    return mask


def _pad(array, shape):
    pad = [(0, t - s) for s, t in zip(array.shape[:3], shape)] + [(0, 0)] * (array.ndim - 3)
    return np.pad(array, pad)


def canonical_spacing(affine) -> tuple[float, ...]:
    """Voxel size along each RAS+ axis of a volume stored with `affine`."""
    sizes = nib.affines.voxel_sizes(np.asarray(affine))
    orientation = ornt.io_orientation(np.asarray(affine))
    spacing = [0.0] * 3
    for source_axis, (target_axis, _) in enumerate(orientation):
        spacing[int(target_axis)] = float(sizes[source_axis])
    return tuple(spacing)


def _bbox(mask, margin=1):
    """Slices around the True voxels, with a margin (HD95 is exact on such a crop)."""
    coords = np.argwhere(mask)
    lo = np.maximum(coords.min(0) - margin, 0)
    hi = np.minimum(coords.max(0) + margin + 1, mask.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def hd95_table(predicted, truth, spacing, empty: str, applicable=None) -> np.ndarray:
    """(15, 3) HD95 of each subset's label map against the truth; NaN (not computed) where not `applicable` (15,)."""
    out = np.full((len(SUBSETS), len(REGIONS)), np.nan)
    truth_regions = regions_of(truth)
    for s in range(len(SUBSETS)):
        if applicable is not None and not applicable[s]:
            continue
        pred_regions = regions_of(predicted[s])
        for r in range(len(REGIONS)):
            p, t = pred_regions[..., r], truth_regions[..., r]
            union = p | t
            if union.any():
                box = _bbox(union)
                p, t = p[box], t[box]
            out[s, r] = hd95(p, t, spacing, empty)
    return out


def write_prediction(labels: np.ndarray, manifest: dict, path: Path, header=None) -> None:
    """Write internal labels of the cached crop as a NIfTI in the source geometry and convention."""
    full = np.zeros(canonical_shape(manifest["original_shape"], manifest["original_affine"]), np.uint8)
    box = tuple(slice(lo, hi) for lo, hi in manifest["crop_box"])
    full[box] = labels
    affine = np.asarray(manifest["original_affine"])
    data = from_internal(from_canonical(full, affine), manifest["label_convention"] or "brats2023")
    write_nifti(data, affine, path, header)


def write_nifti(data: np.ndarray, affine, path: Path, header=None) -> None:
    """Atomic NIfTI write: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.ascontiguousarray(data), np.asarray(affine), header=header)
    image.set_data_dtype(np.uint8)
    image.set_sform(np.asarray(affine), code=1)
    image.set_qform(np.asarray(affine), code=1)
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    tmp = files.mkstemp(prefix=".partial-", suffix=suffix, dir=path.parent)  # the umask's mode, not 0600
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def evaluate(method, graphdefs, models_state, dataset: CacheDataset, cfg: EvalConfig, out_dir,
             predictions: str = "full", progress: bool = True, applicable=None, figures: int = 0, step: int = 0) -> dict:
    """Score every case of `dataset` on all 15 subsets; write the results to `out_dir`.

    Each case is padded to the one bucket and segmented by `segment` (the
    function `jaxbrats predict` runs too); a row scores only the cases
    `applicability` allows (the modalities a case has; `applicable`, (15,)
    or (cases, 15) bool, removes more). `predictions`: "full" writes each
    case segmented with every modality it has (the full subset when it has
    all four), "all" every applicable subset, "none" nothing. `figures`: the first
    that many cases get a figure (`jaxbrats.figures`: ``figures/<id>.png``, and
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
    dice_all, hd_all = [], []
    served = np.asarray(method.served_subsets())
    allowed = applicability(dataset.manifests, served_mask(method) if applicable is None else served_mask(method) & np.asarray(applicable, bool))
    shown = CaseFigures(out_dir, figures, step)  # the first `figures` cases: PNG + TensorBoard image
    for i in tqdm(range(len(dataset)), desc="eval", unit="case", disable=not progress, dynamic_ncols=True):
        manifest, view = views[i]
        arrays = {k: np.asarray(v[view]) for k, v in dataset.arrays(i).items() if k in ("image", "label")}
        shape = tuple(manifest["cropped_shape"])
        if any(s > b for s, b in zip(shape, bucket)):
            raise JaxbratsError(f"case {manifest['case_id']}: shape {shape} exceeds eval.bucket {bucket}")
        image = _pad(np.asarray(arrays["image"]), bucket)
        labels = _pad(np.asarray(arrays["label"]), bucket)
        valid = _pad(np.ones(shape, bool), bucket)
        case = case_locator(shape, box_start(manifest))
        served_counts, served_labels = jax.device_get(program(models_state, image, labels, valid, case))
        counts = np.zeros((len(SUBSETS),) + served_counts.shape[1:], served_counts.dtype)
        predicted = np.zeros((len(SUBSETS),) + shape, np.uint8)  # rows of subsets not served stay empty
        counts[served] = served_counts
        predicted[served] = served_labels[:, : shape[0], : shape[1], : shape[2]]
        dice = np.where(allowed[i][:, None], dice_from_counts(counts), np.nan)
        spacing = canonical_spacing(manifest["original_affine"])
        hd = hd95_table(predicted, np.asarray(arrays["label"]), spacing, cfg.hd95_empty, allowed[i]) if cfg.hd95 else np.full(dice.shape, np.nan)
        dice_all.append(dice)
        hd_all.append(hd)
        _write_case(out_dir, manifest["case_id"], dice, hd, allowed[i], manifest)
        shown.add(i, manifest["case_id"], arrays["image"], arrays["label"], predicted, dice, allowed[i], spacing)
        for s in _prediction_subsets(predictions, manifest, allowed[i]):
            suffix = "" if predictions == "full" else f"_{SUBSET_NAMES[s]}"
            write_prediction(predicted[s], manifest, out_dir / "predictions" / f"{manifest['case_id']}{suffix}.nii.gz")
    shown.close()
    summary = summarize(np.asarray(dice_all).reshape(-1, len(SUBSETS), len(REGIONS)),
                        np.asarray(hd_all).reshape(-1, len(SUBSETS), len(REGIONS)), allowed)
    for row, is_served in zip(summary["subsets"], served_mask(method)):
        row["served"] = bool(is_served)  # False: the method has no model for this subset (a dedicated method's rows)
    write_reports(summary, out_dir, cfg)
    after = compilation.counts(PROGRAM_NAME)
    settings = {"eval": to_dict(cfg), "decoding": decoding_of(method, cfg), "bucket": list(bucket),
                "compilations": after["compiled"] - before["compiled"],
                "loaded_from_cache": after["loaded"] - before["loaded"]}
    (out_dir / "eval_settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    return summary


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
        raise JaxbratsError(f"case {manifest['case_id']}: its brain box {box.tolist()} lies outside eval.center_crop "
                            f"{list(crop)} of its {full.tolist()} volume")
    narrowed = {**manifest, "crop_box": np.stack([lo, hi], 1).tolist(), "cropped_shape": (hi - lo).tolist()}
    return narrowed, tuple(slice(int(a), int(b)) for a, b in zip(lo - box[:, 0], hi - box[:, 0]))


def _prediction_subsets(predictions: str, manifest: dict, allowed) -> list[int]:
    """"full": the subset of the modalities the case has (what `jaxbrats predict` uses); "all": the applicable ones."""
    if predictions == "full":
        present = np.asarray(manifest.get("present", [True] * len(MODALITIES)), bool)
        own = FULL_SUBSET_INDEX if present.all() else subset_index(present)
        return [own] if allowed[own] else []
    return {"none": [], "all": [s for s in range(len(SUBSETS)) if allowed[s]]}[predictions]


def _row(values) -> dict:
    return {r: (None if math.isnan(v) else float(v)) for r, v in zip(REGIONS, values)}


def _write_case(out_dir: Path, case_id: str, dice, hd, allowed, manifest: dict) -> None:
    """Per case: every subset with "applicable" (false: null Dice and HD95, not in the summary)."""
    rows = [{"name": SUBSET_NAMES[s], "applicable": bool(allowed[s]), "dice": _row(dice[s]), "hd95": _row(hd[s])}
            for s in range(len(SUBSETS))]
    present = [m for m, p in zip(MODALITIES, manifest.get("present", [True] * len(MODALITIES))) if p]
    case = {"case": case_id, "present": present, "subsets": rows}
    (out_dir / "cases" / f"{case_id}.json").write_text(json.dumps(case, indent=1) + "\n")


def summarize(dice: np.ndarray, hd: np.ndarray, applicable=None) -> dict:
    """Means over the applicable cases of each subset (`applicable` (cases, 15) bool, default all),
    then over the rows that have at least one case; HD95 NaNs (convention "nan") are left out.
    A row without an applicable case has ``"cases": 0`` and null values."""
    dice, hd = np.asarray(dice, float), np.asarray(hd, float)
    allowed = np.ones(dice.shape[:2], bool) if applicable is None else np.asarray(applicable, bool)
    counts = allowed.sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN columns, rows without cases
        dice_mean = np.stack([dice[allowed[:, s], s].mean(axis=0) if counts[s] else np.full(len(REGIONS), np.nan)
                              for s in range(len(SUBSETS))])
        hd_mean = np.stack([np.nanmean(hd[allowed[:, s], s], axis=0) if counts[s] else np.full(len(REGIONS), np.nan)
                            for s in range(len(SUBSETS))])
        subsets = [
            {"name": SUBSET_NAMES[s], "modalities": list(SUBSETS[s]), "cases": int(counts[s]),
             "dice": _row(dice_mean[s]), "hd95": _row(hd_mean[s])}
            for s in range(len(SUBSETS))
        ]
        rows = counts > 0
        mean = {"rows": int(rows.sum()),
                "dice": _row(dice_mean[rows].mean(axis=0) if rows.any() else np.full(len(REGIONS), np.nan)),
                "hd95": _row(np.nanmean(hd_mean[rows], axis=0) if rows.any() else np.full(len(REGIONS), np.nan))}
    return {
        "regions": list(REGIONS),
        "subsets": subsets,
        "mean": mean,
        "cases": int(dice.shape[0]),
    }


NOT_APPLICABLE = "-"  # a table cell of a row without an applicable case


def _fmt(value, scale=1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.2f}"


def _cells(row: dict, key: str, scale=1.0) -> list[str]:
    if row.get("cases", 1) == 0:
        return [NOT_APPLICABLE] * len(REGIONS)
    return [_fmt(row[key][r], scale) for r in REGIONS]


def _mean_label(summary: dict) -> str:
    return f"mean of {summary['mean'].get('rows', len(SUBSETS))}/{len(SUBSETS)} rows"


def markdown_table(summary: dict, cfg: EvalConfig) -> str:
    """The papers' layout: one row per subset, a mark per modality present, the number of cases the
    row scores, Dice in percent; a row without an applicable case shows dashes."""
    head = "| " + " | ".join(m for m in MODALITIES) + " | cases | " + " | ".join(f"Dice {r}" for r in REGIONS) + " | " + " | ".join(f"HD95 {r}" for r in REGIONS) + " |"
    lines = [head, "|" + "---|" * (len(MODALITIES) + 1 + 2 * len(REGIONS))]
    for row in summary["subsets"]:
        marks = ["●" if m in row["modalities"] else "○" for m in MODALITIES]
        n = str(row.get("cases", summary["cases"]))
        lines.append("| " + " | ".join(marks) + f" | {n} | " + " | ".join(_cells(row, "dice", 100)) + " | " + " | ".join(_cells(row, "hd95")) + " |")
    mean = summary["mean"]
    rows = mean.get("rows", len(SUBSETS))
    lines.append(f"| **mean** | | | | {rows}/{len(SUBSETS)} rows | " + " | ".join(_fmt(mean["dice"][r], 100) for r in REGIONS) + " | " + " | ".join(_fmt(mean["hd95"][r]) for r in REGIONS) + " |")
    note = (
        f"\n{summary['cases']} case(s); a row scores the cases that have all its modalities"
        f" ({NOT_APPLICABLE}: none), the mean is over the {rows} of {len(SUBSETS)} rows that have a case."
        f" Dice in percent; HD95 in mm, empty-mask convention '{cfg.hd95_empty}'"
        + ("" if cfg.hd95 else " (HD95 not computed)")
        + f"; ET post-processing {'on' if cfg.et_postprocess else 'off'}.\n"
    )
    return "\n".join(lines) + "\n" + note


def csv_table(summary: dict) -> str:
    """One line per subset (`cases`: how many it scores; dashes when none) and a last line,
    ``mean of K/15 rows``, over the rows that have a case."""
    head = ["subset", *MODALITIES, "cases", *(f"dice_{r}_percent" for r in REGIONS), *(f"hd95_{r}_mm" for r in REGIONS)]
    lines = [",".join(head)]
    for row in summary["subsets"]:
        present = [str(int(m in row["modalities"])) for m in MODALITIES]
        n = str(row.get("cases", summary["cases"]))
        lines.append(",".join([row["name"], *present, n, *_cells(row, "dice", 100), *_cells(row, "hd95")]))
    mean = summary["mean"]
    lines.append(",".join([_mean_label(summary), *[""] * len(MODALITIES), "",
                           *(_fmt(mean["dice"][r], 100) for r in REGIONS), *(_fmt(mean["hd95"][r]) for r in REGIONS)]))
    return "\n".join(lines) + "\n"


def heatmap(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Each row named with the number of cases it scores; a row without one is grey with dashes.
    names = [f"{row['name']} (n={row.get('cases', summary['cases'])})" for row in summary["subsets"]] + [_mean_label(summary)]
    rows = [[row["dice"][r] for r in REGIONS] for row in summary["subsets"]] + [[summary["mean"]["dice"][r] for r in REGIONS]]
    values = np.asarray([[np.nan if v is None else v for v in row] for row in rows], float)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    fig, ax = plt.subplots(figsize=(5.2, 7.2))
    ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(REGIONS)), REGIONS)
    ax.set_yticks(range(len(names)), names)
    for (i, j), v in np.ndenumerate(values):
        text = NOT_APPLICABLE if np.isnan(v) else f"{100 * v:.1f}"
        ax.text(j, i, text, ha="center", va="center", color="black" if np.isnan(v) or v >= 0.6 else "white", fontsize=8)
    ax.set_title(f"Dice (%), {summary['cases']} case(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(summary: dict, out_dir: Path, cfg: EvalConfig) -> None:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / "summary.md").write_text(markdown_table(summary, cfg))
    (out_dir / "summary.csv").write_text(csv_table(summary))
    heatmap(summary, out_dir / "dice_heatmap.png")
