"""The shared backbone: size against a hand count of the spec, shapes, dtypes, remat, bfloat16."""

import dataclasses
import functools
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

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
    assert [f.shape for f in out["encoder"]] == [
        (2, 16, 16, 16, 8),
        (2, 8, 8, 8, 16),
        (2, 4, 4, 4, 16),
        (2, 2, 2, 2, 32),
    ]
    assert [f.shape[1] for f in out["decoder"]] == [4, 8, 16]
    assert [d.shape for d in out["deep"]] == [(2, 16, 16, 16, 3)] * 2
    decoded = nnx.jit(lambda m, x: m.decoder(m.encoder(x))[0])(
        model, jnp.zeros((2, 16, 16, 16, 4))
    )  # usable separately
    np.testing.assert_allclose(decoded, out["logits"], atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters():
    model = UNet(
        UNetConfig(dtype="bfloat16", upsample="trilinear", widths=(8, 8, 16, 16), blocks=(1, 1, 1, 1)), nnx.Rngs(0)
    )
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
    no_dropout = UNet(UNetConfig(dropout=0.0, widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1)), nnx.Rngs(0))  # same weights
    np.testing.assert_array_equal(plain(model, x), plain(no_dropout, x))  # inference: dropout is off
    assert not np.allclose(run(model, x, jax.random.key(1)), plain(model, x))
    np.testing.assert_array_equal(run(model, x, jax.random.key(1)), run(model, x, jax.random.key(1)))
    assert not np.allclose(run(model, x, jax.random.key(1)), run(model, x, jax.random.key(2)))


def _walk(jaxpr):
    """Every equation of a jaxpr, including those of nested jaxprs (scan and map bodies, jit, remat)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _walk(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _walk(sub)


REMAT_PRIMITIVES = {"checkpoint", "remat", "remat2"}  # jax.checkpoint's primitive, by jax version
TINY = dict(widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1), conv_impl="native")
N_BLOCKS = sum(TINY["blocks"]) + len(TINY["widths"]) - 1  # residual blocks: encoder + one per decoder level


@functools.lru_cache(maxsize=None)
def _remat_program(remat: bool):
    """jit(value_and_grad) of a loss that merges the model and calls it inside lax.scan and lax.map.

    This is how evaluation runs a model (merged in the jitted program, called in the sliding
    window's scan and the 15 subsets' map), with a gradient on top as in training. Returns the
    jaxpr, the compiled program and its arguments.
    """
    graphdef, params, rest = nnx.split(UNet(UNetConfig(remat=remat, **TINY), nnx.Rngs(0)), nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (2, 1, 16, 16, 16, 4))

    def loss(p, x):
        model = nnx.merge(graphdef, p, rest)
        scanned = lax.scan(lambda total, xi: (total + jnp.sum(model(xi)["logits"] ** 2), None), 0.0, x)[0]
        mapped = lax.map(lambda xi: model(xi)["logits"], x)
        return scanned + jnp.sum(jnp.sin(mapped))

    fn = jax.value_and_grad(loss)
    return jax.make_jaxpr(fn)(params, x).jaxpr, jax.jit(fn).lower(params, x).compile(), (params, x)


def test_remat_gives_the_same_gradients_inside_jit_scan_and_map():
    """Remat works on a model merged outside the scan/map it runs in (it used to raise TraceContextError)."""
    results = []
    for remat in (False, True):
        _, compiled, args = _remat_program(remat)
        value, grads = compiled(*args)
        results.append((value, jax.tree.leaves(grads)))
    (v0, g0), (v1, g1) = results
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    assert len(g0) == len(g1)
    # The gradient of a conv bias that feeds a GroupNorm is zero up to rounding noise, so the
    # absolute tolerance is relative to the largest gradient (float32 reassociation, not remat).
    scale = max(float(np.abs(a).max()) for a in g0)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


def test_remat_recomputes_every_block_in_the_backward_pass():
    """Fails when `remat` is ignored: the checkpoint is in the program and XLA keeps its recomputation.

    In the gradient's jaxpr every residual block (7 here) sits in a remat primitive, and the
    backward pass recomputes each block's first convolution (its output feeds the second
    convolution's weight gradient; the second's output is not needed): one more convolution per
    block per call of the model (two calls: scan and map). After XLA's optimisations the compiled
    program still holds more convolutions than without remat (not common-subexpression-eliminated).
    Peak memory is not the check: XLA:CPU's `memory_analysis()` temp size barely moves with remat
    (46.9 vs 46.9 MiB full width at 32^3 native, 758.8 vs 755.5 MiB at 64^3 depth2d).
    """
    (plain, plain_compiled, _), (remat, remat_compiled, _) = _remat_program(False), _remat_program(True)

    def count(jaxpr, names):
        return sum(eqn.primitive.name in names for eqn in _walk(jaxpr))

    checkpoints = count(plain, REMAT_PRIMITIVES), count(remat, REMAT_PRIMITIVES)
    assert checkpoints == (0, 2 * N_BLOCKS)
    convolutions = count(plain, {"conv_general_dilated"}), count(remat, {"conv_general_dilated"})
    assert convolutions[1] == convolutions[0] + 2 * N_BLOCKS, convolutions

    def hlo_convolutions(compiled):  # XLA's convolution op, or cuDNN's custom call on GPU
        return len(re.findall(r"\bconvolution\(|cudnn\$conv", compiled.as_text()))

    compiled = hlo_convolutions(plain_compiled), hlo_convolutions(remat_compiled)
    assert compiled[1] > compiled[0] > 0, compiled


def test_bfloat16_stays_close_to_float32_on_the_same_weights():
    """bfloat16 compute: logits within 3% of the largest float32 logit, probabilities within 0.06.

    Measured (8-channel U-Net, 16^3 normal input, seeds 0-3, nearest/trilinear x native/depth2d):
    max |logit error| / max |logit| 0.008-0.015 (2-4 bfloat16 units of 2^-8), max probability
    error 0.013-0.034. The bounds leave a 2x margin. The outputs differ (bfloat16 is really used).
    """
    base = UNetConfig(widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1))
    g32, _ = nnx.split(UNet(base, nnx.Rngs(0)))
    g16, _ = nnx.split(UNet(dataclasses.replace(base, dtype="bfloat16"), nnx.Rngs(0)))
    run = jax.jit(lambda graphdef, state, x: nnx.merge(graphdef, state)(x)["logits"], static_argnums=0)
    for seed in (0, 1):
        state = nnx.state(UNet(base, nnx.Rngs(seed)))
        x = jax.random.normal(jax.random.key(100 + seed), (1, 16, 16, 16, 4))
        full, half = run(g32, state, x), run(g16, state, x)
        assert full.dtype == jnp.float32 and half.dtype == jnp.bfloat16
        full, half = np.asarray(full, np.float64), np.asarray(half.astype(jnp.float32), np.float64)
        error = np.abs(half - full).max()
        assert 0 < error <= 0.03 * np.abs(full).max(), (seed, error, np.abs(full).max())
        probabilities = np.abs(1 / (1 + np.exp(-half)) - 1 / (1 + np.exp(-full))).max()
        assert probabilities <= 0.06, (seed, probabilities)


def _group_norm_reference(x, scale, bias, groups, eps=1e-5):
    n, d, h, w, c = x.shape
    g = x.astype(np.float64).reshape(n, d, h, w, groups, c // groups)
    mean, var = g.mean(axis=(1, 2, 3, 5), keepdims=True), g.var(axis=(1, 2, 3, 5), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_group_norm_of_a_bfloat16_model_computes_in_float32():
    """A bfloat16 model's GroupNorm: float32 statistics and arithmetic, checked two ways.

    Numerically: on bfloat16 input with mean 10 and std 1, where bfloat16 statistics are far off
    (E[x^2] ~ 101 has a bfloat16 spacing of 0.5, the variance is 1; a mean accumulated in bfloat16
    is worse), the output equals a float64 GroupNorm of the same input to within the bfloat16
    rounding of the output (2^-8 relative, plus 0.01 for float32's E[x^2] - E[x]^2).
    Statistics rounded to bfloat16 miss by ~100x that tolerance; bfloat16 reductions by ~1000x.
    Structurally: in its jaxpr only conversions touch bfloat16 values (XLA:CPU computes bfloat16
    elementwise ops in float32, so a squaring in bfloat16 would not show numerically on CPU).
    """
    model = UNet(UNetConfig(widths=(16, 8, 8, 8), blocks=(1, 1, 1, 1), dtype="bfloat16"), nnx.Rngs(0))
    norm = model.encoder.levels[0][0].norm1
    rng = np.random.default_rng(0)
    norm.norm.scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, 16), jnp.float32)
    norm.norm.bias[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
    x = jnp.asarray(10 + rng.normal(size=(1, 16, 16, 16, 16)), jnp.bfloat16)
    got = nnx.jit(lambda m, x: m(x))(norm, x)
    assert got.dtype == jnp.bfloat16
    want = _group_norm_reference(
        np.asarray(x.astype(jnp.float32)), np.asarray(norm.norm.scale[...]), np.asarray(norm.norm.bias[...]), 8
    )
    error = np.abs(np.asarray(got.astype(jnp.float32), np.float64) - want)
    excess = error - (2.0**-8 * np.abs(want) + 0.01)
    assert excess.max() <= 0, f"max error {error.max():.3g}, over the tolerance by {excess.max():.3g}"

    jaxpr = jax.make_jaxpr(lambda x: norm(x))(x).jaxpr
    touching = {
        eqn.primitive.name
        for eqn in _walk(jaxpr)
        if any(getattr(v.aval, "dtype", None) == jnp.bfloat16 for v in eqn.invars if hasattr(v, "aval"))
    }
    assert touching == {"convert_element_type"}, touching
    assert any(eqn.primitive.name == "reduce_sum" and eqn.invars[0].aval.dtype == jnp.float32 for eqn in _walk(jaxpr))
