"""Evaluation of all 15 modality subsets, one compiled program per run.

For each case the program takes the padded image, labels and valid mask and
maps over the 15 subset masks of `modalities.SUBSET_MASKS` with `lax.map`
(the mask is data, so the 15 subsets share one trace): the method's
`fill` and `predict` fill the missing modalities its own way (`fill` sees
the whole case and its unpadded extent, data too), sliding-window
inference gives region probabilities, thresholds give nested labels
(`labels.labels_from_regions`, optional ET post-processing), and Dice
counts per region are computed on the device. Every case is padded to one
bucket shape, so the program compiles once for the whole evaluation. The
label maps come back to the host for HD95 (scipy) and, for the chosen
subsets, NIfTI predictions in the source geometry and label convention.

Outputs in the output directory: ``cases/<id>.json``; ``summary.json``
(shape below); ``summary.md`` and ``summary.csv`` (the papers' layout, Dice
in percent); ``dice_heatmap.png``; ``predictions/<id>[_<subset>].nii.gz``.

``summary.json``::

    {"regions": ["WT", "TC", "ET"],
     "subsets": [{"name": "flair", "modalities": ["flair"],
                  "dice": {"WT": .., "TC": .., "ET": ..}, "hd95": {...}}, ... 15 rows],
     "mean": {"dice": {...}, "hd95": {...}}, "cases": N}

``eval_settings.json`` records the settings the numbers used (HD95 empty-mask
convention, ET post-processing, window), how often XLA compiled the program
and how often it was loaded from the persistent compilation cache.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
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

from jaxbrats import compilation
from jaxbrats.config import EvalConfig, to_dict
from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.loading import from_canonical, to_canonical
from jaxbrats.errors import JaxbratsError
from jaxbrats.inferers import SlidingWindowConfig, sliding_window
from jaxbrats.labels import ENHANCING, NECROSIS, REGIONS, from_internal, labels_from_regions, regions_of
from jaxbrats.metrics import dice_counts, dice_from_counts, hd95
from jaxbrats.modalities import MODALITIES, FULL_SUBSET_INDEX, SUBSET_MASKS, SUBSET_NAMES, SUBSETS


def sliding_config(cfg: EvalConfig) -> SlidingWindowConfig:
    return SlidingWindowConfig(window=cfg.window, overlap=cfg.overlap, blend=cfg.blend, batch=cfg.window_batch)


def postprocess_et(labels, min_voxels: int, xp=jnp):
    """Relabel ET to necrosis when the predicted ET has fewer than `min_voxels` voxels (nnU-Net)."""
    small = xp.sum(labels == ENHANCING) < min_voxels
    return xp.where(small & (labels == ENHANCING), NECROSIS, labels).astype(labels.dtype)


def segment(method, models, image, modality_mask, cfg: EvalConfig, valid=None, case_shape=None):
    """Internal labels (D, H, W) of one volume (D, H, W, 4) seen through `modality_mask`.

    `case_shape` is the extent of the case in a padded `image` (default: all of it).
    """
    case_shape = jnp.asarray(image.shape[:3] if case_shape is None else case_shape, jnp.int32)
    image = method.fill(models, image, modality_mask, case_shape)
    probs = sliding_window(lambda x: method.predict(models, x, modality_mask), image, sliding_config(cfg), len(REGIONS))
    regions = probs > cfg.threshold
    if valid is not None:
        regions = regions & valid[..., None]
    labels = labels_from_regions(regions, xp=jnp)
    return postprocess_et(labels, cfg.et_min_voxels) if cfg.et_postprocess else labels


def subset_evaluator(method, graphdefs: dict, cfg: EvalConfig):
    """``(models_state, image, labels, valid, mask, case_shape) -> (Dice counts (3, 3), labels)`` for one subset."""

    def evaluate_subset(models_state, image, labels, valid, mask, case_shape=None):
        models = {n: nnx.merge(g, models_state[n]) for n, g in graphdefs.items()}
        predicted = segment(method, models, image, mask, cfg, valid, case_shape)
        return dice_counts(regions_of(predicted, xp=jnp), regions_of(labels, xp=jnp)), predicted

    return evaluate_subset


PROGRAM_NAME = "eval_15_subsets"


def make_case_program(method, graphdefs: dict, cfg: EvalConfig):
    """The jitted 15-subset program: (Dice counts (15, 3, 3), labels (15, D, H, W) uint8)."""
    evaluate_subset = subset_evaluator(method, graphdefs, cfg)
    masks = jnp.asarray(SUBSET_MASKS)

    def eval_15_subsets(models_state, image, labels, valid, case_shape=None):
        program.traces += 1
        return lax.map(lambda mask: evaluate_subset(models_state, image, labels, valid, mask, case_shape), masks)

    program = jax.jit(eval_15_subsets)  # JAX reports its compilations as jit(eval_15_subsets)
    program.traces = 0
    return program


def bucket_shape(shapes, cfg: EvalConfig) -> tuple[int, int, int]:
    if cfg.bucket:
        return tuple(cfg.bucket)
    m = cfg.bucket_multiple
    big = np.max(np.asarray(shapes), axis=0)
    return tuple(int(max(-(-s // m) * m, w)) for s, w in zip(big, cfg.window))


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


def hd95_table(predicted, truth, spacing, empty: str) -> np.ndarray:
    """(15, 3) HD95 of each subset's label map against the truth."""
    out = np.zeros((len(SUBSETS), len(REGIONS)))
    truth_regions = regions_of(truth)
    for s in range(len(SUBSETS)):
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
    full = np.zeros(_canonical_shape(manifest), np.uint8)
    box = tuple(slice(lo, hi) for lo, hi in manifest["crop_box"])
    full[box] = labels
    affine = np.asarray(manifest["original_affine"])
    data = from_internal(from_canonical(full, affine), manifest["label_convention"] or "brats2023")
    write_nifti(data, affine, path, header)


def _canonical_shape(manifest) -> tuple[int, ...]:
    probe = np.zeros(manifest["original_shape"], np.bool_)
    return to_canonical(probe, np.asarray(manifest["original_affine"])).shape


def write_nifti(data: np.ndarray, affine, path: Path, header=None) -> None:
    """Atomic NIfTI write: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.ascontiguousarray(data), np.asarray(affine), header=header)
    image.set_data_dtype(np.uint8)
    image.set_sform(np.asarray(affine), code=1)
    image.set_qform(np.asarray(affine), code=1)
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def evaluate(method, graphdefs, models_state, dataset: CacheDataset, cfg: EvalConfig, out_dir,
             predictions: str = "full", progress: bool = True) -> dict:
    """Score every case of `dataset` on all 15 subsets; write the results to `out_dir`."""
    out_dir = Path(out_dir)
    (out_dir / "cases").mkdir(parents=True, exist_ok=True)
    if any(not m.get("has_label") for m in dataset.manifests):
        raise JaxbratsError(f"{dataset.cache_dir}: evaluation needs labelled cases (prepared without --no-labels)")
    bucket = bucket_shape([m["cropped_shape"] for m in dataset.manifests], cfg)
    program = make_case_program(method, graphdefs, cfg)
    compilation.watch()
    before = compilation.counts(PROGRAM_NAME)
    dice_all, hd_all = [], []
    for i in tqdm(range(len(dataset)), desc="eval", unit="case", disable=not progress, dynamic_ncols=True):
        arrays, manifest = dataset.arrays(i), dataset.manifests[i]
        shape = tuple(manifest["cropped_shape"])
        if any(s > b for s, b in zip(shape, bucket)):
            raise JaxbratsError(f"case {manifest['case_id']}: shape {shape} exceeds eval.bucket {bucket}")
        image = _pad(np.asarray(arrays["image"]), bucket)
        labels = _pad(np.asarray(arrays["label"]), bucket)
        valid = _pad(np.ones(shape, bool), bucket)
        counts, predicted = jax.device_get(program(models_state, image, labels, valid, np.asarray(shape, np.int32)))
        predicted = predicted[:, : shape[0], : shape[1], : shape[2]]
        dice = dice_from_counts(counts)
        hd = hd95_table(predicted, np.asarray(arrays["label"]), canonical_spacing(manifest["original_affine"]), cfg.hd95_empty) if cfg.hd95 else np.full(dice.shape, np.nan)
        dice_all.append(dice)
        hd_all.append(hd)
        _write_case(out_dir, manifest["case_id"], dice, hd)
        for s in _prediction_subsets(predictions):
            suffix = "" if predictions == "full" else f"_{SUBSET_NAMES[s]}"
            write_prediction(predicted[s], manifest, out_dir / "predictions" / f"{manifest['case_id']}{suffix}.nii.gz")
    summary = summarize(np.asarray(dice_all), np.asarray(hd_all))
    write_reports(summary, out_dir, cfg)
    after = compilation.counts(PROGRAM_NAME)
    settings = {"eval": to_dict(cfg), "bucket": list(bucket), "compilations": after["compiled"] - before["compiled"],
                "loaded_from_cache": after["loaded"] - before["loaded"]}
    (out_dir / "eval_settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    return summary


def _prediction_subsets(predictions: str) -> list[int]:
    return {"none": [], "full": [FULL_SUBSET_INDEX], "all": list(range(len(SUBSETS)))}[predictions]


def _row(values) -> dict:
    return {r: (None if math.isnan(v) else float(v)) for r, v in zip(REGIONS, values)}


def _write_case(out_dir: Path, case_id: str, dice, hd) -> None:
    rows = [{"name": SUBSET_NAMES[s], "dice": _row(dice[s]), "hd95": _row(hd[s])} for s in range(len(SUBSETS))]
    (out_dir / "cases" / f"{case_id}.json").write_text(json.dumps({"case": case_id, "subsets": rows}, indent=1) + "\n")


def summarize(dice: np.ndarray, hd: np.ndarray) -> dict:
    """Means over cases (per subset) and over subsets; HD95 NaNs (convention "nan") are left out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN HD95 columns
        dice_mean = dice.mean(axis=0)
        hd_mean = np.nanmean(hd, axis=0)
        subsets = [
            {"name": SUBSET_NAMES[s], "modalities": list(SUBSETS[s]), "dice": _row(dice_mean[s]), "hd95": _row(hd_mean[s])}
            for s in range(len(SUBSETS))
        ]
        mean = {"dice": _row(dice_mean.mean(axis=0)), "hd95": _row(np.nanmean(hd_mean, axis=0))}
    return {
        "regions": list(REGIONS),
        "subsets": subsets,
        "mean": mean,
        "cases": int(dice.shape[0]),
    }


def _fmt(value, scale=1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.2f}"


def markdown_table(summary: dict, cfg: EvalConfig) -> str:
    """The papers' layout: one row per subset, a mark per modality present, Dice in percent."""
    head = "| " + " | ".join(m for m in MODALITIES) + " | " + " | ".join(f"Dice {r}" for r in REGIONS) + " | " + " | ".join(f"HD95 {r}" for r in REGIONS) + " |"
    lines = [head, "|" + "---|" * (len(MODALITIES) + 2 * len(REGIONS))]
    for row in summary["subsets"]:
        marks = ["●" if m in row["modalities"] else "○" for m in MODALITIES]
        lines.append("| " + " | ".join(marks) + " | " + " | ".join(_fmt(row["dice"][r], 100) for r in REGIONS) + " | " + " | ".join(_fmt(row["hd95"][r]) for r in REGIONS) + " |")
    mean = summary["mean"]
    lines.append("| **mean** | | | | " + " | ".join(_fmt(mean["dice"][r], 100) for r in REGIONS) + " | " + " | ".join(_fmt(mean["hd95"][r]) for r in REGIONS) + " |")
    note = (
        f"\n{summary['cases']} case(s). Dice in percent; HD95 in mm, empty-mask convention '{cfg.hd95_empty}'"
        + ("" if cfg.hd95 else " (HD95 not computed)")
        + f"; ET post-processing {'on' if cfg.et_postprocess else 'off'}.\n"
    )
    return "\n".join(lines) + "\n" + note


def csv_table(summary: dict) -> str:
    head = ["subset", *MODALITIES, *(f"dice_{r}_percent" for r in REGIONS), *(f"hd95_{r}_mm" for r in REGIONS)]
    lines = [",".join(head)]
    for row in summary["subsets"] + [{"name": "mean", "modalities": [], **summary["mean"]}]:
        present = ["" if row["name"] == "mean" else str(int(m in row["modalities"])) for m in MODALITIES]
        lines.append(",".join([row["name"], *present, *(_fmt(row["dice"][r], 100) for r in REGIONS), *(_fmt(row["hd95"][r]) for r in REGIONS)]))
    return "\n".join(lines) + "\n"


def heatmap(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["name"] for row in summary["subsets"]] + ["mean"]
    rows = [[row["dice"][r] for r in REGIONS] for row in summary["subsets"]] + [[summary["mean"]["dice"][r] for r in REGIONS]]
    values = np.asarray(rows, float)
    fig, ax = plt.subplots(figsize=(4.6, 7.2))
    ax.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(REGIONS)), REGIONS)
    ax.set_yticks(range(len(names)), names)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_title(f"Dice (%), {summary['cases']} case(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(summary: dict, out_dir: Path, cfg: EvalConfig) -> None:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / "summary.md").write_text(markdown_table(summary, cfg))
    (out_dir / "summary.csv").write_text(csv_table(summary))
    heatmap(summary, out_dir / "dice_heatmap.png")
