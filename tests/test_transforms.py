"""M3AE's patch masking and the substitute-image window, against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbrats.data.pipeline import crop_slices, crop_start
from jaxbrats.data.transforms import case_origin, patch_grid, patch_mask_to_voxels, read_window, visible_patches


@pytest.mark.parametrize("kept", [(1, 1, 1, 1), (1, 0, 1, 0), (0, 0, 0, 1)])
def test_exactly_one_eighth_of_all_patches_visible_and_only_kept_modalities(kept):
    grid = patch_grid((128, 128, 128), 16)
    assert grid == (8, 8, 8)
    mask = jnp.asarray(kept, bool)
    draw = jax.jit(lambda k: visible_patches(k, mask, grid, 0.125))
    seen = np.zeros((8, 8, 8, 4))
    for seed in range(20):
        visible = np.asarray(draw(jax.random.key(seed)))
        assert visible.shape == (8, 8, 8, 4)
        assert visible.sum() == 256  # 12.5 % of 4 x 512 patches: masking ratio 87.5 % exactly
        assert not visible[..., ~np.asarray(kept, bool)].any()
        seen += visible
    assert (seen[..., np.asarray(kept, bool)] > 0).mean() > 0.5  # a fresh draw each time, spread over the grid


def test_patch_mask_expands_to_16_cubed_blocks():
    mask = np.random.default_rng(0).random((2, 3, 1, 4)) > 0.5
    voxels = np.asarray(patch_mask_to_voxels(jnp.asarray(mask), 16))
    want = np.kron(mask, np.ones((16, 16, 16, 1), bool))
    np.testing.assert_array_equal(voxels, want)
    with pytest.raises(ValueError, match="multiple"):
        patch_grid((128, 120, 128), 16)


@pytest.mark.parametrize("case_shape", [(30, 26, 20), (12, 40, 9)])
def test_window_reads_the_substitute_where_the_crop_came_from(case_shape):
    """A substitute image equal to the case (centred in it) reads back as the image crop, flips included."""
    rng = np.random.default_rng(1)
    volume_shape, crop = (36, 44, 24), (16, 16, 16)
    x_sub = rng.normal(size=volume_shape + (4,)).astype(np.float32)
    origin = (np.asarray(volume_shape) - case_shape) // 2
    case = x_sub[tuple(slice(o, o + s) for o, s in zip(origin, case_shape))]
    read = jax.jit(lambda v, s, f: read_window(v, s, f, crop))
    for _ in range(10):
        start = crop_start(rng, case_shape, crop, None, 0.0)
        flips = rng.random(3) < 0.5
        src, dst = crop_slices(start, case_shape, crop, flips)
        image_crop = np.zeros(crop + (4,), np.float32)
        image_crop[dst] = case[src]
        window = np.asarray(
            read(jnp.asarray(x_sub), jnp.asarray(start) + case_origin(case_shape, volume_shape), jnp.asarray(flips))
        )
        np.testing.assert_array_equal(window[dst], image_crop[dst])
