"""Sliding-window inference: coverage, blending, and equality with a direct forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbrats.inference.windows import SlidingWindowConfig, axis_starts, sliding_window, window_starts


def test_starts_cover_the_axis_and_end_flush():
    assert axis_starts(10, 16, 0.5) == [0]
    assert axis_starts(32, 16, 0.5) == [0, 8, 16]
    assert axis_starts(30, 16, 0.5) == [0, 8, 14]
    assert window_starts((32, 16, 20), (16, 16, 16), 0.5).shape == (3 * 1 * 2, 3)


def _local_model(x):
    # Voxel-wise, so any window placement gives the same value at a voxel.
    return jnp.tanh(x[..., :2] * 2.0 - x[..., 2:3])


@pytest.mark.parametrize("blend", ["gaussian", "uniform"])
@pytest.mark.parametrize("batch", [1, 3])
def test_pointwise_model_is_reproduced_exactly(blend, batch):
    volume = jax.random.normal(jax.random.key(0), (20, 17, 12, 4))
    cfg = SlidingWindowConfig(window=(8, 8, 16), overlap=0.5, blend=blend, batch=batch)
    out = jax.jit(lambda v: sliding_window(_local_model, v, cfg, 2))(volume)
    assert out.shape == (20, 17, 12, 2)
    np.testing.assert_allclose(out, _local_model(volume), atol=1e-5)


def test_one_window_equals_a_direct_forward():
    from flax import nnx

    from jaxbrats.networks.unet import UNet, UNetConfig

    model = UNet(UNetConfig(widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1)), nnx.Rngs(0))
    volume = jax.random.normal(jax.random.key(1), (16, 16, 16, 4))

    @nnx.jit
    def both(model, v):
        direct = model(v[None])["logits"][0]
        windowed = sliding_window(lambda x: model(x)["logits"], v, SlidingWindowConfig(window=(16, 16, 16)), 3)
        return direct, windowed

    direct, windowed = both(model, volume)
    np.testing.assert_allclose(windowed, direct, atol=1e-5)
