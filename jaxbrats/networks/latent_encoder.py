"""Per-modality latent encoders: each modality image -> a latent volume Z_j (Mind the Gap's T).

The paper gives neither the encoder's architecture nor the latent's shape (ours): a
latent is a full-resolution feature volume (N, D, H, W, C), so the predictor C* is
the shared U-Net reading C channels instead of 4 modalities. An encoder is a stem
3x3x3 convolution 1 -> C, `blocks` residual blocks of the shared backbone
(`unet.ResBlock`: GN -> ReLU -> conv3, twice, plus identity) and a 1x1x1 head
C -> C (the latent is not normalised or rectified, so an anchor such as N(0, 1)
can be matched). With `variational` (the P_N anchor) the head gives 2C channels:
the mean and the log-variance of a diagonal Gaussian, VAE style.

"an encoder" in the paper reads as one encoder shared by the modalities or one per
modality (`encode_modalities(shared=...)`): shared, the modalities are folded into
the batch (one encoder, J*N samples; GroupNorm is per sample, so this equals J
separate calls); per modality, the J encoders are a family (`networks.family`)
mapped over the modality axis: one program, never a Python loop over modalities.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jaxbrats.networks import family
from jaxbrats.networks.layers import Conv3D
from jaxbrats.networks.unet import ResBlock, UNetConfig, run_block


@dataclasses.dataclass(frozen=True)
class LatentEncoderConfig:
    channels: int = 16  # C, the latent's width
    blocks: int = 1
    variational: bool = False  # mean and log-variance heads (P_N)
    groups: int = 8
    dtype: str = "float32"
    conv_impl: str = "auto"
    remat: bool = False


class LatentEncoder(nnx.Module):
    """One modality (N, D, H, W, 1) -> {"latent": (N, D, H, W, C), "log_var": same shape or None}."""

    def __init__(self, cfg: LatentEncoderConfig, rngs: nnx.Rngs):
        block_cfg = UNetConfig(groups=cfg.groups, dtype=cfg.dtype, conv_impl=cfg.conv_impl)
        c = cfg.channels
        self.stem = Conv3D(1, c, 3, dtype=cfg.dtype, impl=cfg.conv_impl, rngs=rngs)
        self.blocks = nnx.List([ResBlock(c, block_cfg, rngs) for _ in range(cfg.blocks)])
        self.head = Conv3D(c, 2 * c if cfg.variational else c, 1, dtype=cfg.dtype, impl=cfg.conv_impl, rngs=rngs)
        self.channels = c
        self.variational = cfg.variational
        self.dtype = jnp.dtype(cfg.dtype)
        self.remat = cfg.remat

    def __call__(self, x) -> dict:
        y = self.stem(x.astype(self.dtype))
        for block in self.blocks:
            y = run_block(block, y, self.remat)
        y = self.head(y).astype(jnp.float32)
        if self.variational:
            return {"latent": y[..., : self.channels], "log_var": y[..., self.channels :]}
        return {"latent": y, "log_var": None}


def modality_stack(image):
    """(N, D, H, W, J) -> (J, N, D, H, W, 1): one single-channel volume per modality."""
    return jnp.moveaxis(image, -1, 0)[..., None]


def encode_modalities(encoders: nnx.Module, image, shared: bool, how: str = "auto") -> dict:
    """Every modality of `image` (N, D, H, W, J) through its encoder: {"latent": (J, N, D, H, W, C),
    "log_var": same or None}. `shared`: one encoder for all (the batch holds J*N samples);
    otherwise `encoders` is a family of J, member j encoding modality j."""
    xs = modality_stack(image)
    if shared:
        j, n = xs.shape[:2]
        out = encoders(xs.reshape(j * n, *xs.shape[2:]))
        return {k: None if v is None else v.reshape(j, n, *v.shape[1:]) for k, v in out.items()}
    return family.map_members(lambda encoder, x: encoder(x), encoders, xs, how=how)
