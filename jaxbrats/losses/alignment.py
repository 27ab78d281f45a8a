"""Alignment of per-modality latents to an anchor (Mind the Gap, "Mind the Gap: Promoting Missing
Modality Brain Tumor Segmentation with Alignment", arXiv:2409.19366, Sec. III-B).

Every function takes the latents of all modalities stacked on a leading modality
axis, ``latents`` (J, N, D, H, W, C) in `modalities.MODALITIES` order, and returns
one term per modality, (J,): the teacher's objective (eq. 7) sums them. Each term
is a mean over the valid voxels (``valid`` (N, D, H, W), the crop's padding
excluded; all voxels when ``valid`` is None) times the C channels of its modality
(ours: the paper writes expectations and no reduction; a mean keeps the term's
size independent of the crop, its padding and the latent width).

- P_N ("normal"): KL(N(mu, sigma^2) || N(0, 1)) per element, the VAE term
  0.5 (mu^2 + sigma^2 - log sigma^2 - 1) (the paper's own rendering of it is
  garbled in the text we have; this is the VAE's, which it cites);
- P_k ("modality"): E ||Z_k - Z_j||^2, one modality's latent as the target;
- P_mix ("mix"): w_j ||Z* - Z_j||^2 with learnable weights w_j (`mix_weights`),
  Z* the prior modality's latent Z_k (the loss the paper writes) or the
  weighted mixture sum_j w_j Z_j / sum_j w_j (the distribution the paper
  defines); see `mix_target`.

Holding the target fixed (`hold_target`: its gradient stopped) matters where
the target is one modality's latent (P_k, and P_mix with the prior target): a
live Z_k is also pulled towards the others (a symmetric pull), a held one is
an anchor the others move towards (default). With the mixture target it
changes nothing: Z* is the minimiser of sum_j w_j ||Z - Z_j||^2 over Z, so the
gradient of the term through Z* is zero, for the latents and for the weights
alike (tests/test_alignment_losses.py checks it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ANCHORS = ("none", "normal", "modality", "mix")
MIX_TARGETS = ("prior", "mixture")


def _per_modality_mean(values, valid=None):
    """(J,) mean of (J, N, D, H, W, C) `values` over the valid voxels x channels of each modality."""
    if valid is None:
        return jnp.mean(values.reshape(values.shape[0], -1), axis=1)
    w = jnp.asarray(valid, jnp.float32)[None, ..., None]  # (1, N, D, H, W, 1)
    count = jnp.sum(w) * values.shape[-1]
    return jnp.sum((values * w).reshape(values.shape[0], -1), axis=1) / jnp.maximum(count, 1.0)


def normal_kl(mean, log_var, valid=None):
    """(J,) mean over each modality's valid elements of KL(N(mean, exp(log_var)) || N(0, 1))."""
    mean, log_var = mean.astype(jnp.float32), log_var.astype(jnp.float32)
    return _per_modality_mean(0.5 * (jnp.square(mean) + jnp.exp(log_var) - log_var - 1.0), valid)


def modality_alignment(latents, anchor: int, hold_target: bool = True, valid=None):
    """(J,) mean squared distance of each modality's latent to modality `anchor`'s (its own term is 0)."""
    latents = latents.astype(jnp.float32)
    target = latents[anchor]
    if hold_target:
        target = jax.lax.stop_gradient(target)
    return _per_modality_mean(jnp.square(latents - target[None]), valid)


def mix_weights(raw, floor: float, total: float | None = None):
    """The learnable P_mix weights w (J,) from unconstrained parameters `raw` (J,).

    w = floor + (total - J floor) softmax(raw), total = J by default: every weight lies
    in [floor, total - (J - 1) floor] and they sum to `total`. So the weights can
    neither all go to 0 (the alignment term would vanish) nor all onto one modality
    (the others would stop being aligned), whatever the optimiser does; raw = 0 gives
    w = total / J for every modality (unit weights for total = J: plain P_k-style MSE).
    Ours: the paper learns w with no stated normalisation; its reported weights
    (T1 0.7759, T2 0.8977, T1ce 2.2055, FLAIR 0.3055) sum to 4.1846, inside this range
    for total = 4.1846 and floor <= 0.3055. A free sum is not offered: the weights learn
    from the alignment term alone, whose gradient in each w_j is its residual (>= 0), so
    unconstrained weights would all fall towards the floor.
    """
    j = raw.shape[0]
    total = float(j) if total is None else total
    return floor + (total - j * floor) * jax.nn.softmax(raw.astype(jnp.float32))


def mix_target(latents, weights, target: str = "prior", anchor: int = 1):
    """Z*: "prior" = Z_anchor, the prior modality's latent that Sec. III-B's P_mix loss
    sum_j w_j ||Z_k - Z_j||^2 aligns to ("an optimal latent space for a prior modality can
    serve as a foundational anchor"); "mixture" = sum_j (w_j / sum w) Z_j, the weighted
    mixture that Sec. II's definition P_mix = sum_j w_j P(Z_j) describes."""
    latents = latents.astype(jnp.float32)
    if target == "prior":
        return latents[anchor]
    share = weights / jnp.sum(weights)
    return jnp.tensordot(share, latents, axes=1)


def mix_alignment(latents, weights, target: str = "prior", anchor: int = 1, hold_target: bool = True, valid=None):
    """(J,) w_j mean ||Z* - Z_j||^2 over the valid voxels.

    The weights learn from these terms only: d/dw_j of their sum is modality j's residual
    mean ||Z* - Z_j||^2 with either target (with the mixture, the path through Z* adds
    nothing; see the module docstring). With the prior target the anchor's own residual
    is 0, so its weight never loses to the others'.
    """
    latents = latents.astype(jnp.float32)
    goal = mix_target(latents, weights, target, anchor)
    if hold_target:
        goal = jax.lax.stop_gradient(goal)
    return weights * _per_modality_mean(jnp.square(goal[None] - latents), valid)
