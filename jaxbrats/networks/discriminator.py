"""RIRN's discriminator: a two-layer fully-convolutional network on segmentation output maps.

The paper (RIRN, implementation details) says only: "the discriminator is a two-layer
fully-convolutional network". It tells the complete-modality (teacher) predictions from the
incomplete-modality (student) ones. Everything else here is OUR choice, not the paper's:
kernel 3, stride 2 in both layers (each halves D, H, W), `width` = 64 hidden channels, a
LeakyReLU(0.2) between the layers (the usual GAN discriminator activation), no normalisation,
and a patch-wise output (one logit per output voxel, a PatchGAN-style map; reduce it in the loss).

Conv3D(in_channels -> width, k3, s2) -> LeakyReLU(0.2) -> Conv3D(width -> 1, k3, s2).
Input (N, D, H, W, in_channels) channels-last; output logits (N, ceil(D/4), ceil(H/4),
ceil(W/4), 1) in float32 whatever the compute dtype. Parameters:
27 * in_channels * width + width + 27 * width + 1 (6,977 at the defaults).

One discriminator per student: stack them with `networks.family.stack` and run them with
`family.map_members`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbrats.networks.layers import Conv3D

LEAKY_SLOPE = 0.2


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    in_channels: int = 3  # the segmentation output maps (WT/TC/ET region logits or probabilities)
    width: int = 64  # hidden channels (our choice; the paper gives none)
    dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"; parameters stay float32
    conv_impl: str = "auto"  # see networks.layers: "auto", "native" or "depth2d"

    def __post_init__(self):
        if self.in_channels < 1 or self.width < 1:
            raise ValueError(f"in_channels and width must be >= 1, got {self.in_channels} and {self.width}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")


class Discriminator(nnx.Module):
    """Two stride-2 3x3x3 convolutions with a LeakyReLU(0.2) between them -> (N, D/4, H/4, W/4, 1) logits."""

    def __init__(self, cfg: DiscriminatorConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.conv1 = Conv3D(cfg.in_channels, cfg.width, 3, stride=2, dtype=cfg.dtype, impl=cfg.conv_impl, rngs=rngs)
        self.conv2 = Conv3D(cfg.width, 1, 3, stride=2, dtype=cfg.dtype, impl=cfg.conv_impl, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.leaky_relu(self.conv1(x), LEAKY_SLOPE)
        return self.conv2(y).astype(jnp.float32)
