"""Losses against plain numpy references written from the equations (float64, plainly vectorised).

The references below call nothing of jaxbrats: the regions, the soft Dice, the
BCE and the CE are written out here. Every batch has padding voxels (`valid`
False) and each test checks that a reference ignoring them gives another
value, so a loss that counted padding would fail.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbrats.labels import labels_from_regions, region_probs_from_label_probs, regions_of
from jaxbrats.losses import label_loss, region_loss, segmentation_loss, soft_dice_loss
from jaxbrats.losses.segmentation import rfnet_loss

SMOOTH = 1e-5  # the soft Dice smoothing of the equation (not imported: the reference states it)


# --- numpy references ----------------------------------------------------------------------


def sigmoid_reference(z):
    """s(z) = 1 / (1 + exp(-z)), float64."""
    return 1 / (1 + np.exp(-np.asarray(z, np.float64)))


def softmax_reference(z):
    """softmax(z)_k = exp(z_k) / sum_j exp(z_j) over the last axis, float64."""
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def regions_reference(labels):
    """Region targets (..., 3) of internal labels: WT = {1, 2, 3}, TC = {1, 3}, ET = {3}; float64."""
    lab = np.asarray(labels)
    return np.stack([(lab == 1) | (lab == 2) | (lab == 3), (lab == 1) | (lab == 3), lab == 3], axis=-1).astype(
        np.float64
    )


def onehot_reference(labels, k=4):
    """g[..., c] = 1 if label == c else 0; float64."""
    lab = np.asarray(labels)
    return np.stack([lab == c for c in range(k)], axis=-1).astype(np.float64)


def dice_reference(p, g, valid, batch_dice=False):
    """Soft Dice loss.

    Per sample n and channel c: L_nc = 1 - (2 sum_v p g + 1e-5) / (sum_v p + sum_v g + 1e-5),
    the sums over the valid voxels v of sample n; the loss is the mean of L_nc over (n, c).
    batch_dice: the sums run over the valid voxels of every sample (one L_c per channel), then
    the mean over c.
    """
    p, g, valid = np.asarray(p, np.float64), np.asarray(g, np.float64), np.asarray(valid, bool)
    groups = [list(range(p.shape[0]))] if batch_dice else [[n] for n in range(p.shape[0])]
    losses = []
    for samples in groups:
        for c in range(p.shape[-1]):
            pv = np.concatenate([p[n][..., c][valid[n]] for n in samples])  # the valid voxels only
            gv = np.concatenate([g[n][..., c][valid[n]] for n in samples])
            losses.append(1 - (2 * np.sum(pv * gv) + SMOOTH) / (np.sum(pv) + np.sum(gv) + SMOOTH))
    return float(np.mean(losses))


def bce_reference(z, g, valid):
    """Binary cross-entropy mean over valid voxels v and channels c: -(g log s(z) + (1 - g) log(1 - s(z)))."""
    s = sigmoid_reference(z)
    g = np.asarray(g, np.float64)
    bce = -(g * np.log(s) + (1 - g) * np.log(1 - s))
    return float(bce[np.asarray(valid, bool)].mean())


def ce_reference(z, labels, valid, class_weights=None):
    """Cross-entropy: sum_v w_{y_v} (-log softmax(z_v)_{y_v}) / sum_v w_{y_v} over valid voxels v; w = 1 unweighted."""
    logp = np.log(softmax_reference(z))
    labels, valid = np.asarray(labels, int), np.asarray(valid, bool)
    w = np.ones(4) if class_weights is None else np.asarray(class_weights, np.float64)
    nll = -np.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    w = w[labels] * valid
    return float(np.sum(w * nll) / np.sum(w))


def region_reference(z, labels, valid, dice_weight=1.0, bce_weight=1.0, batch_dice=False):
    """Region loss (M3AE): dice_weight * soft Dice(s(z), regions) + bce_weight * BCE(z, regions);
    returns (total, dice, bce)."""
    g = regions_reference(labels)
    dice = dice_reference(sigmoid_reference(z), g, valid, batch_dice)
    bce = bce_reference(z, g, valid)
    return dice_weight * dice + bce_weight * bce, dice, bce


def label_reference(z, labels, valid, class_weights=None, dice_weight=1.0, ce_weight=1.0, batch_dice=False):
    """Label loss: ce_weight * CE + dice_weight * soft Dice over the foreground labels 1..3 of softmax(z);
    (total, dice, ce)."""
    dice = dice_reference(softmax_reference(z)[..., 1:], onehot_reference(labels)[..., 1:], valid, batch_dice)
    ce = ce_reference(z, labels, valid, class_weights)
    return dice_weight * dice + ce_weight * ce, dice, ce


def _case(seed=0, shape=(2, 4, 5, 3)):
    """Random labels and logits' generator; padding: a slab at the end of depth, more in sample 1;
    sample 1 has little tumour (so Dice pooled over the batch differs from per sample)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, shape).astype(np.uint8)
    labels[1][rng.random(shape[1:]) < 0.7] = 0
    valid = np.ones(shape, bool)
    valid[:, -1] = False  # a slab of padding
    valid[1, :, -2:] = False
    return rng, labels, valid


def _differs(a, b, rtol=1e-3):
    return not np.isclose(float(a), float(b), rtol=rtol)


# --- tests ---------------------------------------------------------------------------------------


def test_region_loss_matches_numpy():
    rng, labels, valid = _case()
    logits = rng.normal(size=labels.shape + (3,)).astype(np.float32)
    loss, parts = region_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid))
    want, want_dice, want_bce = region_reference(logits, labels, valid)
    np.testing.assert_allclose(parts["bce"], want_bce, rtol=1e-5)
    np.testing.assert_allclose(parts["dice_loss"], want_dice, rtol=1e-5)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert _differs(loss, region_reference(logits, labels, np.ones_like(valid))[0])  # padding is exercised


def test_padding_does_not_count():
    rng, labels, valid = _case(1)
    logits = rng.normal(size=labels.shape + (3,)).astype(np.float32)
    garbage = logits.copy()
    garbage[~valid] = 100.0
    a = region_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid))[0]
    b = region_loss(jnp.asarray(garbage), jnp.asarray(labels), jnp.asarray(valid))[0]
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_label_loss_weighted_ce_matches_numpy():
    rng, labels, valid = _case(2)
    logits = rng.normal(size=labels.shape + (4,)).astype(np.float32)
    weights = np.array([0.5, 2.0, 1.0, 3.0])
    loss, parts = label_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid), class_weights=weights)
    want, want_dice, want_ce = label_reference(logits, labels, valid, class_weights=weights)
    np.testing.assert_allclose(parts["ce"], want_ce, rtol=1e-5)
    np.testing.assert_allclose(parts["dice_loss"], want_dice, rtol=1e-5)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert _differs(parts["ce"], ce_reference(logits, labels, valid))  # the weights matter on this batch
    assert _differs(loss, label_reference(logits, labels, np.ones_like(valid), class_weights=weights)[0])


def rfnet_reference(logits, labels, valid):
    """RFNet's criterion (ACDIS's "weighted CE + Dice", [7, 36]) with explicit loops: per sample
    and label c, w = 1 - n_c / n; CE = sum over voxels of w y_c (-log max(p_c, 0.005)) / voxels;
    Dice = 1 - mean over the 4 labels of 2 sum(p y) / (sum p + sum y + 1e-7), sums over the batch."""
    p, y = softmax_reference(logits), onehot_reference(labels)
    ce = 0.0
    for n in range(labels.shape[0]):
        count = valid[n].sum()
        for c in range(4):
            weight = 1.0 - (y[n, ..., c] * valid[n]).sum() / count
            ce += (weight * y[n, ..., c] * -np.log(np.clip(p[n, ..., c], 0.005, 1.0)) * valid[n]).sum()
    ce /= valid.sum()
    dice = 0.0
    for c in range(4):
        overlap = (p[..., c] * y[..., c] * valid).sum()
        dice += 2 * overlap / ((p[..., c] * valid).sum() + (y[..., c] * valid).sum() + 1e-7)
    return ce + 1.0 - dice / 4, 1.0 - dice / 4, ce


def test_rfnet_loss_matches_numpy():
    rng, labels, valid = _case(5)
    logits = (rng.normal(size=labels.shape + (4,)) * 3).astype(np.float32)  # some p below the 0.005 floor
    loss, parts = rfnet_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid))
    want, want_dice, want_ce = rfnet_reference(logits, labels, valid)
    np.testing.assert_allclose(parts["ce"], want_ce, rtol=1e-5)
    np.testing.assert_allclose(parts["dice_loss"], want_dice, rtol=1e-5)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert _differs(loss, rfnet_reference(logits, labels, np.ones_like(valid))[0])  # padding is exercised


def test_label_branch_of_segmentation_loss_is_plain_ce_plus_foreground_dice():
    """segmentation_loss("labels"): softmax CE (plain mean over valid voxels, no weights) + soft Dice on labels 1..3."""
    rng, labels, valid = _case(3)
    logits = rng.normal(size=labels.shape + (4,)).astype(np.float32)
    loss, parts = segmentation_loss("labels", jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid))
    want, want_dice, want_ce = label_reference(logits, labels, valid)
    np.testing.assert_allclose(parts["ce"], want_ce, rtol=1e-5)
    np.testing.assert_allclose(parts["dice_loss"], want_dice, rtol=1e-5)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    # the batch exercises the padding, and the Dice really is over the foreground labels only
    assert _differs(parts["ce"], ce_reference(logits, labels, np.ones_like(valid)))
    assert _differs(
        parts["dice_loss"], dice_reference(softmax_reference(logits), onehot_reference(labels), np.ones_like(valid))
    )
    assert _differs(parts["dice_loss"], dice_reference(softmax_reference(logits), onehot_reference(labels), valid))
    # the "regions" branch is the region loss
    loss, parts = segmentation_loss("regions", jnp.asarray(logits[..., :3]), jnp.asarray(labels), jnp.asarray(valid))
    np.testing.assert_allclose(loss, region_reference(logits[..., :3], labels, valid)[0], rtol=1e-5)


def test_loss_weights_give_the_weighted_sum_of_unweighted_parts():
    rng, labels, valid = _case(4)
    z3 = rng.normal(size=labels.shape + (3,)).astype(np.float32)
    loss, parts = region_loss(jnp.asarray(z3), jnp.asarray(labels), jnp.asarray(valid), dice_weight=0.3, bce_weight=2.5)
    want, want_dice, want_bce = region_reference(z3, labels, valid, dice_weight=0.3, bce_weight=2.5)
    np.testing.assert_allclose(
        [parts["dice_loss"], parts["bce"]], [want_dice, want_bce], rtol=1e-5
    )  # parts stay unweighted
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert _differs(loss, want_dice + want_bce)
    z4 = rng.normal(size=labels.shape + (4,)).astype(np.float32)
    weights = (1.0, 3.0, 0.5, 2.0)
    for opts in (
        {"dice_weight": 0.7, "ce_weight": 1.5},
        {"dice_weight": 2.0, "ce_weight": 0.0, "class_weights": weights},
    ):
        loss, parts = label_loss(jnp.asarray(z4), jnp.asarray(labels), jnp.asarray(valid), **opts)
        want, want_dice, want_ce = label_reference(z4, labels, valid, **opts)
        np.testing.assert_allclose([parts["dice_loss"], parts["ce"]], [want_dice, want_ce], rtol=1e-5)
        np.testing.assert_allclose(loss, want, rtol=1e-5)
        assert _differs(loss, want_dice + want_ce)


@pytest.mark.parametrize("output", ["regions", "labels"])
def test_batch_dice_pools_over_the_batch_before_the_channel_mean(output):
    rng, labels, valid = _case(5)
    channels = 3 if output == "regions" else 4
    logits = rng.normal(size=labels.shape + (channels,)).astype(np.float32)
    loss, parts = segmentation_loss(
        output, jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid), batch_dice=True
    )
    reference = region_reference if output == "regions" else label_reference
    want, want_dice, want_other = reference(logits, labels, valid, batch_dice=True)
    np.testing.assert_allclose(parts["dice_loss"], want_dice, rtol=1e-5)
    np.testing.assert_allclose(parts["bce" if output == "regions" else "ce"], want_other, rtol=1e-5)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert _differs(want_dice, reference(logits, labels, valid)[1])  # per-sample Dice is another value here
    assert _differs(want_dice, reference(logits, labels, np.ones_like(valid), batch_dice=True)[1])  # so is unmasked


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
    np.testing.assert_array_equal(regions_of(labels), regions_reference(labels).astype(bool))
    np.testing.assert_array_equal(labels_from_regions(regions_of(labels)), labels)
    probs = np.eye(4)[labels]
    np.testing.assert_array_equal(region_probs_from_label_probs(probs) > 0.5, regions_of(labels))
