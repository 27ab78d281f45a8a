"""Dice and HD95 on hand-computed cases, every empty-mask convention.

The HD95 references here are computed by brute force (surface voxels found with
numpy shifts, all pairwise distances), independently of scipy's erosion and EDT.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbrats.evaluation.metrics import dice_counts, dice_from_counts, hd95


def test_dice_hand_computed_and_both_empty_is_one():
    pred = np.zeros((4, 4, 4, 3), bool)
    truth = np.zeros_like(pred)
    pred[0, 0, :3, 0] = True  # 3 voxels
    truth[0, 0, 1:, 0] = True  # 3 voxels, 2 shared -> 2*2/6
    truth[1, 1, 1, 1] = True  # channel 1: prediction empty -> 0
    counts = dice_counts(jnp.asarray(pred), jnp.asarray(truth))
    np.testing.assert_array_equal(counts, [[2, 0, 0], [3, 0, 0], [3, 1, 0]])
    np.testing.assert_allclose(dice_from_counts(counts), [2 / 3, 0.0, 1.0])


def _cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def test_hd95_of_a_shifted_cube():
    a = _cube((20, 20, 20), (5, 5, 5), (10, 10, 10))
    b = np.roll(a, 3, axis=0)
    # Every surface voxel of one lies within 3 voxels of the other's surface; the
    # faces perpendicular to the shift are exactly 3 apart, so the 95th percentile is 3.
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, b, spacing=(2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert hd95(a, a) == 0.0


def test_hd95_single_voxels_is_their_distance():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[1, 1, 1] = True
    b[4, 5, 1] = True
    assert hd95(a, b) == pytest.approx(5.0)


@pytest.mark.parametrize(
    "convention,both,one", [("brats", 0.0, 373.13), ("zero", 0.0, 0.0), ("nan", math.nan, math.nan)]
)
def test_hd95_empty_conventions(convention, both, one):
    empty = np.zeros((5, 5, 5), bool)
    full = _cube((5, 5, 5), (1, 1, 1), (3, 3, 3))
    for got, want in (
        (hd95(empty, empty, empty=convention), both),
        (hd95(full, empty, empty=convention), one),
        (hd95(empty, full, empty=convention), one),
    ):
        assert (math.isnan(got) and math.isnan(want)) or got == want


def test_hd95_rejects_unknown_convention():
    with pytest.raises(ValueError, match="empty convention"):
        hd95(np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool), empty="inf")


def surface_points(mask: np.ndarray, spacing) -> np.ndarray:
    """(N, 3) positions in mm of the voxels of `mask` with a 6-neighbour outside it (or off the array)."""
    padded = np.pad(mask, 1)
    core = (slice(1, -1),) * 3
    interior = mask.copy()
    for axis in range(3):
        for step in (1, -1):
            interior &= np.roll(padded, step, axis=axis)[core]
    return np.argwhere(mask & ~interior) * np.asarray(spacing, float)


def directed_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each point of `a`, the distance to the nearest point of `b` (all pairs)."""
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)).min(axis=1)


def hd95_candidates(pred, truth, spacing) -> tuple[float, float]:
    """(medpy's pooled 95th percentile, the larger of the two directed 95th percentiles)."""
    sp, st = surface_points(pred, spacing), surface_points(truth, spacing)
    forward, backward = directed_distances(sp, st), directed_distances(st, sp)
    pooled = float(np.percentile(np.concatenate([forward, backward]), 95))
    return pooled, float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 1.0, 2.0)])
def test_hd95_pools_both_directions_like_medpy(spacing):
    # A big cube against a small cube inside it plus a far blob: the blob is 8% of
    # the small mask's surface (the directed 95th percentile sees it) but 4% of
    # the pooled distances (the pooled one does not), so the two definitions differ.
    big = _cube((40, 24, 24), (2, 4, 4), (14, 16, 16))
    small = _cube((40, 24, 24), (6, 8, 8), (10, 12, 12)) | _cube((40, 24, 24), (32, 9, 9), (35, 12, 12))
    pooled, max_directed = hd95_candidates(big, small, spacing)
    assert pooled > 1.0 and max_directed > 2 * pooled  # clearly different, neither trivial
    assert hd95(big, small, spacing) == pytest.approx(pooled, rel=1e-12)
    assert hd95(small, big, spacing) == pytest.approx(pooled, rel=1e-12)  # symmetric


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_equals_the_brute_force_pooled_percentile_on_random_blobs(seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    spacing = tuple(rng.uniform(0.5, 3.0, 3))
    pred, truth = (ndimage.gaussian_filter(rng.normal(size=(14, 12, 10)), 1.5) > 0.05 for _ in range(2))
    assert pred.any() and truth.any() and (pred != truth).any()
    pooled, _ = hd95_candidates(pred, truth, spacing)
    assert hd95(pred, truth, spacing) == pytest.approx(pooled, rel=1e-12)
