"""Dice and HD95 on hand-computed cases, every empty-mask convention."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbrats.metrics import dice_counts, dice_from_counts, hd95


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
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
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


@pytest.mark.parametrize("convention,both,one", [("brats", 0.0, 373.13), ("zero", 0.0, 0.0), ("nan", math.nan, math.nan)])
def test_hd95_empty_conventions(convention, both, one):
    empty = np.zeros((5, 5, 5), bool)
    full = _cube((5, 5, 5), (1, 1, 1), (3, 3, 3))
    for got, want in ((hd95(empty, empty, empty=convention), both), (hd95(full, empty, empty=convention), one), (hd95(empty, full, empty=convention), one)):
        assert (math.isnan(got) and math.isnan(want)) or got == want


def test_hd95_rejects_unknown_convention():
    with pytest.raises(ValueError, match="empty convention"):
        hd95(np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool), empty="inf")
