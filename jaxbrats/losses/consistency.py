"""ACDIS's feature losses (Zhang et al., "Anatomical Consistency Distillation and Inconsistency
Synthesis for Brain Tumor Segmentation with Missing Modalities", ECAI 2024, arXiv:2408.13733;
Secs. 3.1.1 and 3.2).

The paper's:

- ACCT, the anatomical consistency constraints between a mono-modal feature
  f_m and the multi-modal feature f_Aux, both passed through a sigmoid first
  ("we use Sigmoid function to normalize ... before Equations 1 and 3"), with
  f_Aux "fixed to serve as the label" (its gradient is stopped here):
  L_var = 1 - (2 s_m s_Aux + eps) / (s_m^2 + s_Aux^2 + eps)   (eq. 1),
  L_covar = 1 - (|cov(m, Aux)| + eps) / (s_m s_Aux + eps)     (eq. 3),
  L_ACCT = L_var + L_covar                                     (eq. 4),
  eps = 1e-6, variances and covariance unbiased, 1/(n - 1) (eq. 2), over a
  local window. The absolute value lets a window whose trend is reversed
  (FLAIR against T1ce) count as consistent: only the magnitude is distilled.
- L_syn (eq. 10), the synthesis loss of MFSB's synthesised features for the
  missing modalities against the full-modality ones. The text says "Mean
  Square Error", eq. 10 prints an unsquared L2 norm: both are here
  (`SYNTHESIS_NORMS`), the MSE by default. The paper stops no gradient in
  it (eq. 12 is a plain sum): by default the target gets one too
  (`stop_target = False`).
- L_MSE and L_KL, the distillation alternatives of Table 2 (no formulas given).

Ours (the paper does not say):

- Windows: cubic, `window`^3 voxels (default 4), `stride` along each spatial
  axis (default: the window, i.e. non-overlapping; at most the window, so
  that no voxel falls between windows). Every voxel is in a window: where the
  windows do not tile an axis, one more window ends at its far edge,
  overlapping its neighbour (a 10-voxel axis with windows of 4: starts 0, 4
  and 6), so every window holds `window`^3 real voxels (zero padding would
  put made-up constant voxels into the statistics). Along an axis shorter
  than the window the window shrinks to that axis, so a small bottleneck
  still has one.
- Statistics per channel (n = window^3, default) or `pooled` over a window's
  channels too (one statistic per window, n = window^3 C).
- Reduction: the mean over samples, windows and channels; leading axes (the
  modality axis M, a level) are kept: a loss has shape features.shape[:-5].
- Numerics: moments from windowed sums of x, y, x^2, y^2, xy in float32
  (separable: one pass per spatial axis), after a (gradient-stopped) shift by
  each sample's mean (per channel, or over all channels when pooled), which
  leaves the moments unchanged but avoids most of the cancellation of
  E[x^2] - E[x]^2; rounding's tiny negative variances are clamped to 0; a
  one-voxel window has variance 0 (n - 1 is floored at 1). s = sqrt(var) is
  safe: a constant window (var = 0, e.g. crop padding) gives s = 0 with a
  zero gradient, so L_var = L_covar = 0 there when the target is constant too.
- L_MSE: mean squared difference of the sigmoid-normalised features (the same
  normalisation as ACCT). L_KL: KL(softmax_c(f_Aux) || softmax_c(f_m)) per
  voxel over channels (the usual feature-map KD reading), mean over samples
  and voxels. The target is gradient-stopped in both (the distillation's
  fixed label, as ACCT's).
- `stop_target = True` (L_syn, and ACCT's terms when they serve as Table 3's
  synthesis losses) makes the full-modality feature a fixed label: the
  synthesis moves towards it, it is not pulled towards the synthesis.

Conventions: channels last, features (..., N, D, H, W, C); a target
broadcasts against the features (it may lack their leading axes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-6
DISTILLATION_LOSSES = ("none", "mse", "kl", "var", "covar", "acct")
SYNTHESIS_NORMS = ("mse", "l2")

_SPATIAL = (-4, -3, -2)  # D, H, W of (..., N, D, H, W, C)
_PER_SAMPLE = (-5, -4, -3, -2, -1)  # N, D, H, W, C: what a loss averages over


def _safe_sqrt(value):
    """sqrt(value) with sqrt(0) = 0 and a zero (not infinite or NaN) gradient there."""
    positive = value > 0
    return jnp.sqrt(jnp.where(positive, value, 1.0)) * positive


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Start voxels of the windows along one axis: every `stride` voxels, and one more ending at
    the far edge where those leave voxels out (`size` <= `length`, `stride` <= `size`)."""
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def _window_mean(values, sizes, stride):
    """Mean over each spatial window of (..., N, D, H, W, C) values (`window_starts` per axis)."""
    for i, size in enumerate(sizes):
        axis = values.ndim - 4 + i
        length = values.shape[axis]
        dims = tuple(size if a == axis else 1 for a in range(values.ndim))
        steps = tuple(stride if a == axis else 1 for a in range(values.ndim))
        tiled = jax.lax.reduce_window(values, 0.0, jax.lax.add, dims, steps, "VALID")
        if len(window_starts(length, size, stride)) > tiled.shape[axis]:  # the window at the far edge
            edge = jnp.sum(jax.lax.slice_in_dim(values, length - size, length, axis=axis), axis=axis, keepdims=True)
            tiled = jnp.concatenate([tiled, edge], axis=axis)
        values = tiled
    return values / (sizes[0] * sizes[1] * sizes[2])


def window_moments(x, y, window: int, stride: int, pooled: bool):
    """Unbiased (1/(n-1), eq. 2) variances of x and y and their covariance in each window.

    x, y: (..., N, D, H, W, C), broadcasting against each other. Windows are
    cubic, `window` voxels a side (shrunk to an axis shorter than that),
    `stride` apart (1 <= stride <= window), plus one ending at the far edge
    of an axis they do not tile (`window_starts`): every voxel is in a
    window. Returns (var_x, var_y, cov), each (..., N, d, h, w, C), or
    (..., N, d, h, w, 1) when `pooled` (one statistic per window over all its
    channels, n = window^3 C).
    """
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be 1..window ({window}) so that every voxel is in a window, not {stride}")
    x, y = jnp.broadcast_arrays(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    sizes = tuple(min(window, s) for s in x.shape[-4:-1])
    # A constant shift per sample leaves every moment as it is; it brings the
    # values near 0 so that E[x^2] - E[x]^2 cancels less in float32. Pooled
    # windows mix channels, so they need one shift for all channels.
    shift_axes = _SPATIAL + ((-1,) if pooled else ())
    x = x - jax.lax.stop_gradient(jnp.mean(x, axis=shift_axes, keepdims=True))
    y = y - jax.lax.stop_gradient(jnp.mean(y, axis=shift_axes, keepdims=True))
    # One windowed pass over the five products (stacked on a new leading axis).
    sums = _window_mean(jnp.stack([x, y, x * x, y * y, x * y]), sizes, stride)
    n = sizes[0] * sizes[1] * sizes[2]
    if pooled:
        sums = jnp.mean(sums, axis=-1, keepdims=True)
        n *= x.shape[-1]
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = sums
    unbias = n / max(n - 1, 1)  # a one-voxel window: variance 0, not 0/0
    var_x = jnp.maximum(mean_xx - mean_x * mean_x, 0.0) * unbias
    var_y = jnp.maximum(mean_yy - mean_y * mean_y, 0.0) * unbias
    cov = (mean_xy - mean_x * mean_y) * unbias
    return var_x, var_y, cov


def _fixed_pair(features, target, normalise: bool, stop_target: bool = True):
    """float32 features and target (gradient-stopped if `stop_target`), sigmoid-normalised if asked."""
    features = jnp.asarray(features, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    if stop_target:
        target = jax.lax.stop_gradient(target)
    if normalise:
        features, target = jax.nn.sigmoid(features), jax.nn.sigmoid(target)
    return features, target


def _per_leading(values):
    """Mean over the last five axes (samples, windows or voxels, channels)."""
    return jnp.mean(values, axis=_PER_SAMPLE)


def acct_loss(
    features,
    target,
    window: int = 4,
    stride: int | None = None,
    pooled: bool = False,
    eps: float = EPS,
    normalise: bool = True,
    stop_target: bool = True,
):
    """ACCT's {"var": L_var (eq. 1), "covar": L_covar (eq. 3)}, each of shape features.shape[:-5].

    `target` (f_Aux) is the fixed label (gradient stopped; `stop_target =
    False` lets it learn too, for Table 3's synthesis terms); both inputs
    pass through a sigmoid first when `normalise` (the paper). Mean over
    samples, windows and channels (or windows only, when `pooled`).
    """
    features, target = _fixed_pair(features, target, normalise, stop_target)
    var_m, var_aux, cov = window_moments(features, target, window, window if stride is None else stride, pooled)
    s_m, s_aux = _safe_sqrt(var_m), _safe_sqrt(var_aux)
    l_var = 1.0 - (2.0 * s_m * s_aux + eps) / (var_m + var_aux + eps)
    l_covar = 1.0 - (jnp.abs(cov) + eps) / (s_m * s_aux + eps)
    return {"var": _per_leading(l_var), "covar": _per_leading(l_covar)}


def feature_mse(features, target, normalise: bool = True):
    """Table 2's L_MSE: mean squared difference of the (sigmoid-normalised) features, per leading axes."""
    features, target = _fixed_pair(features, target, normalise)
    return _per_leading(jnp.square(features - target))


def feature_kl(features, target):
    """Table 2's L_KL: KL(softmax_c(target) || softmax_c(features)) per voxel, mean over samples and voxels."""
    features, target = _fixed_pair(features, target, normalise=False)
    log_t = jax.nn.log_softmax(target, axis=-1)
    log_f = jax.nn.log_softmax(features, axis=-1)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_f), axis=-1, keepdims=True)
    return _per_leading(kl)


def synthesis_loss(synthesised, target, weight, norm: str = "mse", stop_target: bool = False):
    """Eq. 10's L_syn over the counted (modality, sample) pairs; a scalar.

    synthesised, target: (M, N, D, H, W, C); weight (M, N), bool or float: the
    pairs that count (the missing modalities, which MFSB synthesised). The
    paper stops no gradient: the target, the full-modality feature, gets the
    loss's gradient too (pulled towards the synthesis); `stop_target` makes
    it a fixed label (ours). `norm`:

    - "mse" (the text, default): sum of weight x squared error over the
      counted elements / their number (at least 1);
    - "l2" (eq. 10 as printed): per pair, the unsquared L2 norm of the error
      over voxels and channels, averaged over the counted pairs (at least 1).

    No counted pair gives 0.
    """
    if norm not in SYNTHESIS_NORMS:
        raise ValueError(f"norm must be one of {SYNTHESIS_NORMS}, not {norm!r}")
    synthesised = jnp.asarray(synthesised, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    if stop_target:
        target = jax.lax.stop_gradient(target)
    weight = jnp.asarray(weight, jnp.float32)
    squared = jnp.sum(jnp.square(synthesised - target), axis=(-4, -3, -2, -1))  # per pair
    if norm == "mse":
        elements = synthesised.shape[-4] * synthesised.shape[-3] * synthesised.shape[-2] * synthesised.shape[-1]
        return jnp.sum(weight * squared) / jnp.maximum(jnp.sum(weight) * elements, 1.0)
    return jnp.sum(weight * _safe_sqrt(squared)) / jnp.maximum(jnp.sum(weight), 1.0)


def consistency_distillation(name: str, features, target, window: int, stride: int | None, pooled: bool):
    """The distillation term `name` (`DISTILLATION_LOSSES`): (loss of shape features.shape[:-5], parts).

    "acct" = L_var + L_covar (eq. 4), "var" and "covar" each alone, "mse" and
    "kl" Table 2's alternatives, "none" zeros. The parts are the terms the
    loss sums (empty for "none").
    """
    if name not in DISTILLATION_LOSSES:
        raise ValueError(f"distillation loss must be one of {DISTILLATION_LOSSES}, not {name!r}")
    lead = jnp.broadcast_shapes(jnp.shape(features), jnp.shape(target))[:-5]
    if name == "none":
        return jnp.zeros(lead, jnp.float32), {}
    if name == "mse":
        parts = {"mse": feature_mse(features, target)}
    elif name == "kl":
        parts = {"kl": feature_kl(features, target)}
    else:
        both = acct_loss(features, target, window, stride, pooled)
        parts = both if name == "acct" else {name: both[name]}
    return sum(parts.values()), parts
