"""Mind the Gap's anchors (`losses.alignment`) against numpy written from the paper's equations
("Mind the Gap: Promoting Missing Modality Brain Tumor Segmentation with Alignment", arXiv:2409.19366,
Sec. III-B), each a mean over the valid (unpadded) voxels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbrats.losses.alignment import mix_alignment, mix_target, mix_weights, modality_alignment, normal_kl

J = 4


@pytest.fixture
def latents():
    return np.random.default_rng(0).normal(size=(J, 2, 3, 4, 5, 6)).astype(np.float32)


@pytest.fixture
def valid():
    """(N, D, H, W) with padding: the last depth slice of sample 0 and half of sample 1."""
    v = np.ones((2, 3, 4, 5), bool)
    v[0, -1] = False
    v[1, :, :2] = False
    return v


def per_modality_mean(a, valid=None):
    """numpy: each modality's mean over the valid voxels (all channels), or over everything."""
    if valid is None:
        return a.reshape(a.shape[0], -1).mean(axis=1)
    return np.array([a[j][valid].mean() for j in range(a.shape[0])])


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


def test_every_term_counts_the_valid_voxels_only(latents, valid):
    """Padding voxels count in no term: the numpy means over valid voxels, and values there change nothing."""
    rng = np.random.default_rng(3)
    log_var = rng.normal(size=latents.shape).astype(np.float32)
    z = latents.astype(np.float64)
    w = np.array([0.31, 2.21, 0.78, 0.90], np.float32)
    expected = {
        "normal": per_modality_mean(0.5 * (z**2 + np.exp(log_var.astype(np.float64)) - log_var - 1), valid),
        "modality": per_modality_mean((z - z[1]) ** 2, valid),
        "prior": w * per_modality_mean((z[1][None] - z) ** 2, valid),
        "mixture": w
        * per_modality_mean(((w[:, None] * z.reshape(J, -1)).sum(0).reshape(z.shape[1:]) / w.sum() - z) ** 2, valid),
    }

    def terms(z, lv):
        return {
            "normal": normal_kl(z, lv, valid),
            "modality": modality_alignment(z, 1, valid=valid),
            "prior": mix_alignment(z, jnp.asarray(w), "prior", 1, valid=valid),
            "mixture": mix_alignment(z, jnp.asarray(w), "mixture", 1, valid=valid),
        }

    got = terms(latents, log_var)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, err_msg=name)
    padding = ~valid[None, ..., None]
    moved = terms(np.where(padding, latents + 50.0, latents), np.where(padding, log_var - 9.0, log_var))
    for name in expected:
        np.testing.assert_allclose(moved[name], got[name], rtol=1e-5, err_msg=name)
    # no padding: the plain mean
    np.testing.assert_allclose(
        modality_alignment(latents, 1, valid=np.ones_like(valid)), modality_alignment(latents, 1), rtol=1e-6
    )


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
    np.testing.assert_allclose(
        mix_weights(jnp.asarray(raw, jnp.float32), floor), floor + (J - J * floor) * soft, rtol=1e-5
    )


def test_mix_weights_sum_to_the_set_total_and_reach_the_papers_weights():
    """`total` (method.mix_sum): the weights sum to it, each in [floor, total - 3 floor]; the paper's
    learned weights (T1 0.7759, T2 0.8977, T1ce 2.2055, FLAIR 0.3055, sum 4.1846) are in that range."""
    paper = np.array([0.3055, 2.2055, 0.7759, 0.8977])  # MODALITIES order: flair, t1ce, t1, t2
    total, floor = float(paper.sum()), 0.1
    raw = np.log(paper - floor)  # softmax(raw) = (w - floor) / (total - 4 floor)
    np.testing.assert_allclose(mix_weights(jnp.asarray(raw, jnp.float32), floor, total), paper, rtol=1e-5)
    for r in [np.zeros(J), np.array([1e4, -1e4, -1e4, -1e4])]:
        w = np.asarray(mix_weights(jnp.asarray(r, jnp.float32), floor, total))
        np.testing.assert_allclose(w.sum(), total, rtol=1e-5)
        assert w.min() >= floor - 1e-6 and w.max() <= total - 3 * floor + 1e-5
    np.testing.assert_allclose(mix_weights(jnp.zeros(J), floor, total), np.full(J, total / J), rtol=1e-6)


def test_mix_weights_cannot_collapse_under_the_optimiser(latents):
    """Gradient descent on the raw weights alone, at a huge rate, ends inside the bounds."""
    floor = 0.1
    raw = jnp.zeros(J)

    def loss(r):
        return jnp.sum(mix_alignment(jnp.asarray(latents), mix_weights(r, floor)))

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


@pytest.mark.parametrize("hold", [True, False])
def test_with_the_mixture_target_holding_it_changes_no_gradient(latents, valid, hold):
    """Z* = sum w_j Z_j / sum w minimises sum_j w_j ||Z - Z_j||^2, so the term's gradient through Z*
    is zero: held or live, the latents' and the weights' gradients are the same (and the weights'
    is each modality's residual). With the prior target, holding it does change the anchor's."""
    z = jnp.asarray(latents)
    w = jnp.asarray([0.7, 2.0, 0.5, 0.8])

    def grads(target, held):
        return jax.grad(lambda z, w: jnp.sum(mix_alignment(z, w, target, 1, held, valid)), argnums=(0, 1))(z, w)

    gz, gw = grads("mixture", hold)
    gz_other, gw_other = grads("mixture", not hold)
    np.testing.assert_allclose(gz, gz_other, atol=1e-6)
    np.testing.assert_allclose(gw, gw_other, rtol=1e-5, atol=1e-7)
    goal = np.asarray(mix_target(z, w, "mixture"))
    np.testing.assert_allclose(gw, per_modality_mean((goal[None] - latents) ** 2, valid), rtol=1e-5)
    gz_prior, gw_prior = grads("prior", hold)
    assert (float(jnp.abs(gz_prior[1]).max()) == 0.0) == hold  # the anchor's latent: pulled only when live
    np.testing.assert_allclose(gw_prior, per_modality_mean((latents[1][None] - latents) ** 2, valid), rtol=1e-5)
    assert gw_prior[1] == 0.0  # the prior's own residual is 0: its weight never loses to the others'


def test_mix_weights_learn_only_through_their_coefficients_when_the_target_is_held(latents):
    z = jnp.asarray(latents)
    w = jnp.asarray([1.0, 2.0, 0.5, 0.5])
    grad = jax.grad(lambda w: jnp.sum(mix_alignment(z, w, "mixture", hold_target=True)))(w)
    goal = np.asarray(mix_target(z, w, "mixture"))
    np.testing.assert_allclose(grad, per_modality_mean((goal[None] - latents) ** 2), rtol=1e-5)
