"""AFEB's global attention computed in blocks of queries: full attention's result, memory chunk x
tokens, and `model.remat` covering AFEB."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxbrats.networks.acdis import AFEB, MonoEncoder, chunked_attention
from jaxbrats.networks.unet import UNetConfig


def reference_attention(q, k, v):
    """softmax(Q K^T / sqrt(d)) V per sample and head, in float64 numpy: (N, T, heads, d) arrays."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("nthd,nshd->nhts", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("nhts,nshd->nthd", weights, v)


def qkv(tokens: int, heads: int = 2, depth: int = 8, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(key, (2, tokens, heads, depth), jnp.float32) for key in keys]


@pytest.mark.parametrize("chunk", [0, 8, 16, 64])
def test_chunked_attention_is_the_attention_equation(chunk):
    """37 tokens: blocks of 8 and 16 leave a partial block (zero-padded queries), 64 and 0 are one block."""
    q, k, v = qkv(37)
    out = jax.jit(chunked_attention, static_argnums=3)(q, k, v, chunk)
    assert out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_chunked_attention_gradients_equal_unchunked():
    q, k, v = qkv(37, seed=1)
    weight = jax.random.normal(jax.random.PRNGKey(2), q.shape)

    def loss(chunk):
        return jax.grad(lambda *a: jnp.sum(chunked_attention(*a, chunk) * weight), argnums=(0, 1, 2))(q, k, v)

    for whole, blocked in zip(loss(0), jax.jit(lambda: loss(8))()):
        np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=1e-4, atol=1e-5)


def test_chunked_attention_memory_is_linear_in_tokens():
    """XLA's account of the gradient program: the whole T^2 logits (16 MiB at 2048 tokens) against
    a block's 128 x T (1 MiB)."""

    def temporaries(chunk: int) -> int:
        q, k, v = (jax.ShapeDtypeStruct((1, 2048, 1, 16), jnp.float32) for _ in range(3))
        grad = jax.grad(lambda q, k, v: jnp.sum(chunked_attention(q, k, v, chunk) ** 2), argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    whole, blocked = temporaries(0), temporaries(128)
    assert whole >= 2048**2 * 4  # the logits, at least once
    assert blocked < whole / 4


def afeb_config(**changes) -> UNetConfig:
    return dataclasses.replace(UNetConfig(in_channels=1, widths=(16, 32), blocks=(1, 1)), **changes)


def test_afeb_with_chunked_attention_equals_whole_attention():
    """A 6^3 grid pooled by 2: 27 tokens, blocks of 8 (a partial last block)."""
    whole = AFEB(32, 2, afeb_config(), nnx.Rngs(0), attention_chunk=0)
    blocked = AFEB(32, 2, afeb_config(), nnx.Rngs(0), attention_chunk=8)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 6, 6, 6, 32))
    np.testing.assert_allclose(np.asarray(blocked(x)), np.asarray(whole(x)), rtol=1e-5, atol=1e-5)


REMAT_PRIMITIVES = {"checkpoint", "remat", "remat2"}  # jax.checkpoint's primitive, by jax version


def rematerialised_calls(remat: bool) -> int:
    """jax.checkpoint calls in the forward program of a mono encoder with two levels, AFEB at both."""
    encoder = MonoEncoder(afeb_config(remat=remat), (0, 1), True, nnx.Rngs(0))
    graphdef, state = nnx.split(encoder)
    x = jnp.ones((1, 8, 8, 8, 1))
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x)["enhanced"])(state, x).jaxpr
    return sum(eqn.primitive.name in REMAT_PRIMITIVES for eqn in jaxpr.eqns)


def test_remat_covers_afeb():
    """With `model.remat` each residual block (one per level) and each AFEB (two) runs under
    jax.checkpoint: the backward pass keeps an AFEB's input only and recomputes the rest. (The
    attention's query blocks are checkpointed too, inside the AFEB, with or without remat.)"""
    assert rematerialised_calls(False) == 0
    assert rematerialised_calls(True) == 2 + 2


def test_the_chunk_is_a_method_option():
    from jaxbrats.errors import ConfigError
    from jaxbrats.methods import get_method, load_config

    small = ["method.name='acdis'", "model.widths=[16,32]", "model.blocks=[1,1]", "data.crop_size=[16,16,16]"]
    config = load_config(None, [*small, "method.afeb_attention_chunk=64"])
    models = nnx.eval_shape(lambda: get_method("acdis")(config).init_models("train", nnx.Rngs(0)))
    assert [block.attention_chunk for block in models["mono"].enhance] == [64, 64]
    with pytest.raises(ConfigError, match="method.afeb_attention_chunk"):
        load_config(None, [*small, "method.afeb_attention_chunk=-1"])
