"""Dice (on the device, from voxel counts) and HD95 (on the host, with scipy), with HD95's geometry.

`dice_counts` runs inside the evaluation's compiled program, `dice_from_counts` turns its counts
into Dice on the host; `hd95_table` scores every subset's label map of a case, in mm
(`canonical_spacing`: the voxel size along each axis of the cached RAS+ volume), on a crop around
the two masks (`_bbox`, which leaves the distances unchanged).

Conventions (those of the BraTS challenge and of the methods' public code):

- Dice is 1 when prediction and truth are both empty (every method compared does so).
- HD95 follows medpy's ``hd95``: surface voxels are a mask minus its
  erosion (6-connectivity); the distances from each surface to the other
  (Euclidean, in mm with the voxel spacing) are pooled and their 95th
  percentile is taken. The empty-mask convention is a setting
  (`eval.hd95_empty`), and the reports print which one a table used:

  =============  ===========  ==============  ==========================
  name           both empty   exactly one     used by
  =============  ===========  ==============  ==========================
  ``brats``      0            373.13          BraTS, nnU-Net (default)
  ``zero``       0            0               M3AE's public code
  ``nan``        NaN          NaN             ProtoKD (left out of means)
  ``brats2023``  0            374             BraTS 2023's official code
  =============  ===========  ==============  ==========================

  ``brats2023`` is what the 2023 challenge's scoring code gives its global ("legacy") HD95: 0
  when both masks are empty, infinity (reported as 374) when one is. Its lesion-wise scores
  (`evaluation.lesion`, `eval.lesion_wise`) are never NaN either: no lesion and no false positive
  scores Dice 1 and HD95 0. NaN for an empty reference is the later panoptica-based BraTS
  evaluation package's convention, not 2023's.

- HD95 is not one definition across tools. Here (`hd95`, medpy's): the distances of both
  surfaces are pooled, then one 95th percentile taken. MONAI's ``compute_hausdorff_distance``
  (``percentile=95``) takes the 95th percentile of each direction separately and reports the
  larger: never below the pooled value (up to interpolation), above it when one direction has the
  longer tail, e.g. a prediction that misses part of the tumour. BraTS 2023's scoring code
  (DeepMind's surface-distance) also takes the larger of the two directed percentiles, with
  surface points on the voxel-corner grid weighted by their surface area (`lesion.surface_hd95`,
  used by the lesion-wise HD95). The three agree on identical masks (0), not in general.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from jaxbrats.config import HD95_CONVENTIONS
from jaxbrats.errors import require
from jaxbrats.labels import REGIONS, regions_of
from jaxbrats.modalities import SUBSETS

HD95_EMPTY: dict[str, tuple[float, float]] = {
    "brats": (0.0, 373.13),
    "zero": (0.0, 0.0),
    "nan": (float("nan"), float("nan")),
    "brats2023": (0.0, 374.0),
}
assert tuple(HD95_EMPTY) == HD95_CONVENTIONS  # config checks the names; the values live here


def dice_counts(pred, truth):
    """(3, C) int32: intersection, predicted and true voxel counts per channel of (..., C) masks."""
    axes = tuple(range(pred.ndim - 1))
    pred, truth = pred.astype(jnp.int32), truth.astype(jnp.int32)
    return jnp.stack([jnp.sum(pred * truth, axes), jnp.sum(pred, axes), jnp.sum(truth, axes)])


def dice_from_counts(counts) -> np.ndarray:
    """Dice per channel from `dice_counts` (any leading axes); 1 where both masks are empty."""
    counts = np.asarray(counts, np.float64)
    inter, pred, truth = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
    total = pred + truth
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0, 1.0), empty: str = "brats") -> float:
    """95th percentile Hausdorff distance between two boolean masks, in the units of `spacing`."""
    if empty not in HD95_EMPTY:
        raise ValueError(f"hd95 empty convention must be one of {sorted(HD95_EMPTY)}, got {empty!r}")
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    both_empty, one_empty = HD95_EMPTY[empty]
    if not pred.any() and not truth.any():
        return both_empty
    if not pred.any() or not truth.any():
        return one_empty
    sp, st = _surface(pred), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    return float(np.percentile(np.concatenate([to_truth, to_pred]), 95))


def canonical_spacing(affine) -> tuple[float, ...]:
    """Voxel size along each RAS+ axis of a volume stored with `affine`."""
    what = "the voxel size of a case (HD95)"
    sizes = require("nibabel.affines", what).voxel_sizes(np.asarray(affine))
    orientation = require("nibabel.orientations", what).io_orientation(np.asarray(affine))
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
