"""M3AE's fine-tuning segmentation term in its two forms (`method.seg_balance`), against numpy references.

"paper" (default): eqs. 4-5 of "M3AE: Multimodal Representation Learning for Brain Tumor
Segmentation with Missing Modalities" (Liu et al., AAAI 2023, arXiv:2303.05302), a sum over the two
views and three scales of soft Dice + BCE (tests/test_m3ae_losses.py checks it term by term).
"code": the public code's (github.com/ccarliu/m3ae, loss/dice.py `EDiceLoss` as train_18.py calls it
on each deep-supervision output of a batch holding both views): per output,
(0.7 sum_c Dice_c + 0.3 sum_c BCE_c) / 3 over the 3 regions, Dice_c = 1 - (2 sum p g + 1) /
(sum p^2 + sum g^2 + 1) with the sums over the whole batch, BCE_c the mean over the batch's voxels;
the outputs summed with weight 1. Here padding (`valid` False) counts nowhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_losses import _case, regions_reference, sigmoid_reference
from test_m3ae import models_of, tiny
from test_m3ae_losses import FINETUNE_MASKS, LAMBDA, PRESENT_2, finetune_reference, ragged_batch

from jaxbrats.config import ConfigError
from jaxbrats.losses.segmentation import region_loss, squared_soft_dice_loss
from jaxbrats.methods import get_method


def squared_dice_reference(p, g, valid, smooth=1.0, batch_dice=False, channels="mean", power=2):
    """V-Net's soft Dice loss, per sample n (or over the whole batch) and channel c over the valid voxels:
    L_nc = 1 - (2 sum p g + smooth) / (sum p^2 + sum g^2 + smooth); mean over n, mean or sum over c.
    (`power` = 1: the linear denominator, to show that the squares matter.)"""
    p, g, valid = np.asarray(p, np.float64), np.asarray(g, np.float64), np.asarray(valid, bool)
    groups = [list(range(p.shape[0]))] if batch_dice else [[n] for n in range(p.shape[0])]
    table = np.zeros((len(groups), p.shape[-1]))
    for row, samples in enumerate(groups):
        for c in range(p.shape[-1]):
            pv = np.concatenate([p[n][..., c][valid[n]] for n in samples])
            gv = np.concatenate([g[n][..., c][valid[n]] for n in samples])
            table[row, c] = 1 - (2 * np.sum(pv * gv) + smooth) / (np.sum(pv**power) + np.sum(gv**power) + smooth)
    per_channel = table.mean(axis=0)
    return float(per_channel.sum() if channels == "sum" else per_channel.mean())


def code_seg_reference(heads, labels, valid):
    """The public code's fine-tuning segmentation term on outputs `heads` (each (N, D, H, W, 3), one batch: the two
    views of the subjects) against `labels` and `valid` of the same N rows: for each output, a loop over the 3
    regions c of Dice_c (sums over every valid voxel of the whole batch, squared denominator, smooth 1) and BCE_c
    (mean over the same voxels), then (0.7 sum_c Dice_c + 0.3 sum_c BCE_c) / 3; the outputs summed."""
    g = regions_reference(labels)
    v = np.asarray(valid, bool)
    total = 0.0
    for z in heads:
        z = np.asarray(z, np.float64)
        p = sigmoid_reference(z)
        dice = ce = 0.0
        for c in range(3):
            pc, gc = p[..., c][v], g[..., c][v]
            dice += 1 - (2 * np.sum(pc * gc) + 1.0) / (np.sum(pc**2) + np.sum(gc**2) + 1.0)
            ce += np.mean(-(gc * np.log(pc) + (1 - gc) * np.log(1 - pc)))
        total += (0.7 * dice + 0.3 * ce) / 3
    return total


def _differs(a, b, rtol=1e-3):
    return not np.isclose(float(a), float(b), rtol=rtol)


# --- the Dice --------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("channels", ["mean", "sum"])
def test_squared_soft_dice_matches_numpy(batch_dice, channels):
    rng, labels, valid = _case(6)
    p = jax.nn.sigmoid(jnp.asarray(rng.normal(size=labels.shape + (3,)) * 2, jnp.float32))
    g = regions_reference(labels)
    got = squared_soft_dice_loss(
        p, jnp.asarray(g, jnp.float32), jnp.asarray(valid), batch_dice=batch_dice, channels=channels
    )

    def reference(valid=valid, **changes):
        return squared_dice_reference(
            np.asarray(p), g, valid, **{"batch_dice": batch_dice, "channels": channels, **changes}
        )

    np.testing.assert_allclose(got, reference(), rtol=1e-5)
    # the batch exercises the padding, the squares, the smoothing and the pooling
    assert _differs(got, reference(np.ones_like(valid)))
    assert _differs(got, reference(power=1))
    assert _differs(got, reference(smooth=1e-5))
    assert _differs(got, reference(batch_dice=not batch_dice))


def test_region_loss_with_the_squared_dice_is_its_weighted_sum():
    rng, labels, valid = _case(7)
    logits = rng.normal(size=labels.shape + (3,)).astype(np.float32)
    args = (jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(valid))
    loss, parts = region_loss(*args, dice_weight=0.7, bce_weight=0.3, batch_dice=True, squared_dice=True, smooth=1.0)
    want_dice = squared_dice_reference(sigmoid_reference(logits), regions_reference(labels), valid, batch_dice=True)
    np.testing.assert_allclose(parts["dice_loss"], want_dice, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.7 * want_dice + 0.3 * float(parts["bce"]), rtol=1e-5)
    np.testing.assert_allclose(parts["bce"], region_loss(*args)[1]["bce"], rtol=1e-6)  # the BCE is the same


# --- the fine-tuning loss --------------------------------------------------------------------------


def test_seg_balance_defaults_to_the_paper_and_is_checked():
    assert get_method("m3ae")(tiny()).options.seg_balance == "paper"
    with pytest.raises(ConfigError, match=r"method.seg_balance must be one of \['paper', 'code'\], got 'pooled'"):
        tiny("method.seg_balance='pooled'")


@pytest.mark.parametrize("feature", ["bottleneck", "deep_quarter"])
def test_code_balance_is_the_public_codes_loss_on_the_pooled_views(feature):
    """The public code's form equals its formula on a batch of 2 subjects x 2 views with padding; the paper form
    (default) is unchanged on the same batch and models, and the two differ."""
    methods = {
        form: get_method("m3ae")(tiny(f"method.consistency_feature='{feature}'", f"method.seg_balance='{form}'"))
        for form in ("paper", "code")
    }
    default = get_method("m3ae")(tiny(f"method.consistency_feature='{feature}'"))
    models = models_of(methods["code"], "finetune")
    batch = ragged_batch(FINETUNE_MASKS, PRESENT_2, seed=2)
    key = jax.random.PRNGKey(0)
    (paper_total, _, _, _, consistency), out = finetune_reference(models, batch, feature)
    labels, valid = np.asarray(batch["label"]), np.asarray(batch["valid"])
    pooled_labels, pooled_valid = np.concatenate([labels, labels]), np.concatenate([valid, valid])  # both views' rows
    heads = [np.asarray(h) for h in (out["logits"], *out["deep"])]
    assert len(heads) == 3 and heads[0].shape[0] == 4

    total, parts = methods["code"].finetune_loss(models, batch, key)
    want_seg = code_seg_reference(heads, pooled_labels, pooled_valid)
    np.testing.assert_allclose(parts["seg_loss"], want_seg, rtol=1e-5)
    np.testing.assert_allclose(parts["consistency"], consistency, rtol=1e-5)  # the same consistency term
    np.testing.assert_allclose(total, want_seg + LAMBDA * consistency, rtol=1e-5)

    # the views counted once (not each view's loss summed); padding excluded
    per_view = [code_seg_reference([h[rows] for h in heads], labels, valid) for rows in (slice(0, 2), slice(2, 4))]
    assert _differs(parts["seg_loss"], sum(per_view))
    assert _differs(parts["seg_loss"], code_seg_reference(heads, pooled_labels, np.ones_like(pooled_valid)))

    # the default is the paper's form, unchanged (eqs. 4-5, checked term by term in test_m3ae_losses)
    for method in (default, methods["paper"]):
        paper, paper_parts = method.finetune_loss(models, batch, key)
        np.testing.assert_allclose(paper, paper_total, rtol=1e-5)
    assert _differs(total, paper_total)
    # self-distillation against segmentation: stronger in the code's form (2 views x Dice + BCE 1:1 vs 0.7/0.3)
    assert paper_parts["seg_loss"] > 2 * parts["seg_loss"]


def test_code_balance_pools_the_views_in_one_dice():
    """On outputs whose views differ (an untrained U-Net's barely do), the code's form is one Dice over both views'
    voxels, not the mean of each view's loss."""
    method = get_method("m3ae")(tiny("method.seg_balance='code'"))
    batch = ragged_batch(FINETUNE_MASKS, PRESENT_2, seed=3)
    labels, valid = np.asarray(batch["label"]), np.asarray(batch["valid"])
    rng = np.random.default_rng(4)
    shape = (4, *labels.shape[1:], 3)
    heads = [rng.normal(size=shape).astype(np.float32) * scale for scale in (3.0, 1.0, 0.5)]
    for head in heads:  # view 0 (rows 0-1) predicts background, view 1 (rows 2-3) foreground
        head[:2] -= 4.0
        head[2:] += 4.0
    out = {"logits": jnp.asarray(heads[0]), "deep": [jnp.asarray(h) for h in heads[1:]]}
    seg, parts = method.segmentation_terms(out, batch)
    pooled_labels, pooled_valid = np.concatenate([labels, labels]), np.concatenate([valid, valid])
    np.testing.assert_allclose(seg, code_seg_reference(heads, pooled_labels, pooled_valid), rtol=1e-5)
    per_view = [code_seg_reference([h[rows] for h in heads], labels, valid) for rows in (slice(0, 2), slice(2, 4))]
    assert _differs(seg, sum(per_view) / 2, rtol=0.05) and _differs(seg, sum(per_view))
