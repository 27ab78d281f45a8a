"""The public M3AE fine-tuned segmentation network in PyTorch, with the public parameter names.

Optional: needs the ``torch`` extra. It exists to import the official M3AE
checkpoint (`jaxbrats.interop.m3ae_import`): this module fixes which keys and shapes
that checkpoint holds, and the tests build a checkpoint of this layout with
random weights and check that the imported JAX model computes what this one
computes.

Written from reading the public code (github.com/ccarliu/m3ae, commit
fdb2800, ``model/Unet.py``: ``Unet_missing`` wrapping ``UNet3D_g``); no code
is copied. What it holds (``M3AENet().state_dict()``, without the
``module.`` prefix that the public scripts' ``nn.DataParallel`` adds):

- ``limage`` (1, 4, 155, 240, 240): the substitute image x_sub, channels
  ``PUBLIC_MODALITIES`` (t1, t1ce, t2, flair), spatial axes (z, y, x) of the
  volume as SimpleITK reads a BraTS file (the NIfTI voxel axes reversed),
  covering the whole uncropped volume;
- ``unet.*``: the residual U-Net. Every convolution has a bias; GroupNorm
  has 8 groups, eps 1e-5, affine. Blocks (``gn1, conv1, gn2, conv2``:
  GN -> ReLU -> conv3 -> GN -> ReLU -> conv3, plus identity) ``conv1b`` (16),
  ``conv2a/b`` (32), ``conv3a/b`` (64), ``conv4a/b/c/d`` (128); ``conv1a``
  is the 3x3x3 stem (4 -> 16), ``ds1/2/3`` the stride-2 3x3x3 downsamplings;
  decoder ``up4conva`` (1x1, 128 -> 64), x2 nearest upsampling, add the skip,
  block ``up4convb``; likewise ``up3conva/up3convb`` (32), ``up2conva/up2convb``
  (16); ``up1conv`` the 1x1 head (16 -> 3);
- with deep supervision (the fine-tuning script's ``--deep_supervised True``),
  ``unet.ds_out.0`` (1x1, 64 -> 3, on the 1/4-resolution decoder output) and
  ``unet.ds_out.1`` (1x1, 32 -> 3, on the 1/2-resolution one), upsampled by
  trilinear interpolation with ``align_corners=True``; they are used in
  training only (evaluation returns the full-resolution logits alone).

The three outputs are region logits in the order ``PUBLIC_REGIONS``
(ET, TC, WT), read through a sigmoid. The network has no parameter-free
state (no buffers); the public module's dropout and max-pool are unused by
the segmentation forward and hold nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Input channels of the public code (its dataset stacks the files _t1, _t1ce, _t2, _flair).
PUBLIC_MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: Output channels of the public code (its labels stack ET, TC, WT).
PUBLIC_REGIONS: tuple[str, ...] = ("ET", "TC", "WT")
#: x_sub's spatial shape in the public code: a whole BraTS volume as (z, y, x).
PUBLIC_VOLUME: tuple[int, int, int] = (155, 240, 240)
#: Residual blocks per encoder level, by public name (the decoder has one per level).
ENCODER_BLOCKS: tuple[tuple[str, ...], ...] = (
    ("conv1b",),
    ("conv2a", "conv2b"),
    ("conv3a", "conv3b"),
    ("conv4a", "conv4b", "conv4c", "conv4d"),
)
DOWNSAMPLINGS: tuple[str, ...] = ("ds1", "ds2", "ds3")
DECODER_REDUCE: tuple[str, ...] = ("up4conva", "up3conva", "up2conva")  # coarse to fine
DECODER_BLOCKS: tuple[str, ...] = ("up4convb", "up3convb", "up2convb")
DEEP_HEADS: tuple[str, ...] = ("ds_out.0", "ds_out.1")  # on the 1/4 and the 1/2 resolution decoder outputs
INIT_CHANNELS = 16


class BasicBlock(nn.Module):
    """Pre-activation residual block with the public attribute names."""

    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        self.gn1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.gn2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x):
        y = self.conv1(F.relu(self.gn1(x)))
        return x + self.conv2(F.relu(self.gn2(y)))


class SegmentationUNet(nn.Module):
    """The public ``UNet3D_g`` as fine-tuning builds it (the ``unet.`` part of the checkpoint)."""

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        init_channels: int = INIT_CHANNELS,
        deep_supervised: bool = False,
    ):
        super().__init__()
        widths = [init_channels * f for f in (1, 2, 4, 8)]
        self.conv1a = nn.Conv3d(in_channels, widths[0], 3, padding=1)
        for level, names in enumerate(ENCODER_BLOCKS):
            if level:
                down = nn.Conv3d(widths[level - 1], widths[level], 3, stride=2, padding=1)
                setattr(self, DOWNSAMPLINGS[level - 1], down)
            for name in names:
                setattr(self, name, BasicBlock(widths[level]))
        for i, (reduce, block) in enumerate(zip(DECODER_REDUCE, DECODER_BLOCKS)):
            setattr(self, reduce, nn.Conv3d(widths[3 - i], widths[2 - i], 1))
            setattr(self, block, BasicBlock(widths[2 - i]))
        self.up1conv = nn.Conv3d(widths[0], out_channels, 1)
        self.deep_supervised = deep_supervised
        if deep_supervised:
            self.ds_out = nn.ModuleList([nn.Conv3d(widths[2], out_channels, 1), nn.Conv3d(widths[1], out_channels, 1)])

    def forward(self, x):
        """Region logits (N, 3, D, H, W); in training with deep supervision, the public list
        [1/4-scale head upsampled, 1/2-scale head upsampled, logits]."""
        skips = []
        for level, names in enumerate(ENCODER_BLOCKS):
            x = self.conv1a(x) if level == 0 else getattr(self, DOWNSAMPLINGS[level - 1])(x)
            for name in names:
                x = getattr(self, name)(x)
            skips.append(x)
        decoded = []
        for reduce, block, skip in zip(DECODER_REDUCE, DECODER_BLOCKS, reversed(skips[:-1])):
            x = getattr(self, block)(F.interpolate(getattr(self, reduce)(x), scale_factor=2, mode="nearest") + skip)
            decoded.append(x)
        logits = self.up1conv(x)
        if not (self.deep_supervised and self.training):
            return logits
        deep = [
            F.interpolate(head(feature), scale_factor=factor, mode="trilinear", align_corners=True)
            for head, feature, factor in zip(self.ds_out, decoded[:2], (4, 2))
        ]
        return [*deep, logits]


class M3AENet(nn.Module):
    """The public ``Unet_missing`` of fine-tuning: ``unet`` and the substitute image ``limage``."""

    def __init__(self, volume=PUBLIC_VOLUME, deep_supervised: bool = True, out_channels: int = 3):
        super().__init__()
        self.unet = SegmentationUNet(len(PUBLIC_MODALITIES), out_channels, deep_supervised=deep_supervised)
        self.limage = nn.Parameter(torch.randn(1, len(PUBLIC_MODALITIES), *volume))

    def fill(self, x, start, missing):
        """`x` (1, 4, d, h, w) with the channels `missing` (public channel indices) replaced by
        limage at `start` (z, y, x): fine-tuning's training frame, the uncropped volume's voxels."""
        z, y, w = start
        window = self.limage[:, :, z : z + x.shape[2], y : y + x.shape[3], w : w + x.shape[4]].to(x.dtype)
        keep = torch.ones(len(PUBLIC_MODALITIES), dtype=x.dtype, device=x.device)
        keep[list(missing)] = 0
        keep = keep.view(1, -1, 1, 1, 1)
        return x * keep + window * (1 - keep)

    def forward(self, x, start=None, missing=()):
        if missing:
            x = self.fill(x, start, missing)
        return self.unet(x)


def build(volume=PUBLIC_VOLUME, deep_supervised: bool = True) -> M3AENet:
    """The public fine-tuned network: 16 initial channels, 3 region outputs, x_sub over `volume` (z, y, x)."""
    return M3AENet(volume, deep_supervised)


def public_checkpoint(model: M3AENet, epoch: int = 0, optimizer: dict | None = None) -> dict:
    """What the public fine-tuning script passes to ``torch.save`` (file ``model_best_<epoch>.pth.tar``):
    ``{"epoch", "state_dict" (keys prefixed "module." by nn.DataParallel), "optimizer"}``."""
    state = {f"module.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    return {"epoch": epoch, "state_dict": state, "optimizer": optimizer or {"state": {}, "param_groups": []}}
