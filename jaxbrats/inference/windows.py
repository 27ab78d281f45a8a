"""Sliding-window inference over a whole volume, as one traceable function.

The window grid tiles a box [0, max(extent, window)) of the volume:
evenly strided starts, the last flush with the box's end (`axis_starts`).
`extent` defaults to the volume's shape (the grid is then static); it may
be data (a traced (3,) array, the unpadded case inside a padded bucket), so
one compiled program serves every case while each case gets the grid of
its own shape: the output inside the box does not depend on how far the
volume was padded beyond it (the evaluation's bucket). Windows are
processed `batch` at a time in a loop whose trip count is the number of
windows of the box; the blend normalisation is accumulated alongside.
`sliding_window_stack` blends several outputs of each window (the 15-subset
evaluation's subsets) on the same grid, with one shared normalisation.
Blending is uniform (the papers' public code) or Gaussian (sigma =
`sigma_scale` x window, nnU-Net and MONAI's default 1/8).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbrats.config import BLENDS


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


def sliding_window(predict, volume, cfg: SlidingWindowConfig, out_channels: int, extent=None):
    """Blend `predict` over windows of `volume` (D, H, W, C); returns (D, H, W, out_channels) float32.

    `predict` maps (B, *window, C) to (B, *window, out_channels). The windows
    tile the box [0, max(extent, window)) on each axis (`extent`: (3,) ints,
    may be traced; default the volume's shape), clipped to the volume, with
    the grid `window_starts` gives for a volume of the box's shape; outside
    the box the output is 0. Axes of `volume` shorter than the window are
    zero-padded for inference and cropped back.
    """
    return sliding_window_stack(lambda x: predict(x)[None], volume, cfg, out_channels, 1, extent)[0]


def sliding_window_stack(predict, volume, cfg: SlidingWindowConfig, out_channels: int, count: int, extent=None):
    """`sliding_window` of a `predict` giving `count` outputs per window, (count, B, *window, out_channels),
    blended on one grid with one normalisation: (count, D, H, W, out_channels) float32. Each output
    equals `sliding_window` of it alone (the 15-subset evaluation: every subset from the same windows)."""
    shape = volume.shape[:3]
    window = tuple(int(w) for w in cfg.window)
    padded = tuple(max(s, w) for s, w in zip(shape, window))
    if padded != shape:
        volume = jnp.pad(volume, [(0, p - s) for p, s in zip(padded, shape)] + [(0, 0)])
    strides = [max(int(w * (1 - cfg.overlap)), 1) for w in window]
    xp = np if extent is None else jnp
    box = (
        np.asarray(padded)
        if extent is None
        else jnp.clip(jnp.asarray(extent, jnp.int32), np.asarray(window), np.asarray(padded))
    )
    counts = (box - np.asarray(window) + np.asarray(strides) - 1) // np.asarray(strides) + 1  # as `axis_starts`
    last = box - np.asarray(window)  # the last start on each axis
    total = xp.prod(counts)
    groups = (total + cfg.batch - 1) // cfg.batch
    weights = jnp.asarray(blend_weights(window, cfg.blend, cfg.sigma_scale))[..., None]
    channels = volume.shape[-1]

    def corner(n):
        """Start of window n, the grid in row-major (i, j, k) order like `window_starts`; distinct for n < total."""
        index = jnp.stack([n // (counts[1] * counts[2]), (n // counts[2]) % counts[1], n % counts[2]])
        return jnp.minimum(index * jnp.asarray(strides, jnp.int32), jnp.asarray(last, jnp.int32)).astype(jnp.int32)

    def step(g, carry):
        acc, norm = carry
        n = g * cfg.batch + jnp.arange(cfg.batch, dtype=jnp.int32)
        factors = (n < total).astype(jnp.float32)  # the last group's spare slots repeat a window, weighted 0
        corners = jax.vmap(corner)(jnp.minimum(n, total - 1))
        patches = jax.vmap(lambda c: lax.dynamic_slice(volume, (c[0], c[1], c[2], 0), window + (channels,)))(corners)
        out = predict(patches).astype(jnp.float32)
        for b in range(cfg.batch):
            c = corners[b]
            w = factors[b] * weights
            at = (0, c[0], c[1], c[2], 0)
            region = lax.dynamic_slice(acc, at, (count,) + window + (out_channels,))
            acc = lax.dynamic_update_slice(acc, region + w * out[:, b], at)
            region = lax.dynamic_slice(norm, at[1:], window + (1,))  # the sum of the blend weights
            norm = lax.dynamic_update_slice(norm, region + w, at[1:])
        return acc, norm

    carry = (jnp.zeros((count,) + padded + (out_channels,), jnp.float32), jnp.zeros(padded + (1,), jnp.float32))
    acc, norm = lax.fori_loop(0, groups if extent is not None else int(groups), step, carry)
    out = jnp.where(norm > 0, acc / jnp.where(norm > 0, norm, 1.0), 0.0)
    return out[:, : shape[0], : shape[1], : shape[2]]
