"""Segmentation losses, vectorised over the batch, with padding masked out.

Two output conventions, both scored on the nested regions WT, TC, ET:

- region outputs: one sigmoid channel per region (`labels.REGIONS` order),
  loss soft Dice + binary cross-entropy (M3AE, the common choice);
- label outputs: softmax over the 4 internal labels, loss weighted
  cross-entropy + soft Dice over the foreground labels (RIRN, Mind the Gap);
  `rfnet_loss`, RFNet's and mmFormer's criterion (per-sample class-weighted CE +
  a batch Dice over all four labels), which ACDIS follows,

and `masked_mse` for image reconstruction (M3AE's pretraining).

Every loss takes `valid` (N, D, H, W) bool: False voxels (crop padding)
contribute nothing. Soft Dice is computed per sample and channel,
``1 - (2 sum(p g) + smooth) / (sum(p) + sum(g) + smooth)``, then averaged
over the samples and averaged or summed over the channels (`channels`:
"mean", or "sum" as ACN's code on which RIRN builds); ``batch_dice`` sums over
the batch first (nnU-Net's option). `squared_soft_dice_loss` is V-Net's form
(Milletari et al. 2016), squares in the denominator,
``1 - (2 sum(p g) + smooth) / (sum(p^2) + sum(g^2) + smooth)``, which the
public M3AE code uses with smooth 1 (`region_loss(squared_dice=True)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxbrats.labels import NUM_LABELS, regions_of

SMOOTH = 1e-5


DICE_CHANNELS = ("mean", "sum")


def soft_dice_loss(
    probs,
    targets,
    valid,
    smooth: float = SMOOTH,
    batch_dice: bool = False,
    channels: str = "mean",
    squared: bool = False,
):
    """Soft Dice loss, mean over samples, mean or sum over channels; probs and targets (N, ..., C).
    `squared`: V-Net's denominator sum(p^2) + sum(g^2) instead of sum(p) + sum(g)."""
    w = valid[..., None].astype(probs.dtype)
    axes = tuple(range(0 if batch_dice else 1, probs.ndim - 1))
    intersection = jnp.sum(probs * targets * w, axis=axes)
    power = 2 if squared else 1
    total = jnp.sum(probs**power * w, axis=axes) + jnp.sum(targets**power * w, axis=axes)
    per_channel = jnp.mean(
        jnp.reshape(1.0 - (2.0 * intersection + smooth) / (total + smooth), (-1, probs.shape[-1])), axis=0
    )
    return jnp.sum(per_channel) if channels == "sum" else jnp.mean(per_channel)


def squared_soft_dice_loss(
    probs, targets, valid, smooth: float = 1.0, batch_dice: bool = False, channels: str = "mean"
):
    """`soft_dice_loss` with V-Net's squared denominator, 1 - (2 sum(p g) + smooth) / (sum(p^2) + sum(g^2) + smooth);
    default smooth 1 (the public M3AE code's)."""
    return soft_dice_loss(probs, targets, valid, smooth, batch_dice, channels, squared=True)


def _masked_mean(values, valid):
    w = valid.astype(values.dtype)
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def region_loss(
    logits,
    labels,
    valid,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    batch_dice: bool = False,
    dice_channels: str = "mean",
    squared_dice: bool = False,
    smooth: float = SMOOTH,
):
    """Soft Dice + BCE on sigmoid region outputs; logits (N, D, H, W, 3), labels internal.
    `dice_channels`: the Dice of the three regions averaged ("mean") or summed ("sum");
    `squared_dice`: the squared denominator (`squared_soft_dice_loss`) instead of the linear one;
    `smooth`: the Dice's smoothing term (the public M3AE code's is 1)."""
    logits = logits.astype(jnp.float32)
    targets = regions_of(labels, xp=jnp).astype(jnp.float32)
    dice = soft_dice_loss(
        jax.nn.sigmoid(logits),
        targets,
        valid,
        smooth=smooth,
        batch_dice=batch_dice,
        channels=dice_channels,
        squared=squared_dice,
    )
    bce = _masked_mean(optax.sigmoid_binary_cross_entropy(logits, targets).mean(axis=-1), valid)
    return dice_weight * dice + bce_weight * bce, {"dice_loss": dice, "bce": bce}


def label_loss(
    logits,
    labels,
    valid,
    class_weights=None,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    batch_dice: bool = False,
):
    """Weighted CE + soft Dice (foreground labels) on softmax outputs; logits (N, D, H, W, 4)."""
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if class_weights is not None:
        weights = jnp.asarray(class_weights, jnp.float32)[labels]
        ce = jnp.sum(ce * weights * valid) / jnp.maximum(jnp.sum(weights * valid), 1e-6)
    else:
        ce = _masked_mean(ce, valid)
    probs = jax.nn.softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(labels, NUM_LABELS, dtype=jnp.float32)
    dice = soft_dice_loss(probs[..., 1:], onehot[..., 1:], valid, batch_dice=batch_dice)
    return dice_weight * dice + ce_weight * ce, {"dice_loss": dice, "ce": ce}


def segmentation_loss(output: str, logits, labels, valid, **options):
    """Dispatch on the output convention: "regions" (sigmoid) or "labels" (softmax)."""
    if output == "regions":
        return region_loss(logits, labels, valid, **options)
    return label_loss(logits, labels, valid, **options)


def masked_mse(prediction, target, weight):
    """Mean squared error over the voxels (and channels) where `weight` (broadcastable) is True."""
    w = jnp.broadcast_to(weight, target.shape).astype(jnp.float32)
    error = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.sum(error * w) / jnp.maximum(jnp.sum(w), 1.0)


def rfnet_loss(logits, labels, valid, eps: float = 1e-7, floor: float = 0.005):
    """RFNet's (and mmFormer's) criterion, which ACDIS follows ("in line with [7, 36]"), as in
    their public code: a weighted CE + a soft Dice over all labels, background included.

    CE: each sample weighs label c by 1 - (its voxels of c) / (its voxels), and the loss is
    the mean over voxels of sum_c w_c y_c (-log max(p_c, floor)), floor 0.005 (the code's
    clamp). Dice: 1 - mean_c 2 sum(p_c y_c) / (sum p_c + sum y_c + eps), sums over the whole
    batch, eps 1e-7. Padding (`valid` False) counts nowhere.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    w = valid.astype(jnp.float32)[..., None]
    onehot = jax.nn.one_hot(labels.astype(jnp.int32), NUM_LABELS, dtype=jnp.float32) * w
    spatial = tuple(range(1, onehot.ndim - 1))
    voxels = jnp.maximum(jnp.sum(w, axis=spatial), 1.0)  # (N, 1)
    weights = 1.0 - jnp.sum(onehot, axis=spatial) / voxels  # (N, K)
    weights = weights.reshape(weights.shape[0], *([1] * len(spatial)), weights.shape[1])
    ce = jnp.sum(weights * onehot * -jnp.log(jnp.clip(probs, floor, 1.0))) / jnp.maximum(jnp.sum(w), 1.0)
    axes = tuple(range(onehot.ndim - 1))
    overlap = jnp.sum(probs * onehot, axis=axes)
    dice = 1.0 - jnp.mean(2.0 * overlap / (jnp.sum(probs * w, axis=axes) + jnp.sum(onehot, axis=axes) + eps))
    return ce + dice, {"dice_loss": dice, "ce": ce}
