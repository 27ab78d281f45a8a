"""The shared backbone: size against a hand count of the spec, shapes, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbrats.networks.unet import UNet, UNetConfig, upsample2


def _conv(k, cin, cout):
    return k**3 * cin * cout + cout  # weights + bias


def _block(c):
    return 2 * (2 * c) + 2 * _conv(3, c, c)  # two GroupNorms (scale, bias) + two conv3


def spec_parameter_count(in_ch=4, out_ch=3, deep_supervision=True):
    widths, blocks = (16, 32, 64, 128), (1, 2, 2, 4)
    n = _conv(3, in_ch, 16)
    n += sum(_conv(3, widths[i - 1], widths[i]) for i in range(1, 4))
    n += sum(b * _block(w) for w, b in zip(widths, blocks))
    n += sum(_conv(1, widths[i], widths[i - 1]) + _block(widths[i - 1]) for i in range(1, 4))
    n += _conv(1, 16, out_ch)
    if deep_supervision:
        n += _conv(1, 64, out_ch) + _conv(1, 32, out_ch)
    return n


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_parameter_count_matches_the_spec():
    def count(cfg):  # shapes only: no parameters are materialised
        return sum(int(np.prod(p.shape)) for p in _params(nnx.eval_shape(lambda: UNet(cfg, nnx.Rngs(0)))))

    assert count(UNetConfig(deep_supervision=True)) == spec_parameter_count() == 4_704_505
    assert count(UNetConfig()) == spec_parameter_count(deep_supervision=False)


def test_shapes_of_every_level_and_the_deep_heads():
    model = UNet(UNetConfig(deep_supervision=True, widths=(8, 16, 16, 32), blocks=(1, 1, 1, 1)), nnx.Rngs(0))
    out = nnx.jit(lambda m, x: m(x))(model, jnp.zeros((2, 16, 16, 16, 4)))
    assert out["logits"].shape == (2, 16, 16, 16, 3)
    assert [f.shape for f in out["encoder"]] == [(2, 16, 16, 16, 8), (2, 8, 8, 8, 16), (2, 4, 4, 4, 16), (2, 2, 2, 2, 32)]
    assert [f.shape[1] for f in out["decoder"]] == [4, 8, 16]
    assert [d.shape for d in out["deep"]] == [(2, 16, 16, 16, 3)] * 2
    decoded = nnx.jit(lambda m, x: m.decoder(m.encoder(x))[0])(model, jnp.zeros((2, 16, 16, 16, 4)))  # usable separately
    np.testing.assert_allclose(decoded, out["logits"], atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters():
    model = UNet(UNetConfig(dtype="bfloat16", upsample="trilinear", widths=(8, 8, 16, 16), blocks=(1, 1, 1, 1)), nnx.Rngs(0))
    out = nnx.jit(lambda m, x: m(x))(model, jnp.ones((1, 16, 16, 16, 4)))
    assert out["logits"].dtype == jnp.bfloat16
    assert {p.dtype for p in _params(model)} == {jnp.dtype(jnp.float32)}


def test_nearest_upsampling_repeats_voxels():
    x = jnp.arange(2 * 3 * 2 * 1, dtype=jnp.float32).reshape(1, 2, 3, 2, 1)
    want = np.asarray(x).repeat(2, 1).repeat(2, 2).repeat(2, 3)
    np.testing.assert_array_equal(upsample2(x, "nearest"), want)
    assert upsample2(x, "trilinear").shape == want.shape


def test_dropout_only_with_a_key():
    model = UNet(UNetConfig(dropout=0.5, widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1)), nnx.Rngs(0))
    x = jnp.ones((1, 16, 16, 16, 4))
    run = nnx.jit(lambda m, x, key: m(x, key)["logits"])
    plain = nnx.jit(lambda m, x: m(x)["logits"])
    np.testing.assert_array_equal(plain(model, x), plain(model, x))
    assert not np.allclose(run(model, x, jax.random.key(1)), plain(model, x))


def test_remat_gives_the_same_gradients():
    def grads(remat):
        cfg = UNetConfig(widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1), remat=remat)
        graphdef, params, rest = nnx.split(UNet(cfg, nnx.Rngs(0)), nnx.Param, ...)
        x = jax.random.normal(jax.random.key(1), (1, 16, 16, 16, 4))

        def loss(p):
            return jnp.sum(nnx.merge(graphdef, p, rest)(x)["logits"] ** 2)

        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    for a, b in zip(grads(False), grads(True)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
