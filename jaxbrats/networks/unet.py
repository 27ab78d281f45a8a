"""The shared backbone: the ACN / SMU-Net / M3AE residual 3D U-Net.

Channels-last (N, D, H, W, C). Pre-activation residual blocks
(GN -> ReLU -> conv3 -> GN -> ReLU -> conv3, plus identity) with GroupNorm(8);
encoder 16/32/64/128 channels with 1/2/2/4 blocks and stride-2 conv3
downsampling; decoder per level: 1x1 conv halving the channels, x2
upsampling (nearest, as the public code, or trilinear, as M3AE's supplement),
add the encoder skip, one block; a final 1x1 conv. Optional deep-supervision
1x1 heads on the 1/4 and 1/2 resolution decoder outputs (M3AE). Optional dropout
in training: spatial (whole channels) after the stem convolution (RIRN), element-wise
on the bottleneck input (ACN).

Parameters and GroupNorm statistics are float32; `dtype` sets the compute
dtype of convolutions (float32 or bfloat16).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxbrats.networks.layers import Conv3D

DEEP_SUPERVISION_LEVELS = 3  # the heads read the 1/4 and 1/2 resolution decoder outputs


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 3
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: tuple[int, ...] = (1, 2, 2, 4)
    groups: int = 8
    upsample: str = "nearest"  # or "trilinear"
    deep_supervision: bool = False
    dropout: float = 0.0  # on the bottleneck features (ACN); 0 disables
    stem_dropout: float = 0.0  # spatial (whole-channel) dropout after the first convolution (RIRN: 0.2); 0 disables
    dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"
    conv_impl: str = "auto"  # see networks.layers: "auto", "native" or "depth2d"
    remat: bool = False  # recompute each residual block in the backward pass instead of storing it

    def __post_init__(self):
        if self.upsample not in ("nearest", "trilinear"):
            raise ValueError(f"upsample must be 'nearest' or 'trilinear', got {self.upsample!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if not 0 <= self.stem_dropout < 1:
            raise ValueError(f"stem_dropout must be in [0, 1), got {self.stem_dropout!r}")
        if len(self.widths) != len(self.blocks):
            raise ValueError("widths and blocks need one entry per level")
        if self.deep_supervision and len(self.widths) < DEEP_SUPERVISION_LEVELS:
            raise ValueError(f"deep supervision needs at least {DEEP_SUPERVISION_LEVELS} levels (heads at 1/2 and 1/4)")


def _conv(cin, cout, kernel, cfg: UNetConfig, rngs, stride=1):
    return Conv3D(cin, cout, kernel, stride=stride, dtype=cfg.dtype, impl=cfg.conv_impl, rngs=rngs)


class GroupNorm32(nnx.Module):
    """GroupNorm computed in float32 whatever the compute dtype, cast back after."""

    def __init__(self, channels: int, groups: int, rngs: nnx.Rngs):
        self.norm = nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-5, dtype=jnp.float32, rngs=rngs)

    def __call__(self, x):
        return self.norm(x.astype(jnp.float32)).astype(x.dtype)


class ResBlock(nnx.Module):
    def __init__(self, channels: int, cfg: UNetConfig, rngs: nnx.Rngs):
        self.norm1 = GroupNorm32(channels, cfg.groups, rngs)
        self.conv1 = _conv(channels, channels, 3, cfg, rngs)
        self.norm2 = GroupNorm32(channels, cfg.groups, rngs)
        self.conv2 = _conv(channels, channels, 3, cfg, rngs)

    def __call__(self, x):
        y = self.conv1(jax.nn.relu(self.norm1(x)))
        y = self.conv2(jax.nn.relu(self.norm2(y)))
        return x + y


def run_block(block: ResBlock, x, remat: bool):
    """A residual block, optionally under activation checkpointing (saves memory at 128^3 and up).

    Remat is `jax.checkpoint` of a pure function of the block's split state: the block is only
    read, never written back. `nnx.remat(...)(block, x)` writes the block's state back after the
    call, which fails with flax's TraceContextError ("Cannot mutate Param from a different trace
    level") when the block was merged outside the trace it runs in, e.g. a model merged in a
    jitted evaluation program and called inside the sliding window's `lax.scan` or `lax.map`.
    """
    if remat:
        graphdef, state = nnx.split(block)
        return jax.checkpoint(lambda s, y: nnx.merge(graphdef, s)(y))(state, x)
    return block(x)


class Encoder(nnx.Module):
    """Returns the feature map of every level, full resolution first."""

    def __init__(self, cfg: UNetConfig, rngs: nnx.Rngs):
        self.stem = _conv(cfg.in_channels, cfg.widths[0], 3, cfg, rngs)
        self.downs = nnx.List(
            [_conv(cfg.widths[i - 1], cfg.widths[i], 3, cfg, rngs, stride=2) for i in range(1, len(cfg.widths))]
        )
        self.levels = nnx.List(
            [nnx.List([ResBlock(w, cfg, rngs) for _ in range(n)]) for w, n in zip(cfg.widths, cfg.blocks)]
        )
        self.dropout = cfg.dropout
        self.stem_dropout = cfg.stem_dropout
        self.dtype = jnp.dtype(cfg.dtype)
        self.remat = cfg.remat

    def __call__(self, x, dropout_key=None) -> list[jax.Array]:
        """Dropout applies only when a `dropout_key` is given (training).

        Spatial dropout of the stem output (`stem_dropout`, RIRN) draws from
        `fold_in(dropout_key, 1)`; element-wise dropout of the bottleneck input (`dropout`, ACN)
        draws from `dropout_key` itself, so it draws the same numbers with or without the former.
        """
        x = self.stem(x.astype(self.dtype))
        if dropout_key is not None and self.stem_dropout:
            x = spatial_dropout(x, self.stem_dropout, jax.random.fold_in(dropout_key, 1))
        features = []
        for i, blocks in enumerate(self.levels):
            if i:
                x = self.downs[i - 1](x)
            if dropout_key is not None and self.dropout and i == len(self.levels) - 1:
                x = dropout(x, self.dropout, dropout_key)
            for block in blocks:
                x = run_block(block, x, self.remat)
            features.append(x)
        return features


def dropout(x, rate: float, key):
    """Inverted dropout; the key comes from the train step, so a model holds no rng state."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def spatial_dropout(x, rate: float, key):
    """Inverted channel dropout (PyTorch's Dropout3d): whole channels of a sample zeroed, kept ones / (1 - rate).

    x is channels-last (N, D, H, W, C); one draw per (sample, channel).
    """
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0], 1, 1, 1, x.shape[-1]))
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def upsample2(x, method: str):
    """x2 spatial upsampling of a channels-last volume."""
    if method == "nearest":
        for axis in (1, 2, 3):
            x = jnp.repeat(x, 2, axis=axis)
        return x
    return upsample_linear(x, 2)


def upsample_linear(x, factor: int):
    """Trilinear upsampling of (N, D, H, W, C) by an integer factor, half-pixel centres
    (PyTorch's align_corners=False, `jax.image.resize`'s "trilinear"; tests compare both).

    Output voxel f * i + r lies at source position i + t_r, t_r = (2r + 1 - f) / 2f, so it blends
    voxel i with its neighbour before (t_r < 0) or after (t_r > 0), the volume's edge voxel repeated.
    Written with shifts, not `jax.image.resize`'s dense interpolation matrices: a shift of a
    depth-split volume is one neighbour exchange, a matrix product over depth is an all-gather.
    """
    for axis in (1, 2, 3):
        n = x.shape[axis]
        first, last = lax.slice_in_dim(x, 0, 1, axis=axis), lax.slice_in_dim(x, n - 1, n, axis=axis)
        before = jnp.concatenate([first, lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
        after = jnp.concatenate([lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
        phases = []
        for r in range(factor):
            t = (2 * r + 1 - factor) / (2 * factor)
            neighbour = before if t < 0 else after
            phases.append((x + abs(t) * (neighbour - x)).astype(x.dtype))
        x = jnp.stack(phases, axis=axis + 1)
        x = x.reshape(*x.shape[:axis], n * factor, *x.shape[axis + 2 :])
    return x


class Decoder(nnx.Module):
    """Returns (logits, decoder feature maps coarse to fine, deep-supervision logits)."""

    def __init__(self, cfg: UNetConfig, rngs: nnx.Rngs):
        widths = cfg.widths
        self.reduce = nnx.List([_conv(widths[i], widths[i - 1], 1, cfg, rngs) for i in range(len(widths) - 1, 0, -1)])
        self.blocks = nnx.List([ResBlock(widths[i - 1], cfg, rngs) for i in range(len(widths) - 1, 0, -1)])
        self.head = _conv(widths[0], cfg.out_channels, 1, cfg, rngs)
        # Heads on the 1/4 and 1/2 resolution decoder outputs (M3AE's deep supervision).
        self.ds_heads = (
            nnx.List([_conv(widths[i], cfg.out_channels, 1, cfg, rngs) for i in (2, 1)])
            if cfg.deep_supervision
            else None
        )
        self.upsample = cfg.upsample
        self.remat = cfg.remat

    def __call__(self, features: list[jax.Array]):
        x = features[-1]
        outputs = []
        for reduce, block, skip in zip(self.reduce, self.blocks, reversed(features[:-1])):
            x = run_block(block, upsample2(reduce(x), self.upsample) + skip, self.remat)
            outputs.append(x)
        logits = self.head(x)
        deep = []
        if self.ds_heads is not None:
            for head, feature in zip(self.ds_heads, outputs[-3:-1]):
                y = head(feature)
                deep.append(upsample_linear(y, logits.shape[1] // y.shape[1]))
        return logits, outputs, deep


class UNet(nnx.Module):
    """Encoder + decoder; `__call__` returns a dict so methods can reach every feature map.

    Keys: "logits" (N, D, H, W, out), "encoder" (features per level, fine to
    coarse; the last is the bottleneck), "decoder" (coarse to fine), "deep"
    (upsampled deep-supervision logits at 1/4 and 1/2, or an empty list).
    """

    def __init__(self, cfg: UNetConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = Encoder(cfg, rngs)
        self.decoder = Decoder(cfg, rngs)

    def __call__(self, x, dropout_key=None) -> dict:
        features = self.encoder(x, dropout_key)
        logits, decoded, deep = self.decoder(features)
        return {"logits": logits, "encoder": features, "decoder": decoded, "deep": deep}
