"""Families of stacked models (networks.family) and RIRN's discriminator (networks.discriminator)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxbrats.networks import family
from jaxbrats.networks.discriminator import Discriminator, DiscriminatorConfig
from jaxbrats.networks.unet import UNet, UNetConfig

K = 3
KEYS = jax.random.split(jax.random.PRNGKey(7), K)  # (K, 2) uint32
SIDE = 8


def _cfg(conv_impl="native"):
    return UNetConfig(widths=(8, 8), blocks=(1, 1), groups=4, conv_impl=conv_impl)


def _create(conv_impl="native"):
    return lambda rngs: UNet(_cfg(conv_impl), rngs)


def _leaves(module):
    return jax.tree.leaves(nnx.state(module))


@functools.lru_cache(maxsize=None)
def _family(conv_impl="native"):
    return family.stack(_create(conv_impl), KEYS)


def _inputs(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


def test_stack_equals_separate_creates_bit_for_bit():
    fam = _family()
    assert isinstance(fam, UNet) and family.size(fam) == K
    stacked = _leaves(fam)
    assert len(stacked) == len(_leaves(UNet(_cfg(), nnx.Rngs(0)))) > 0
    assert all(a.shape[0] == K for a in stacked)
    for i in range(K):
        separate = _leaves(_create()(nnx.Rngs(KEYS[i])))
        assert len(separate) == len(stacked)
        for a, b in zip(stacked, separate):
            np.testing.assert_array_equal(a[i], b)


def test_a_members_initialisation_depends_on_its_key_only():
    """Not on K or on its slot (a small module: the same property, less compilation)."""

    def create(rngs):
        return nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.LayerNorm(4, rngs=rngs))

    three, two = _leaves(family.stack(create, KEYS)), _leaves(family.stack(create, KEYS[::-1][:2]))
    for a, b in zip(three, two):
        np.testing.assert_array_equal(a[2], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_member_with_a_traced_index_inside_jit():
    graphdef, state = nnx.split(_family())
    pick = jax.jit(lambda s, i: nnx.state(family.member(nnx.merge(graphdef, s), i)))
    for i in (2, 0):
        got = pick(state, jnp.int32(i))
        want = nnx.state(_create()(nnx.Rngs(KEYS[i])))
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
    assert isinstance(family.member(_family(), 1), UNet)


def test_map_members_equals_a_loop_over_members():
    fam = _family()
    graphdef, state = nnx.split(fam)
    mgraph, _ = nnx.split(family.member(fam, 0))
    single = jax.jit(lambda s, x: nnx.merge(mgraph, s)(x)["logits"])
    each = _inputs(1, (K, 2, SIDE, SIDE, SIDE, 4))  # one batch per member
    shared = _inputs(2, (2, SIDE, SIDE, SIDE, 4))  # the same batch for all
    for xs, in_axes in ((each, 0), (shared, None)):
        run = jax.jit(
            lambda s, x: family.map_members(lambda m, y: m(y)["logits"], nnx.merge(graphdef, s), x, in_axes=in_axes)
        )
        got = run(state, xs)
        assert got.shape == (K, 2, SIDE, SIDE, SIDE, 3)
        for i in range(K):
            want = single(nnx.state(family.member(fam, i)), xs[i] if in_axes == 0 else xs)
            np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_map_members_in_axes_per_argument():
    fam = family.stack(lambda rngs: nnx.Linear(3, 2, rngs=rngs), KEYS)
    x, scale = _inputs(3, (K, 5, 3)), jnp.float32(2.0)
    got = family.map_members(lambda m, a, s: m(a) * s, fam, x, scale, in_axes=(0, None))
    for i in range(K):
        np.testing.assert_allclose(got[i], family.member(fam, i)(x[i]) * 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match="2 arguments"):
        family.map_members(lambda m, a, s: m(a), fam, x, scale, in_axes=(0,))


@pytest.mark.parametrize("conv_impl", ["native", "depth2d"])
def test_gradient_of_the_summed_loss_is_each_members_own_gradient(conv_impl):
    """Members do not interact; depth2d's custom VJP batches under vmap."""
    fam = _family(conv_impl)
    graphdef, params, rest = nnx.split(fam, nnx.Param, ...)
    xs = _inputs(4, (K, 1, SIDE, SIDE, SIDE, 4))

    def own_loss(model, x):
        return jnp.sum(jnp.sin(model(x)["logits"])) + jnp.sum(model(x)["encoder"][-1] ** 2) / 100

    def family_loss(p, x):  # as the engine does: merge traced state inside the differentiated function
        return jnp.sum(family.map_members(own_loss, nnx.merge(graphdef, p, rest), x))

    value, grads = jax.jit(jax.value_and_grad(family_loss))(params, xs)

    mgraph, _, mrest = nnx.split(family.member(fam, 0), nnx.Param, ...)
    member_grad = jax.jit(jax.value_and_grad(lambda p, r, x: own_loss(nnx.merge(mgraph, p, r), x)))
    total = 0.0
    for i in range(K):
        _, p_i, r_i = nnx.split(family.member(fam, i), nnx.Param, ...)
        v_i, g_i = member_grad(p_i, r_i, xs[i])
        total += float(v_i)
        got, want = [a[i] for a in jax.tree.leaves(grads)], jax.tree.leaves(g_i)
        assert len(got) == len(want) > 0
        # A conv bias feeding a GroupNorm has a zero gradient up to rounding: atol relative to the largest.
        scale = max(float(np.abs(w).max()) for w in want)
        assert scale > 0
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(value, total, rtol=1e-5)


def test_eval_shape_of_stack_is_abstract():
    abstract = nnx.eval_shape(lambda: family.stack(_create(), KEYS))
    leaves = _leaves(abstract)
    assert leaves and all(isinstance(a, jax.ShapeDtypeStruct) for a in leaves)
    assert family.size(abstract) == K
    real = _leaves(_family())
    assert [(a.shape, a.dtype) for a in leaves] == [(a.shape, a.dtype) for a in real]
    assert all(a.shape[0] == K for a in leaves)


def test_stack_refuses_bad_keys():
    with pytest.raises(ValueError, match="uint32"):
        family.stack(_create(), jnp.zeros((3, 3), jnp.uint32))
    with pytest.raises(ValueError, match="uint32"):
        family.stack(_create(), jnp.zeros((3, 2), jnp.int32))


# -- the discriminator ------------------------------------------------------------------------------


def _disc_parameters(in_channels, width):
    return 27 * in_channels * width + width + 27 * width * 1 + 1  # two k3 convs: weights + biases


def test_discriminator_shape_dtype_and_parameter_count():
    def count(cfg):
        model = nnx.eval_shape(lambda: Discriminator(cfg, nnx.Rngs(0)))
        return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))

    assert count(DiscriminatorConfig()) == _disc_parameters(3, 64) == 6977
    assert count(DiscriminatorConfig(in_channels=4, width=8)) == _disc_parameters(4, 8)

    x = _inputs(5, (2, 16, 12, 8, 3))
    outs = {}
    for impl in ("native", "depth2d"):
        model = Discriminator(DiscriminatorConfig(width=8, conv_impl=impl), nnx.Rngs(0))
        outs[impl] = nnx.jit(lambda m, x: m(x))(model, x)
        assert outs[impl].shape == (2, 4, 3, 2, 1) and outs[impl].dtype == jnp.float32
    np.testing.assert_allclose(outs["native"], outs["depth2d"], rtol=1e-5, atol=1e-5)
    half = Discriminator(DiscriminatorConfig(width=8, dtype="bfloat16"), nnx.Rngs(0))
    assert nnx.jit(lambda m, x: m(x))(half, x).dtype == jnp.float32


def test_discriminators_stacked_one_per_student():
    def create(rngs):
        return Discriminator(DiscriminatorConfig(width=8, conv_impl="native"), rngs)

    fam = family.stack(create, KEYS)
    assert isinstance(fam, Discriminator) and family.size(fam) == K
    assert fam.conv1.kernel.shape == (K, 3, 3, 3, 3, 8)
    x = _inputs(6, (K, 2, 8, 8, 8, 3))
    got = nnx.jit(lambda f, x: family.map_members(lambda m, y: m(y), f, x))(fam, x)
    assert got.shape == (K, 2, 2, 2, 2, 1)
    single = nnx.jit(lambda m, y: m(y))
    for i in range(K):
        np.testing.assert_allclose(got[i], single(create(nnx.Rngs(KEYS[i])), x[i]), rtol=1e-5, atol=1e-6)
