"""Losses against plain numpy references written voxel by voxel."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbrats.labels import labels_from_regions, region_probs_from_label_probs, regions_of
from jaxbrats.losses import SMOOTH, label_loss, region_loss, soft_dice_loss


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _case(seed=0, shape=(2, 4, 5, 3)):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, shape).astype(np.uint8)
    valid = np.ones(shape, bool)
    valid[:, -1] = False  # a slab of padding
    return rng, labels, valid


def _dice_reference(p, g, valid):
    losses = []
    for n in range(p.shape[0]):
        for c in range(p.shape[-1]):
            m = valid[n]
            pn, gn = p[n][..., c][m], g[n][..., c][m]
            losses.append(1 - (2 * (pn * gn).sum() + SMOOTH) / (pn.sum() + gn.sum() + SMOOTH))
    return np.mean(losses)


def test_region_loss_matches_numpy():
    rng, labels, valid = _case()
    logits = rng.normal(size=labels.shape + (3,)).astype(np.float32)
    loss, parts = region_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid))
    targets = regions_of(labels).astype(np.float64)
    p = _sigmoid(logits.astype(np.float64))
    bce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
    want_bce = bce[valid].mean()
    want_dice = _dice_reference(p, targets, valid)
    np.testing.assert_allclose(parts["bce"], want_bce, rtol=1e-5)
    np.testing.assert_allclose(parts["dice_loss"], want_dice, rtol=1e-5)
    np.testing.assert_allclose(loss, want_bce + want_dice, rtol=1e-5)


def test_padding_does_not_count():
    rng, labels, valid = _case(1)
    logits = rng.normal(size=labels.shape + (3,)).astype(np.float32)
    garbage = logits.copy()
    garbage[:, -1] = 100.0
    a = region_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid))[0]
    b = region_loss(jnp.asarray(garbage), jnp.asarray(labels), jnp.asarray(valid))[0]
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_label_loss_weighted_ce_matches_numpy():
    rng, labels, valid = _case(2)
    logits = rng.normal(size=labels.shape + (4,)).astype(np.float32)
    weights = np.array([0.5, 2.0, 1.0, 3.0])
    loss, parts = label_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid), class_weights=weights)
    z = logits.astype(np.float64)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, labels[..., None].astype(int), -1)[..., 0]
    w = weights[labels] * valid
    np.testing.assert_allclose(parts["ce"], (nll * w).sum() / w.sum(), rtol=1e-5)
    onehot = np.eye(4)[labels]
    np.testing.assert_allclose(parts["dice_loss"], _dice_reference(np.exp(logp)[..., 1:], onehot[..., 1:], valid), rtol=1e-5)
    np.testing.assert_allclose(loss, parts["ce"] + parts["dice_loss"], rtol=1e-6)


def test_perfect_prediction_has_zero_dice_loss_and_batch_dice_pools():
    g = np.zeros((2, 4, 4, 4, 1), np.float32)
    g[0, :2] = 1
    valid = np.ones((2, 4, 4, 4), bool)
    assert float(soft_dice_loss(jnp.asarray(g), jnp.asarray(g), jnp.asarray(valid))) == pytest.approx(0.0, abs=1e-6)
    p = np.full_like(g, 0.5)
    # Per sample: sample 1 has an empty target, so its Dice is ~0 -> loss ~1; pooled it is one Dice.
    per_sample = float(soft_dice_loss(jnp.asarray(p), jnp.asarray(g), jnp.asarray(valid)))
    pooled = float(soft_dice_loss(jnp.asarray(p), jnp.asarray(g), jnp.asarray(valid), batch_dice=True))
    assert per_sample == pytest.approx(1 - 0.5 * (2 * 16 / (32 + 32)), abs=1e-4)
    assert pooled == pytest.approx(1 - 2 * 16 / (64 + 32), abs=1e-4)


def test_labels_round_trip_through_regions():
    labels = np.arange(4, dtype=np.uint8).reshape(2, 2)
    np.testing.assert_array_equal(labels_from_regions(regions_of(labels)), labels)
    probs = np.eye(4)[labels]
    np.testing.assert_array_equal(region_probs_from_label_probs(probs) > 0.5, regions_of(labels))
