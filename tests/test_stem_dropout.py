"""RIRN's spatial dropout after the first encoder convolution (UNetConfig.stem_dropout)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxbrats.config import ConfigError, ModelConfig
from jaxbrats.networks.unet import UNet, UNetConfig

BASE = UNetConfig(widths=(8, 8), blocks=(1, 1), conv_impl="native")
X = jax.random.normal(jax.random.key(0), (3, 8, 8, 8, 4))
ENCODE = nnx.jit(lambda m, x, key: m.encoder(x, key))
ENCODE_PLAIN = nnx.jit(lambda m, x: m.encoder(x))


def _identity_blocks(cfg):
    """A U-Net whose encoder blocks add zero (conv2 zeroed): features[0] is the stem output (after
    its dropout), features[-1] is the bottleneck input (after its dropout)."""
    model = UNet(cfg, nnx.Rngs(0))
    for level in model.encoder.levels:
        for block in level:
            block.conv2.kernel[...] = jnp.zeros_like(block.conv2.kernel[...])
            block.conv2.bias[...] = jnp.zeros_like(block.conv2.bias[...])
    return model


def test_whole_channels_of_a_sample_are_dropped_and_the_rest_scaled():
    model = _identity_blocks(dataclasses.replace(BASE, stem_dropout=0.5))
    stem = np.asarray(nnx.jit(lambda m, x: m.encoder.stem(x))(model, X))
    assert np.all(stem.reshape(-1, 8) != 0)  # every channel of the plain stem output is nonzero somewhere
    got = np.asarray(ENCODE(model, X, jax.random.key(1))[0])
    keep = np.zeros((3, 8), bool)
    for n in range(3):
        for c in range(8):
            if np.all(got[n, ..., c] == 0):
                continue
            keep[n, c] = True
            np.testing.assert_allclose(got[n, ..., c], 2 * stem[n, ..., c], rtol=1e-6, atol=1e-6)
    assert 0 < keep.sum() < keep.size  # some dropped, some kept
    assert len({tuple(row) for row in keep}) > 1  # a draw per sample, not one for the batch
    # Another key, another draw; the same key, the same draw.
    other = np.asarray(ENCODE(model, X, jax.random.key(2))[0])
    assert not np.array_equal(other, got)
    np.testing.assert_array_equal(np.asarray(ENCODE(model, X, jax.random.key(1))[0]), got)


def test_without_a_key_stem_dropout_is_off():
    on = UNet(dataclasses.replace(BASE, stem_dropout=0.5), nnx.Rngs(0))
    off = UNet(BASE, nnx.Rngs(0))  # the same weights: the option does not change initialisation
    plain = nnx.jit(lambda m, x: m(x)["logits"])
    np.testing.assert_array_equal(plain(on, X), plain(off, X))


def test_the_bottleneck_dropout_draws_the_same_mask_with_stem_dropout():
    key = jax.random.key(3)
    masks = []
    for stem_dropout in (0.0, 0.5):
        model = _identity_blocks(dataclasses.replace(BASE, dropout=0.5, stem_dropout=stem_dropout))
        stem = ENCODE(model, X, key)[0]
        # Not all channels of a sample dropped at the stem: the downsampled input is nonzero everywhere.
        assert np.all(np.asarray(stem).reshape(3, -1, 8).any(axis=1).any(axis=1))
        bottleneck = np.asarray(ENCODE(model, X, key)[-1])
        masks.append(bottleneck == 0)
    assert 0.3 < masks[0].mean() < 0.7
    np.testing.assert_array_equal(masks[0], masks[1])
    # Stem dropout on a model without bottleneck dropout changes only what it should.
    model = _identity_blocks(dataclasses.replace(BASE, stem_dropout=0.5))
    assert not np.array_equal(ENCODE(model, X, key)[-1], ENCODE_PLAIN(model, X)[-1])


def test_stem_dropout_is_validated():
    with pytest.raises(ValueError, match="stem_dropout"):
        UNetConfig(stem_dropout=1.0)
    ModelConfig(stem_dropout=0.2).validate("model")
    with pytest.raises(ConfigError, match="stem_dropout"):
        ModelConfig(stem_dropout=1.0).validate("model")
