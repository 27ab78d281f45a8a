"""Mind the Gap's anchors (`losses.alignment`) against numpy written from the paper's equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbrats.losses.alignment import mix_alignment, mix_target, mix_weights, modality_alignment, normal_kl

J = 4


@pytest.fixture
def latents():
    return np.random.default_rng(0).normal(size=(J, 2, 3, 4, 5, 6)).astype(np.float32)


def per_modality_mean(a):
    return a.reshape(a.shape[0], -1).mean(axis=1)


def test_normal_kl_is_the_vae_term(latents):
    log_var = np.random.default_rng(1).normal(size=latents.shape).astype(np.float32)
    var = np.exp(log_var.astype(np.float64))
    expected = per_modality_mean(0.5 * (latents.astype(np.float64) ** 2 + var - log_var - 1))
    np.testing.assert_allclose(normal_kl(latents, log_var), expected, rtol=1e-5)
    # the standard normal itself costs nothing
    np.testing.assert_allclose(normal_kl(np.zeros_like(latents), np.zeros_like(latents)), 0.0, atol=1e-7)


@pytest.mark.parametrize("anchor", [0, 1, 3])
def test_modality_anchor_is_the_mse_to_z_k(latents, anchor):
    expected = per_modality_mean((latents.astype(np.float64) - latents[anchor]) ** 2)
    got = modality_alignment(latents, anchor)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got[anchor] == 0


def test_a_held_target_gets_no_gradient(latents):
    grad = jax.grad(lambda z: jnp.sum(modality_alignment(z, 1, hold_target=True)))(jnp.asarray(latents))
    assert float(jnp.abs(grad[1]).max()) == 0.0
    assert float(jnp.abs(grad[0]).max()) > 0
    live = jax.grad(lambda z: jnp.sum(modality_alignment(z, 1, hold_target=False)))(jnp.asarray(latents))
    assert float(jnp.abs(live[1]).max()) > 0  # a live target is pulled towards the others


def test_mix_weights_sum_to_j_within_bounds_whatever_the_parameters():
    floor = 0.1
    rng = np.random.default_rng(2)
    for raw in [np.zeros(J), rng.normal(size=J) * 50, np.array([1e4, -1e4, -1e4, -1e4]), np.array([-1e4] * 3 + [0.0])]:
        w = np.asarray(mix_weights(jnp.asarray(raw, jnp.float32), floor))
        np.testing.assert_allclose(w.sum(), J, rtol=1e-5)
        assert (w >= floor - 1e-6).all() and (w <= J - (J - 1) * floor + 1e-5).all()
    np.testing.assert_allclose(mix_weights(jnp.zeros(J), floor), np.ones(J), rtol=1e-6)
    # the numpy formula: floor + (J - J floor) softmax
    raw = rng.normal(size=J)
    soft = np.exp(raw) / np.exp(raw).sum()
    np.testing.assert_allclose(mix_weights(jnp.asarray(raw, jnp.float32), floor), floor + (J - J * floor) * soft, rtol=1e-5)


def test_mix_weights_cannot_collapse_under_the_optimiser(latents):
    """Gradient descent on the raw weights alone, at a huge rate, ends inside the bounds."""
    floor = 0.1
    raw = jnp.zeros(J)
    loss = lambda r: jnp.sum(mix_alignment(jnp.asarray(latents), mix_weights(r, floor)))
    for _ in range(200):
        raw = raw - 100.0 * jax.grad(loss)(raw)
    w = np.asarray(mix_weights(raw, floor))
    assert w.min() >= floor - 1e-6 and abs(w.sum() - J) < 1e-4


@pytest.mark.parametrize("target", ["mixture", "prior"])
def test_mix_alignment_against_numpy(latents, target):
    w = np.array([0.31, 2.21, 0.78, 0.90], np.float32)  # the paper's learned weights, in MODALITIES order
    z = latents.astype(np.float64)
    goal = (w[:, None] * z.reshape(J, -1)).sum(0).reshape(z.shape[1:]) / w.sum() if target == "mixture" else z[1]
    expected = w * per_modality_mean((goal[None] - z) ** 2)
    np.testing.assert_allclose(mix_alignment(latents, jnp.asarray(w), target, anchor=1), expected, rtol=1e-5)
    np.testing.assert_allclose(mix_target(latents, jnp.asarray(w), target, anchor=1), goal, rtol=1e-5, atol=1e-6)


def test_mix_weights_learn_only_through_their_coefficients_when_the_target_is_held(latents):
    z = jnp.asarray(latents)
    w = jnp.asarray([1.0, 2.0, 0.5, 0.5])
    grad = jax.grad(lambda w: jnp.sum(mix_alignment(z, w, "mixture", hold_target=True)))(w)
    goal = np.asarray(mix_target(z, w, "mixture"))
    np.testing.assert_allclose(grad, per_modality_mean((goal[None] - latents) ** 2), rtol=1e-5)
