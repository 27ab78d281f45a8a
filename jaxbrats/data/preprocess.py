"""Preprocess validated cases into the on-disk cache the input pipeline reads.

Per case: crop to the brain's bounding box (plus a margin), normalise each
modality over brain voxels, store channels-last float32 images and internal
uint8 labels as uncompressed .npy, plus a manifest. See `jaxbrats.data.cache`
for the format and the crash-safety rules.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jaxbrats.data import cache
from jaxbrats.data.discovery import CaseRecord, discover
from jaxbrats.data.loading import LoadedCase, load_case
from jaxbrats.errors import CaseError, JaxbratsError
from jaxbrats.labels import convention_map, region_voxel_counts
from jaxbrats.modalities import MODALITIES
from jaxbrats.runtime import locks

NORMALIZATIONS = ("zscore", "percentile", "minmax")
#: Foreground voxel coordinates kept per label for oversampled crops.
FOREGROUND_SAMPLES_PER_LABEL = 10_000
#: A border value is the background when it fills at least this fraction of the outer faces.
BACKGROUND_BORDER_FRACTION = 0.9
#: Relative tolerance around a non-zero background (a 0 background is matched exactly).
BACKGROUND_TOLERANCE = 1e-5


def brain_bbox(mask: np.ndarray, margin: int) -> np.ndarray:
    """[[lo, hi), ...] per axis of the nonzero region, grown by `margin`, clipped."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append([max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])])
    return np.array(box, dtype=np.int64)


def normalize(image: np.ndarray, brain: np.ndarray, method: str) -> tuple[np.ndarray, dict]:
    """Normalise one modality over brain voxels; voxels outside the brain become 0.

    zscore: (x - mean) / std. percentile (M3AE): clip to the [1, 99]
    percentiles, then min-max to [0, 1]. minmax (Mind the Gap, which says only
    "Image intensities are normalized to [-1, 1]"): the brain voxels' minimum
    -> -1, maximum -> 1, linearly in between (stats {"min", "max"}). Two of
    its details are our choices, the paper is silent on them: the range is
    that of the brain voxels (not the whole volume, not percentiles), and the
    background is 0 as for the other methods, not -1, so that it equals a
    missing modality's zero-filled channel (0 = "no signal"; inside the brain
    0 is the middle of the range). A modality constant over the brain
    (max == min) has no range to scale: it maps to 0 everywhere, without a
    division by zero.
    """
    voxels = image[brain]
    if method == "zscore":
        mean, std = float(voxels.mean()), float(voxels.std())
        out, stats = (image - mean) / max(std, 1e-8), {"mean": mean, "std": std}
    elif method == "percentile":
        lo, hi = (float(v) for v in np.percentile(voxels, [1, 99]))
        out, stats = (np.clip(image, lo, hi) - lo) / max(hi - lo, 1e-8), {"p1": lo, "p99": hi}
    elif method == "minmax":
        lo, hi = float(voxels.min()), float(voxels.max())
        # In float64, so that the extremes land exactly on -1 and 1 after the cast to float32.
        out = 2 * (image.astype(np.float64) - lo) / (hi - lo) - 1 if hi > lo else np.zeros(image.shape)
        stats = {"min": lo, "max": hi}
    else:
        raise ValueError(f"unknown normalization {method!r}; expected one of {NORMALIZATIONS}")
    return np.where(brain, out, 0).astype(np.float32), stats


def foreground_samples(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, 4) int32 rows (label, i, j, k): up to a fixed number of voxels per tumour label."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in np.unique(labels):
        if label == 0:
            continue
        coords = np.argwhere(labels == label)
        if len(coords) > FOREGROUND_SAMPLES_PER_LABEL:
            coords = coords[np.sort(rng.choice(len(coords), FOREGROUND_SAMPLES_PER_LABEL, replace=False))]
        rows.append(np.column_stack([np.full(len(coords), label), coords]))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


def border_values(image: np.ndarray) -> np.ndarray:
    """The voxels on the outer faces of a volume, each once."""
    faces = [image[[0, -1]], image[1:-1, [0, -1]], image[1:-1, 1:-1, [0, -1]]]
    return np.concatenate([f.ravel() for f in faces])


def find_background(image: np.ndarray) -> float:
    """The value that fills a volume's border, or 0.

    The most common value on the outer faces when it covers at least
    `BACKGROUND_BORDER_FRACTION` of them (a constant background such as the
    -3.62 of a z-scored image); otherwise 0 (raw or skull-stripped images,
    a brain touching the border). Never the minimum: negative ringing at a
    skull-stripped brain's edge does not move it.
    """
    border = border_values(image)
    values, counts = np.unique(border, return_counts=True)
    top = int(np.argmax(counts))
    return float(values[top]) if counts[top] >= BACKGROUND_BORDER_FRACTION * border.size else 0.0


def brain_mask(images: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, float]]:
    """(brain, background per modality): brain = voxels that differ from their modality's background in any modality.

    A value is background when it is within a tiny relative tolerance of the
    border's constant (exactly 0 for a 0 background, so such images keep the
    historical rule `x != 0`). Values below the background count as brain:
    after an affine intensity map (z-scoring with the background set to a
    constant) the mask, the crop and the normalised cache are those of the
    source image, and tissue below a zero background (zero-centred z-scores)
    is kept; negative ringing at the brain's edge thus joins the brain, a
    shell one or two voxels thick inside the crop margin anyway.
    """
    brain, backgrounds = None, {}
    for modality, image in images.items():
        background = find_background(image)
        tolerance = BACKGROUND_TOLERANCE * abs(background)
        inside = np.abs(image - background) > tolerance if tolerance else image != background
        brain = inside if brain is None else brain | inside
        backgrounds[modality] = background
    return brain, backgrounds


def preprocess_case(case: LoadedCase, normalization: str, margin: int) -> tuple[dict, dict]:
    """Crop and normalise a loaded case; returns (arrays, manifest fields)."""
    brain_full, backgrounds = brain_mask(case.images)
    for modality, image in case.images.items():
        if image.min() == image.max():  # ("all zero" is refused when loading)
            raise CaseError(
                case.record.case_id,
                case.record.images[modality],
                f"image is constant ({backgrounds[modality]:g} everywhere)",
            )
    if not brain_full.any():
        raise CaseError(
            case.record.case_id, case.record.directory, "no brain voxels: every modality equals its background"
        )
    box = brain_bbox(brain_full, margin)
    crop = tuple(slice(lo, hi) for lo, hi in box)
    brain = brain_full[crop]
    image = np.zeros(brain.shape + (len(MODALITIES),), dtype=np.float32)
    stats = {}
    for c, modality in enumerate(MODALITIES):
        if modality in case.images:
            image[..., c], stats[modality] = normalize(case.images[modality][crop], brain, normalization)
    arrays = {"image": image}
    fields = {
        "crop_box": box.tolist(),
        "cropped_shape": list(brain.shape),
        "normalization": {"method": normalization, "stats": stats},
        "background": backgrounds,  # per present modality: the border's constant (0 for skull-stripped BraTS)
    }
    if case.labels is not None:
        labels = np.ascontiguousarray(case.labels[crop])
        arrays["label"] = labels
        arrays["foreground"] = foreground_samples(labels)
        fields["region_voxels"] = region_voxel_counts(labels)
        fields["region_voxels_lost_by_crop"] = {
            r: n - fields["region_voxels"][r] for r, n in region_voxel_counts(case.labels).items()
        }
    return arrays, fields


def prepare_case(
    record: CaseRecord,
    cache_dir: Path,
    normalization: str,
    margin: int,
    need_labels: bool,
    convention: str | None = None,
) -> str:
    """Load, validate, preprocess and store one case unless its entry is current.

    Returns "cached" or "written"; raises `CaseError` for a bad case.
    """
    settings = {"normalization": normalization, "margin": margin}
    if convention is not None:  # a stated label convention (else the layout's): a change re-prepares
        settings["convention"] = convention
    fingerprint = cache.source_fingerprint(record)
    if cache.entry_is_current(cache_dir, record.case_id, fingerprint, settings):
        return "cached"
    case = load_case(record, need_labels=need_labels, convention=convention)
    arrays, fields = preprocess_case(case, normalization, margin)
    manifest = {
        "case_id": record.case_id,
        "layout": record.layout,
        "label_convention": case.convention,
        "sources": {m: str(p) for m, p in record.images.items()} | ({"seg": str(record.seg)} if record.seg else {}),
        "source_fingerprint": fingerprint,
        "settings": settings,
        "present": list(record.present),
        "modalities": list(MODALITIES),
        "original_shape": list(case.shape),
        "original_affine": case.affine.tolist(),
        "original_axcodes": list(case.axcodes),
        "has_label": case.labels is not None,
        **fields,
    }
    cache.write_entry(cache_dir, record.case_id, arrays, manifest)
    return "written"


def _prepare_one(args):
    try:
        return args[0].case_id, prepare_case(*args), None
    except CaseError as e:
        return args[0].case_id, None, str(e)


def _check_one(args):
    record, need_labels, convention = args
    try:
        load_case(record, need_labels=need_labels, convention=convention)
        return record.case_id, "ok", None
    except CaseError as e:
        return record.case_id, None, str(e)


def _over_cases(func, jobs, workers, progress, desc) -> tuple[dict, list[str]]:
    """Run `func` on every job, in worker processes when there are several cores."""
    workers = min(workers or os.cpu_count() or 1, max(len(jobs), 1))
    status, errors = {}, []
    pool = cf.ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        results = pool.map(func, jobs) if pool else map(func, jobs)
        for case_id, state, error in tqdm(
            results, total=len(jobs), desc=desc, unit="case", disable=None if progress else True
        ):
            if error:
                errors.append(error)
            else:
                status[case_id] = state
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return status, errors


def prepare_dataset(
    data_dir,
    cache_dir,
    normalization: str = "zscore",
    margin: int = 4,
    need_labels: bool = True,
    skip_bad: bool = False,
    workers: int | None = None,
    progress: bool = True,
    convention: str | None = None,
) -> dict:
    """Prepare every case of `data_dir` into `cache_dir`; returns a report.

    Bad cases are collected, not raised: the report lists each with its
    reason. The dataset index (what makes the cache usable) is written only
    when no case is bad, or with `skip_bad`, for the good cases; never when
    no case is good (`report["prepared"]` is then empty). A second `prepare`
    into the same cache meanwhile is refused in one line naming this one
    (`cache.LOCK`, `jaxbrats.runtime.locks`).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")
    if convention is not None:
        convention_map(convention)  # an unknown name: one line, before any work
    if margin < 0:  # a negative margin would crop into the brain
        raise JaxbratsError(f"margin: must be 0 or more voxels, got {margin}")
    layout, records, bad = discover(data_dir, need_labels=need_labels)
    cache_dir = Path(cache_dir)
    # One writer per cache, from the first write to the index: two runs would delete each other's
    # partial entries and race for index.json. (Taken after discovery: a bad DATA_DIR creates no cache.)
    with locks.hold(
        cache_dir / cache.LOCK, "jaxbrats prepare", hint="wait for it to finish or use another cache directory"
    ):
        cache.remove_partial_entries(cache_dir)
        jobs = [(r, cache_dir, normalization, margin, need_labels, convention) for r in records]
        status, errors = _over_cases(_prepare_one, jobs, workers, progress, "prepare")
        errors = [str(e) for e in bad] + errors
        good = [r.case_id for r in records if r.case_id in status]
        if good and (skip_bad or not errors):
            cache.write_index(cache_dir, layout, good, settings={"normalization": normalization, "margin": margin})
        else:  # a failed run, or one without a usable case, leaves no index behind, not even an older one
            cache.remove_index(cache_dir)
    return {"layout": layout, "records": records, "prepared": status, "errors": errors}


def check_dataset(
    data_dir, need_labels: bool = True, workers: int | None = None, progress: bool = True, convention: str | None = None
) -> dict:
    """Validate every case without writing anything; returns a report like `prepare_dataset`."""
    if convention is not None:
        convention_map(convention)
    layout, records, bad = discover(data_dir, need_labels=need_labels)
    status, errors = _over_cases(
        _check_one, [(r, need_labels, convention) for r in records], workers, progress, "check"
    )
    return {"layout": layout, "records": records, "prepared": status, "errors": [str(e) for e in bad] + errors}
