"""Alignment of per-modality latents to an anchor (Mind the Gap, papers/mind-the-gap.txt Sec. III-B).

Every function takes the latents of all modalities stacked on a leading modality
axis, ``latents`` (J, N, D, H, W, C) in `modalities.MODALITIES` order, and returns
one term per modality, (J,): the teacher's objective (eq. 7) sums them. Each term
is a mean over the N*D*H*W*C elements of its modality (ours: the paper writes
expectations and no reduction; a mean keeps the term's size independent of the
crop and latent width).

- P_N ("normal"): KL(N(mu, sigma^2) || N(0, 1)) per element, the VAE term
  0.5 (mu^2 + sigma^2 - log sigma^2 - 1) (the paper's own rendering of it is
  garbled in the OCR; this is the VAE's, which it cites);
- P_k ("modality"): E ||Z_k - Z_j||^2, one modality's latent as the target;
- P_mix ("mix"): w_j ||Z* - Z_j||^2 with learnable weights w_j (`mix_weights`).

Targets (Z_k, Z*) are held fixed by default (`hold_target`: gradient stopped):
an anchor is what the others move towards. With a live target the same MSE also
pulls the anchor modality's latent towards the others (a symmetric pull); that
is an option, not the paper's wording ("align ... to").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ANCHORS = ("none", "normal", "modality", "mix")
MIX_TARGETS = ("mixture", "prior")


def _per_modality_mean(values):
    return jnp.mean(values.reshape(values.shape[0], -1), axis=1)


def normal_kl(mean, log_var):
    """(J,) mean over each modality's elements of KL(N(mean, exp(log_var)) || N(0, 1))."""
    mean, log_var = mean.astype(jnp.float32), log_var.astype(jnp.float32)
    return _per_modality_mean(0.5 * (jnp.square(mean) + jnp.exp(log_var) - log_var - 1.0))


def modality_alignment(latents, anchor: int, hold_target: bool = True):
    """(J,) mean squared distance of each modality's latent to modality `anchor`'s (its own term is 0)."""
    latents = latents.astype(jnp.float32)
    target = latents[anchor]
    if hold_target:
        target = jax.lax.stop_gradient(target)
    return _per_modality_mean(jnp.square(latents - target[None]))


def mix_weights(raw, floor: float):
    """The learnable P_mix weights w (J,) from unconstrained parameters `raw` (J,).

    w = floor + (J - J floor) softmax(raw): every weight lies in [floor, J - (J - 1) floor]
    and they sum to J. So the weights can neither all go to 0 (the alignment term would
    vanish) nor all onto one modality (the others would stop being aligned), whatever the
    optimiser does; raw = 0 gives w = 1 for every modality (plain P_k-style MSE). Ours: the
    paper learns w with no stated normalisation (its learned weights sum to 4.18).
    """
    j = raw.shape[0]
    return floor + (j - j * floor) * jax.nn.softmax(raw.astype(jnp.float32))


def mix_target(latents, weights, target: str = "mixture", anchor: int = 1):
    """Z*: "mixture" = sum_j (w_j / sum w) Z_j, the weighted mixture P_mix = sum_j w_j P(Z_j)
    defines (Sec. II); "prior" = Z_anchor, the prior modality's latent that Sec. III-B's
    equation, as OCR'd, writes as the target."""
    latents = latents.astype(jnp.float32)
    if target == "prior":
        return latents[anchor]
    share = weights / jnp.sum(weights)
    return jnp.tensordot(share, latents, axes=1)


def mix_alignment(latents, weights, target: str = "mixture", anchor: int = 1, hold_target: bool = True):
    """(J,) w_j mean ||Z* - Z_j||^2. The weights learn through these coefficients; with the target
    held fixed (default) they get no gradient through Z*."""
    latents = latents.astype(jnp.float32)
    goal = mix_target(latents, weights, target, anchor)
    if hold_target:
        goal = jax.lax.stop_gradient(goal)
    return weights * _per_modality_mean(jnp.square(goal[None] - latents))
