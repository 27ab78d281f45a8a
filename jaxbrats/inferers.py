"""Sliding-window inference over a whole volume, as one traceable function.

Window positions, blending weights and their normalisation depend only on
static shapes, so they are computed once with numpy and enter the compiled
program as constants; windows are processed `batch` at a time in a
`lax.scan`. Blending is uniform (the papers' public code) or Gaussian
(sigma = `sigma_scale` x window, nnU-Net and MONAI's default 1/8).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BLENDS = ("gaussian", "uniform")


@dataclasses.dataclass(frozen=True)
class SlidingWindowConfig:
    window: tuple[int, int, int] = (128, 128, 128)
    overlap: float = 0.5
    blend: str = "gaussian"
    batch: int = 1  # windows per forward pass
    sigma_scale: float = 0.125

    def __post_init__(self):
        if self.blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {self.blend!r}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")


def axis_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window starts along one axis: evenly strided, the last flush with the end."""
    if size <= window:
        return [0]
    stride = max(int(window * (1 - overlap)), 1)
    count = math.ceil((size - window) / stride) + 1
    return sorted({min(i * stride, size - window) for i in range(count)})


def window_starts(shape, window, overlap: float) -> np.ndarray:
    """(n, 3) int32 start corners covering a volume of `shape` (>= window on each axis)."""
    grids = np.meshgrid(*[axis_starts(s, w, overlap) for s, w in zip(shape, window)], indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=1).astype(np.int32)


def blend_weights(window, blend: str, sigma_scale: float = 0.125) -> np.ndarray:
    if blend == "uniform":
        return np.ones(window, np.float32)
    axes = []
    for w in window:
        x = np.arange(w) - (w - 1) / 2
        axes.append(np.exp(-0.5 * (x / (sigma_scale * w)) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = weights / weights.max()
    # Keep the borders from vanishing (nnU-Net clips to the smallest non-zero value too).
    return np.maximum(weights, 1e-3).astype(np.float32)


def sliding_window(predict, volume, cfg: SlidingWindowConfig, out_channels: int):
    """Blend `predict` over windows of `volume` (D, H, W, C); returns (D, H, W, out_channels) float32.

    `predict` maps (B, *window, C) to (B, *window, out_channels). Axes shorter
    than the window are zero-padded for inference and cropped back.
    """
    shape = volume.shape[:3]
    window = tuple(cfg.window)
    padded = tuple(max(s, w) for s, w in zip(shape, window))
    if padded != shape:
        volume = jnp.pad(volume, [(0, p - s) for p, s in zip(padded, shape)] + [(0, 0)])
    starts = window_starts(padded, window, cfg.overlap)
    weights = blend_weights(window, cfg.blend, cfg.sigma_scale)
    norm = np.zeros(padded, np.float32)
    for s in starts:
        norm[s[0]:s[0] + window[0], s[1]:s[1] + window[1], s[2]:s[2] + window[2]] += weights
    groups = -(-len(starts) // cfg.batch)
    # Pad the last group with repeats of the first window, weighted 0.
    scale = np.zeros(groups * cfg.batch, np.float32)
    scale[: len(starts)] = 1.0
    starts = np.concatenate([starts, np.repeat(starts[:1], groups * cfg.batch - len(starts), 0)])
    starts = starts.reshape(groups, cfg.batch, 3)
    scale = scale.reshape(groups, cfg.batch)
    weights = jnp.asarray(weights)[..., None]
    channels = volume.shape[-1]

    def step(total, group):
        corners, factors = group
        patches = jax.vmap(lambda c: lax.dynamic_slice(volume, (c[0], c[1], c[2], 0), window + (channels,)))(corners)
        out = predict(patches).astype(jnp.float32)
        for b in range(cfg.batch):
            c = corners[b]
            region = lax.dynamic_slice(total, (c[0], c[1], c[2], 0), window + (out_channels,))
            total = lax.dynamic_update_slice(total, region + factors[b] * weights * out[b], (c[0], c[1], c[2], 0))
        return total, None

    total = jnp.zeros(padded + (out_channels,), jnp.float32)
    total, _ = lax.scan(step, total, (jnp.asarray(starts), jnp.asarray(scale)))
    total = total / jnp.asarray(norm)[..., None]
    return total[: shape[0], : shape[1], : shape[2]]
