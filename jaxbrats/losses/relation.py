"""RIRN's relational distillation losses (paper sections 3.3-3.4, eqs. 2-7).

Features are channels-last, (N, D, H, W, C); region maps are (N, D, H, W, R)
with R regions in `labels.REGIONS` order (WT, TC, ET). Everything is
vectorised over the batch and computed in float32.

- CRR (class-relative relation): one centre per tumour region (eq. 2), under
  a mask of the voxels the teacher gets right (eq. 3); the relation graph is
  the cosine between centres (eq. 4); the loss is the L1 distance between the
  teacher's and the student's graphs (eq. 5).
- CAR (class-agnostic relation): a non-local (embedded Gaussian) relation
  matrix between every pair of voxels (eq. 6); the loss is the squared
  distance between the two matrices over C * V (eq. 7). Quadratic in the
  voxel count: see `car_memory_bytes`.

The teacher is trained by Dice only (paper 3.6), so each loss stops the
gradient at the teacher's features.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Full float32 products: on GPUs the default float32 matmul may run in TF32
# (about 3 significant digits), and the CAR softmax exponentiates its logits.
_PRECISION = jax.lax.Precision.HIGHEST


def region_masks(teacher_probs, gt_regions, threshold: float = 0.5, filtered: bool = True):
    """Eq. 3: M_r = 1(P_r^T > threshold) AND GT_r, per region; (N, D, H, W, R) float32.

    `teacher_probs` are the teacher's region probabilities and `gt_regions` the
    ground-truth regions (bool or 0/1; a value counts as inside above 0.5, so
    an interpolated map also works), both at the feature's resolution.
    ``filtered=False`` gives M_r = GT_r: "CRR without MF" (manual filtering)
    of the paper's Table 4. The paper's lambda is 0.5.
    """
    inside = jnp.asarray(gt_regions).astype(jnp.float32) > 0.5
    if filtered:
        inside = inside & (jnp.asarray(teacher_probs).astype(jnp.float32) > threshold)
    return inside.astype(jnp.float32)


def resize_to_features(regions, shape):
    """Bring (N, D, H, W, ...) maps to a feature map's spatial `shape` (D', H', W').

    Identity when the shapes are equal. When the feature is coarser, each
    factor D / D' must be an integer s, and the map is sampled nearest-style
    with stride s from the first voxel of each block: that voxel is the centre
    of a stride-s "same"-padded convolution's window, and binary maps stay
    binary (an average would blur the region boundaries). A finer feature map
    (upsampling) is not supported: the paper takes CRR at the penultimate,
    full-resolution layer.
    """
    spatial = tuple(regions.shape[1:4])
    shape = tuple(int(s) for s in shape)
    if spatial == shape:
        return regions
    strides = []
    for size, target in zip(spatial, shape):
        if target > size or size % target:
            raise ValueError(
                f"cannot sample a {spatial} map onto features of {shape}: each factor must be an integer >= 1"
            )
        strides.append(size // target)
    return regions[:, :: strides[0], :: strides[1], :: strides[2]]


def region_centres(features, masks, eps: float = 1e-6):
    """Eq. 2: c_r = sum_v f_v M_rv / sum_v M_rv; returns centres (N, R, C) float32 and present (N, R) bool.

    A region is present in a sample when sum M_r > 0. An empty region's
    centre is 0: the denominator is max(sum M_r, eps), so nothing divides by
    zero and no gradient is NaN (its numerator is 0 too).
    """
    f = features.astype(jnp.float32)
    m = masks.astype(jnp.float32)
    sums = jnp.einsum("ndhwc,ndhwr->nrc", f, m, precision=_PRECISION)
    counts = jnp.sum(m, axis=(1, 2, 3))
    return sums / jnp.maximum(counts, eps)[..., None], counts > 0


def _pair_mask(present):
    """(N, R, R) bool: ordered pairs i != j with both regions present."""
    r = present.shape[-1]
    off_diagonal = ~jnp.eye(r, dtype=bool)
    return present[:, :, None] & present[:, None, :] & off_diagonal


def crr_graph(centres, present, eps: float = 1e-8):
    """Eq. 4: g_ij = cos(c_i, c_j) for i != j; (N, R, R) float32.

    Norms are clamped at `eps` (cos = c_i . c_j / (max(|c_i|, eps) max(|c_j|, eps))),
    computed as sqrt(max(|c|^2, eps^2)) so an all-zero centre has a finite
    gradient. The diagonal and every pair with an absent region are set to 0:
    they are not edges of the graph.
    """
    c = centres.astype(jnp.float32)
    norms = jnp.sqrt(jnp.maximum(jnp.sum(c * c, axis=-1, keepdims=True), eps * eps))
    unit = c / norms
    cosine = jnp.einsum("nic,njc->nij", unit, unit, precision=_PRECISION)
    return jnp.where(_pair_mask(present), cosine, 0.0)


def crr_loss(teacher_features, student_features, masks):
    """Eq. 5: L_CRR = sum_{i != j} |g^T_ij - g^S_ij| per sample, then the mean over the batch.

    `masks` (N, D, H, W, R) come from `region_masks` (teacher-filtered) at the
    features' resolution; the SAME mask gives the teacher's and the student's
    centres, so both graphs describe the same voxels. The paper's M = 3
    regions give 6 ordered pairs (each unordered pair counted twice, as the
    double sum of eq. 5 does).

    Empty region: a pair contributes only when both of its regions are
    present in that sample; otherwise it adds 0 (not NaN), and a sample
    with no region adds 0 to the batch mean. The teacher's features are
    gradient-stopped (the teacher learns from Dice only).

    Returns (loss, {"crr": loss, "crr_pairs": mean number of contributing
    ordered pairs per sample}).
    """
    teacher_features = jax.lax.stop_gradient(teacher_features)
    teacher_centres, present = region_centres(teacher_features, masks)
    student_centres, _ = region_centres(student_features, masks)
    difference = jnp.abs(crr_graph(teacher_centres, present) - crr_graph(student_centres, present))
    loss = jnp.mean(jnp.sum(difference, axis=(1, 2)))
    pairs = jnp.mean(jnp.sum(_pair_mask(present), axis=(1, 2)).astype(jnp.float32))
    return loss, {"crr": loss, "crr_pairs": pairs}


def _embed(f, params):
    """A 1x1x1 convolution on flattened positions: f (N, V, C) @ kernel (C, C') + bias (C',)."""
    out = jnp.einsum("nvc,ck->nvk", f, jnp.asarray(params["kernel"], jnp.float32), precision=_PRECISION)
    if params.get("bias") is not None:
        out = out + jnp.asarray(params["bias"], jnp.float32)
    return out


def car_matrix(features, theta, phi, axis: str = "keys"):
    """Eq. 6: the class-agnostic relation matrix A = softmax(theta(f)^T phi(f)); (N, V, V) float32.

    theta(f) = f W_theta + b_theta and phi(f) = f W_phi + b_phi are 1x1x1
    convolutions, given as {"kernel": (C, C'), "bias": (C',)}; positions are
    flattened to V = D * H * W (row-major), and the logits are
    S_ij = theta(f_i) . phi(f_j).

    The paper writes softmax(e^{theta^T phi}); we read it as the non-local
    block's embedded Gaussian, softmax(theta^T phi), whose own exponential is
    the e^ (exponentiating twice would overflow for any sizeable logit).
    ``axis="keys"`` normalises each row i over j (the non-local block's
    choice, the default); ``axis="queries"`` normalises each column j over i.
    """
    if axis not in ("keys", "queries"):
        raise ValueError(f"axis must be 'keys' or 'queries', not {axis!r}")
    n = features.shape[0]
    f = features.astype(jnp.float32).reshape(n, -1, features.shape[-1])
    logits = jnp.einsum("nik,njk->nij", _embed(f, theta), _embed(f, phi), precision=_PRECISION)
    return jax.nn.softmax(logits, axis=-1 if axis == "keys" else -2)


def car_loss(teacher_features, student_features, theta, phi, axis: str = "keys"):
    """Eq. 7: L_CAR = ||A^T - A^S||_2^2 / (C V) per sample, then the mean over the batch.

    A = `car_matrix` of each network's features with the same embeddings
    theta, phi; C is the channel count of the feature map f (not of the
    embedding) and V = D * H * W, the paper's C H W D. Teacher and student
    features must have the same shape. The teacher's features are
    gradient-stopped; theta and phi receive gradients through both matrices.
    Whether they are trained is the caller's choice (the paper does not say):
    trained only by this loss they can shrink both matrices toward uniform
    rows and the loss toward 0, which frozen embeddings cannot.

    Returns (loss, {"car": loss}).
    """
    if teacher_features.shape != student_features.shape:
        raise ValueError(
            f"teacher features {teacher_features.shape} and student features {student_features.shape} differ"
        )
    teacher = car_matrix(jax.lax.stop_gradient(teacher_features), theta, phi, axis)
    student = car_matrix(student_features, theta, phi, axis)
    channels, positions = student_features.shape[-1], math.prod(student_features.shape[1:4])
    per_sample = jnp.sum(jnp.square(teacher - student), axis=(1, 2)) / (channels * positions)
    loss = jnp.mean(per_sample)
    return loss, {"car": loss}


def car_memory_bytes(shape, batch: int = 1, dtype_bytes: int = 4) -> int:
    """Bytes of one CAR relation matrix, V^2 * batch * dtype_bytes, for a feature map of spatial `shape`.

    The loss holds at least two (teacher and student) plus their softmax
    intermediates and, when differentiated, the student's backward pass.
    """
    positions = math.prod(int(s) for s in shape)
    return positions * positions * int(batch) * int(dtype_bytes)
