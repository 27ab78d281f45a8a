"""ACDIS's networks (Zhang et al., "Anatomical Consistency Distillation and Inconsistency Synthesis
for Brain Tumor Segmentation with Missing Modalities", ECAI 2024, arXiv:2408.13733): mono-modal
encoders with AFEB, the modality feature synthesis block (MFSB) and the fusion decoder. No public
code; the paper gives the blocks' equations (MFSB, eqs. 5-9) and a figure (AFEB), not their sizes.
Ours, settings where a researcher may want another reading:

- Encoders and decoders "closely resemble the 3D U-Net": they are the shared backbone's
  `Encoder` and `Decoder` (`networks.unet`), C_l = model.widths[l] channels at level l.
  A mono-modal encoder E_m reads one channel; E_aux reads the four.
- AFEB (Fig. 3; `AFEB`): a 1x1x1 embedding into the multi-modal space, then a global branch
  (multi-head self-attention) and a local branch (GN -> ReLU -> 3x3x3 convolution), fused by a
  1x1x1 convolution of their concatenation, added to the embedding (the residual is ours). Full
  attention over every voxel of a level is out of reach (80^3 = 512k tokens), so the global
  branch attends over the level average-pooled to the bottleneck's grid (`pool` = 2^(L-1-l):
  (crop/8)^3 tokens for four levels), upsampled back trilinearly. Heads: C_l // 16 (at least 1),
  which must divide C_l (`afeb_heads`; a config check names `model.widths`). The attention is
  computed in blocks of `attention_chunk` queries (`chunked_attention`; an implementation choice,
  not the paper's): each block's softmax is over every key, exact, and rematerialised in the
  backward pass, so memory is chunk x tokens, not tokens^2 (at a 128^3 crop 4096 tokens per
  level: the whole logits were 2e9 values, 8 GB in float32, for four encoders at batch 2).
  With `model.remat` each AFEB is rematerialised whole, as the residual blocks.
- `MonoEncoder` = E_m + its AFEBs (the levels in `afeb_levels`; "the mono-modal hierarchical
  features" names no level: every level by default). With `afeb = False` (the paper's ablation,
  Sec. 4.4) a 3x3x3 convolution C -> C stands in each AFEB's place (27 C^2 weights against
  AFEB's 34 C^2: the whole model 2.2 % smaller at the BraTS config). It returns the raw features (for
  D_aux) and the enhanced features f_m (for ACCT, MFSB and D_fuse). The four are a family
  (`networks.family`) mapped over the modality axis: one program, not four.
- `MFSB` (Fig. 4, eqs. 5-9), one per level and one set of weights per target modality m (p_m,
  W2..W4 are indexed by m: shared weights would make the four syntheses identical):
  p_m = sigmoid(W1_m GAP(f_ava)), f_m^cha = W2_m (p_m * f_ava), alpha_m = sigmoid(W3_m f_m^cha),
  beta_m = sigmoid(W4_m f_m^cha), f_hat_m = (1 + alpha_m) f_m^cha + beta_m; W are 1x1x1
  convolutions (with biases, ours) computed as einsums over the modality axis. One pass per
  step serves both f_comp and L_syn: `MFSB.two_heads` returns f_hat twice, the second copy's
  gradient reaching the block's weights but not its input (`FeatureCompletion`'s
  `grad_to_features = False`: L_syn training the MFSB only, an option of ours).
- `FeatureCompletion` without MFSB (the paper's ablation, Sec. 4.4: "3x3x3 convolutions in their
  respective positions ... to maintain the invariance of parameter counts"), `conv`:
  "fill" (ours, default): a 3x3x3 convolution 4C -> C of f_ava per level whose output fills each
  missing modality's slot of f_comp (the present slots keep their features, as with MFSB):
  108 C^2 weights against MFSB's 88 C^2, the whole model within 2 % of the full one's count;
  "full": a 3x3x3 convolution 4C -> 4C of f_ava is all of f_comp (432 C^2: +27 % parameters
  at the BraTS config).
- `FusionDecoder` (D_fuse): the completed features f_comp (N, ..., 4 C_l) at every level, a
  1x1x1 convolution 4 C_l -> C_l per level (ours: a decoder 4x as wide would cost 16x), then
  the shared `Decoder` with its skips at every level.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbrats.networks.layers import Conv3D
from jaxbrats.networks.unet import Decoder, Encoder, GroupNorm32, UNetConfig, run_block, upsample_linear

HEAD_CHANNELS = 16  # channels per attention head in AFEB's global branch (ours)
#: queries per block of AFEB's attention (ours; memory chunk x tokens): 8 blocks at 128^3, 2 at 80^3
ATTENTION_CHUNK = 512
COMPLETION_CONVS = ("fill", "full")  # FeatureCompletion's 3x3x3 convolution in the MFSB's place


def afeb_heads(channels: int) -> int:
    """AFEB's attention heads for a `channels`-wide level: channels // 16, at least 1."""
    return max(1, channels // HEAD_CHANNELS)


def afeb_width_problem(channels: int) -> str:
    """Why a level `channels` wide cannot have an AFEB ('' when it can): its heads must split it evenly."""
    heads = afeb_heads(channels)
    if channels % heads:
        return (
            f"AFEB splits a level's {channels} channels into {channels} // {HEAD_CHANNELS} = {heads} attention "
            f"heads, which must divide them"
        )
    return ""


def _conv(cin: int, cout: int, kernel: int, cfg: UNetConfig, rngs: nnx.Rngs) -> Conv3D:
    return Conv3D(cin, cout, kernel, dtype=cfg.dtype, impl=cfg.conv_impl, rngs=rngs)


def average_pool(x, factor: int):
    """(N, D, H, W, C) -> (N, D/f, H/f, W/f, C), the mean of each f^3 block."""
    if factor == 1:
        return x
    n, d, h, w, c = x.shape
    blocks = x.reshape(n, d // factor, factor, h // factor, factor, w // factor, factor, c)
    return jnp.mean(blocks.astype(jnp.float32), axis=(2, 4, 6)).astype(x.dtype)


def chunked_attention(q, k, v, chunk: int):
    """softmax(q k^T / sqrt(d)) v of (N, T, heads, d) arrays, `chunk` queries at a time (0: all at once).

    Each block's softmax runs over every key, so the result is full attention's; the blocks run
    one after another (`lax.map`) under `jax.checkpoint`, so neither pass holds more than one
    block's chunk x T logits. Queries are zero-padded to a whole number of blocks, the padding's
    rows dropped.
    """
    count = q.shape[1]
    if not chunk or count <= chunk:
        return jax.nn.dot_product_attention(q, k, v)
    pad = -count % chunk
    blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    blocks = jnp.moveaxis(blocks.reshape(q.shape[0], -1, chunk, *q.shape[2:]), 1, 0)
    out = jax.lax.map(jax.checkpoint(lambda block: jax.nn.dot_product_attention(block, k, v)), blocks)
    return jnp.moveaxis(out, 0, 1).reshape(q.shape[0], count + pad, *q.shape[2:])[:, :count]


class AFEB(nnx.Module):
    """Anatomical feature enhancement: embed, global (pooled self-attention) + local (conv), fuse."""

    def __init__(
        self, channels: int, pool: int, cfg: UNetConfig, rngs: nnx.Rngs, attention_chunk: int = ATTENTION_CHUNK
    ):
        c = channels
        self.embed = _conv(c, c, 1, cfg, rngs)
        self.attention_norm = GroupNorm32(c, cfg.groups, rngs)
        self.qkv = _conv(c, 3 * c, 1, cfg, rngs)
        self.attention_out = _conv(c, c, 1, cfg, rngs)
        self.local_norm = GroupNorm32(c, cfg.groups, rngs)
        self.local = _conv(c, c, 3, cfg, rngs)
        self.fuse = _conv(2 * c, c, 1, cfg, rngs)
        self.pool = pool
        if afeb_width_problem(c):
            raise ValueError(afeb_width_problem(c))
        self.heads = afeb_heads(c)
        self.attention_chunk = attention_chunk

    def global_branch(self, x):
        n, c = x.shape[0], x.shape[-1]
        tokens = self.qkv(average_pool(self.attention_norm(x), self.pool))
        grid = tokens.shape[1:4]
        count = grid[0] * grid[1] * grid[2]
        q, k, v = jnp.split(tokens.reshape(n, count, 3, self.heads, c // self.heads), 3, axis=2)
        attended = chunked_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.attention_chunk)
        y = self.attention_out(attended.reshape(n, *grid, c))
        return upsample_linear(y, self.pool) if self.pool > 1 else y

    def __call__(self, x):
        e = self.embed(x)
        local = self.local(jax.nn.relu(self.local_norm(e)))
        return e + self.fuse(jnp.concatenate([self.global_branch(e), local], axis=-1))


class MonoEncoder(nnx.Module):
    """E_m and its AFEBs: one modality (N, D, H, W, 1) -> {"raw": [per level], "enhanced": [per level]}."""

    def __init__(
        self,
        cfg: UNetConfig,
        afeb_levels: tuple[int, ...],
        afeb: bool,
        rngs: nnx.Rngs,
        attention_chunk: int = ATTENTION_CHUNK,
    ):
        levels = len(cfg.widths)
        self.encoder = Encoder(cfg, rngs)
        self.afeb_levels = tuple(afeb_levels)
        self.remat = cfg.remat
        self.enhance = nnx.List(
            [
                AFEB(cfg.widths[level], 2 ** (levels - 1 - level), cfg, rngs, attention_chunk)
                if afeb
                else _conv(cfg.widths[level], cfg.widths[level], 3, cfg, rngs)
                for level in self.afeb_levels
            ]
        )

    def __call__(self, x) -> dict:
        raw = self.encoder(x)
        enhanced = list(raw)
        for level, block in zip(self.afeb_levels, self.enhance):
            enhanced[level] = run_block(block, raw[level], self.remat)
        return {"raw": raw, "enhanced": enhanced}


def _param(key, shape, fan_in: int):
    """PyTorch's default for a convolution's weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / jnp.sqrt(fan_in)
    return nnx.Param(jax.random.uniform(key, shape, jnp.float32, -bound, bound))


class MFSB(nnx.Module):
    """One level's modality feature synthesis block: f_ava (N, ..., M*C) -> f_hat (M, N, ..., C)."""

    def __init__(self, channels: int, modalities: int, dtype: str, rngs: nnx.Rngs):
        c, mc, m = channels, modalities * channels, modalities
        keys = jax.random.split(rngs.params(), 4)
        self.w1, self.b1 = _param(keys[0], (m, mc, mc), mc), nnx.Param(jnp.zeros((m, mc), jnp.float32))
        self.w2, self.b2 = _param(keys[1], (m, mc, c), mc), nnx.Param(jnp.zeros((m, c), jnp.float32))
        self.w3, self.b3 = _param(keys[2], (m, c, c), c), nnx.Param(jnp.zeros((m, c), jnp.float32))
        self.w4, self.b4 = _param(keys[3], (m, c, c), c), nnx.Param(jnp.zeros((m, c), jnp.float32))
        self.dtype = jnp.dtype(dtype)

    def weights(self) -> dict:
        return {name: getattr(self, name)[...] for name in MFSB_WEIGHTS}

    def __call__(self, available):
        return mfsb_forward(self.weights(), available, self.dtype)

    def two_heads(self, available):
        """(f_hat, f_hat) from one pass: the second copy's gradient reaches the weights, not `available`."""
        return shared_pass(functools.partial(mfsb_forward, dtype=self.dtype), self.weights(), available)


MFSB_WEIGHTS = ("w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4")


def mfsb_forward(p: dict, available, dtype):
    """Eqs. 5-9 for every target modality m: f_ava (N, ..., M*C) -> f_hat (M, N, ..., C)."""
    spatial = tuple(range(1, available.ndim - 1))
    gap = jnp.mean(available.astype(jnp.float32), axis=spatial)  # (N, M*C)
    prior = jax.nn.sigmoid(jnp.einsum("nc,mcd->mnd", gap, p["w1"]) + p["b1"][:, None])  # p_m (M, N, M*C)
    # W2 (p_m * f_ava) with p_m folded into W2: no (M, N, ..., M*C) intermediate.
    squeeze = (prior[..., None] * p["w2"][:, None]).astype(dtype)  # (M, N, M*C, C)
    cha = jnp.einsum("n...c,mncd->mn...d", available.astype(dtype), squeeze).astype(jnp.float32)
    cha = cha + _channels_bias(p["b2"], cha.ndim)
    alpha = jax.nn.sigmoid(jnp.einsum("mn...c,mcd->mn...d", cha, p["w3"]) + _channels_bias(p["b3"], cha.ndim))
    beta = jax.nn.sigmoid(jnp.einsum("mn...c,mcd->mn...d", cha, p["w4"]) + _channels_bias(p["b4"], cha.ndim))
    return (1.0 + alpha) * cha + beta


def shared_pass(fn, weights, x):
    """fn(weights, x) computed once and returned twice, (y, y_w): the cotangents of both reach
    `weights`, only y's reaches `x` (as fn(weights, stop_gradient(x)) for y_w, without a second
    forward pass: the backward pass runs the pullback with y's cotangent for `x` and with the sum
    of both for `weights`)."""

    @jax.custom_vjp
    def run(weights, x):
        y = fn(weights, x)
        return y, y

    def forward(weights, x):
        y, pullback = jax.vjp(fn, weights, x)
        return (y, y), pullback

    def backward(pullback, cotangents):
        to_both, to_weights = cotangents
        d_weights, _ = pullback(jax.tree.map(jnp.add, to_both, to_weights))
        _, d_x = pullback(to_both)
        return d_weights, d_x

    run.defvjp(forward, backward)
    return run(weights, x)


def _channels_bias(bias, ndim: int):
    """(M, C) -> (M, 1, ..., 1, C) against an (M, N, ..., C) array of `ndim` axes."""
    return bias.reshape(bias.shape[0], *([1] * (ndim - 2)), bias.shape[1])


class FeatureCompletion(nnx.Module):
    """f_ava at every level -> f_comp: MFSB's syntheses in the missing modalities' slots, or (the
    ablation without MFSB, Sec. 4.4) a 3x3x3 convolution of f_ava in the block's place (`conv`:
    "fill", 4C -> C into the missing slots; "full", 4C -> 4C, all of f_comp)."""

    def __init__(
        self, widths: tuple[int, ...], modalities: int, mfsb: bool, cfg: UNetConfig, rngs: nnx.Rngs, conv: str = "fill"
    ):
        if conv not in COMPLETION_CONVS:
            raise ValueError(f"conv must be one of {COMPLETION_CONVS}, not {conv!r}")
        self.mfsb = mfsb
        self.conv = conv
        self.modalities = modalities
        out = 1 if conv == "fill" else modalities
        self.blocks = nnx.List(
            [
                MFSB(w, modalities, cfg.dtype, rngs) if mfsb else _conv(modalities * w, out * w, 3, cfg, rngs)
                for w in widths
            ]
        )

    def __call__(
        self, features: list, mask, synthesise=True, grad_to_features: bool = True
    ) -> tuple[list, list | None]:
        """`features`: per level (M, N, ..., C), every modality's enhanced feature; `mask` (N, M).

        Returns (f_comp per level (N, ..., M*C), f_hat per level (M, N, ..., C) or None without
        MFSB). `synthesise` (a traced bool, the schedule): False leaves the missing slots at zero.
        The returned f_hat (for the synthesis losses) comes from the same MFSB pass as f_comp;
        with `grad_to_features = False` its gradient reaches the MFSB's weights but not the
        features (f_comp's always does).
        """
        comp, synthesised = [], []
        for block, f in zip(self.blocks, features):
            available = available_features(f, mask)
            keep = _present(mask, f.ndim)
            if not self.mfsb:
                if self.conv == "full":
                    comp.append(block(available))
                else:  # one convolved feature fills every missing slot, on the MFSB's schedule
                    fill = jnp.where(synthesise, block(available)[None].astype(jnp.float32), 0.0)
                    comp.append(concat_modalities(jnp.where(keep, f.astype(jnp.float32), fill)).astype(f.dtype))
                continue
            if grad_to_features:
                f_hat = labelled = block(available)
            else:
                f_hat, labelled = block.two_heads(available)
            synthesised.append(labelled)
            filled = jnp.where(keep, f.astype(jnp.float32), jnp.where(synthesise, f_hat, 0.0))
            comp.append(concat_modalities(filled).astype(f.dtype))
        return comp, synthesised if self.mfsb else None


def available_features(f, mask):
    """f_ava: (M, N, ..., C) features -> (N, ..., M*C), zeros in the missing modalities' slots."""
    return concat_modalities(jnp.where(_present(mask, f.ndim), f, 0).astype(f.dtype))


def _present(mask, ndim: int):
    """(N, M) modality mask -> (M, N, 1, ...) against (M, N, ..., C) features of `ndim` axes."""
    present = jnp.asarray(mask, bool).T
    return present.reshape(*present.shape, *([1] * (ndim - 2)))


def concat_modalities(f):
    """(M, N, ..., C) -> (N, ..., M*C): the modalities' features concatenated along the channels."""
    return jnp.concatenate(list(f), axis=-1)


class FusionDecoder(nnx.Module):
    """D_fuse: per level a 1x1x1 convolution M*C -> C, then the shared decoder."""

    def __init__(self, cfg: UNetConfig, modalities: int, rngs: nnx.Rngs):
        self.fuse = nnx.List([_conv(modalities * w, w, 1, cfg, rngs) for w in cfg.widths])
        self.decoder = Decoder(cfg, rngs)

    def __call__(self, features: list):
        return self.decoder([fuse(f) for fuse, f in zip(self.fuse, features)])[0]
