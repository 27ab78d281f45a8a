"""Mind the Gap (Liu et al. 2024, papers/mind-the-gap.txt): a teacher whose per-modality latents
are aligned to an anchor, then students distilled from it with a prior method's KD loss.

No public code; the text is OCR'd and terse. What it gives and what is ours:

- Teacher (stage "teacher"): each modality j is encoded into one latent space,
  Z_j = T(X_j) (`networks.latent_encoder`; the encoder's architecture and the
  latent's shape are ours: a full-resolution C-channel volume, C =
  `latent_channels`, default model.widths[0]). "an encoder": one per modality,
  a family mapped over the modality axis (default, ours; the notation says "the
  encoders"), or one shared (`shared_encoder`). The predictor C* is the shared
  U-Net reading C channels.
- Teacher objective (eq. 7): sum_j [alignment of Z_j to the anchor + CE(C*(Z_j), Y)].
  `teacher_seg = "each"` (the paper's): C* segments every modality's latent
  alone (the J latents folded into the batch: one predictor pass); "combined"
  (ours, HeMIS-like): C* on the mean of the latents; "both": the sum. The
  segmentation loss is the label softmax's CE + soft Dice (ours: the paper
  names the CE; Dice is what every KD baseline adds). The teacher's prediction
  for a modality subset (evaluation, and what students distil from) is C* on
  the mean of the PRESENT latents (missing ones left out of the combination).
- Anchors (`anchor`, `losses.alignment`): "none" (Table IV's "without"),
  "normal" (P_N: KL to N(0, 1) of a learned mean and log-variance per latent
  voxel; C* sees a sample mu + sigma eps in training, `normal_sample`, the mean
  at inference, as a VAE), "modality" (P_k: MSE to Z_k, k = `anchor_modality`,
  T1ce by default as the paper's Table V picks), "mix" (P_mix, the paper's
  method: sum_j w_j ||Z* - Z_j||^2, w learned with the teacher, not frozen;
  Z* = the weighted mixture (`mix_target = "mixture"`, default, as P_mix is
  defined) or Z_k (`"prior"`, Sec. III-B's equation as OCR'd); the weights'
  normalisation is ours: `losses.alignment.mix_weights`, in [mix_floor, J -
  3 mix_floor], summing to J: no collapse to 0 or to one modality; logged as
  w/<modality>). Targets are held fixed (`hold_target`). Unit weight
  (`align_weight`), as eq. 7.
- Students (stage "students"): the shared U-Net per subset (`students`: the
  four single modalities by default, Table I; "all" for Table III), a family
  trained in one step, each seeing its modalities (4 channels, missing ones
  zero-filled), from the frozen teacher of stage 1 (carried from its
  checkpoint; no optimiser state). L = L_seg + L_KD, L_KD the KD loss of a
  prior method (`kd`, `losses.distillation`: kdnet, pmkl, protokd, smunet, or
  "none": Table I's "unimodal" student). Every student is this library's
  shared U-Net, not each baseline's own network. The teacher's view
  (`teacher_view`): "full" (default: the full-modality teacher, as the KD
  baselines distil) or "subset" (the teacher on the student's own modalities,
  eq. 3's D_KL(P(Z_j) || P(Z*_j)) reading; ours). SMU-Net's style
  discriminator is a family (one per student), trained in a second update,
  on bottleneck features (teacher real, student fake).
- "original" in the paper's Table I (the KD method with an unaligned
  teacher) is `anchor = "none"`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbrats.config import check_choice, check_entries, check_range
from jaxbrats.errors import ConfigError
from jaxbrats.labels import NUM_LABELS
from jaxbrats.losses import label_loss
from jaxbrats.losses.adversarial import discriminator_loss, student_adversarial_loss
from jaxbrats.losses.alignment import ANCHORS, MIX_TARGETS, mix_alignment, mix_weights, modality_alignment, normal_kl
from jaxbrats.losses.distillation import KD_LOSSES, KDConstants, distillation_loss, sigmoid_rampup, style_features
from jaxbrats.methods.base import Method, Update
from jaxbrats.modalities import MODALITIES, SUBSET_MASKS, SUBSET_NAMES, drop_modalities, student_subsets
from jaxbrats.networks import family
from jaxbrats.networks.discriminator import Discriminator, DiscriminatorConfig
from jaxbrats.networks.factory import probabilities, unet_config
from jaxbrats.networks.latent_encoder import LatentEncoder, LatentEncoderConfig, encode_modalities
from jaxbrats.networks.unet import UNet

TEACHER_SEG = ("each", "combined", "both")
TEACHER_VIEWS = ("full", "subset")
TEACHER_MODELS = ("encoders", "predictor")


@dataclasses.dataclass(frozen=True)
class MindTheGapOptions:
    anchor: str = "mix"  # none | normal (P_N) | modality (P_k) | mix (P_mix, the paper's)
    anchor_modality: str = "t1ce"  # k of P_k, and the prior of mix_target = "prior"
    mix_target: str = "mixture"  # Z* of P_mix: the weighted mixture | the prior modality's latent
    mix_floor: float = 0.1  # the least P_mix weight (ours; the weights sum to 4)
    hold_target: bool = True  # the anchor's target gets no gradient
    normal_sample: bool = True  # P_N: the predictor sees mu + sigma eps in training (VAE), else mu
    align_weight: float = 1.0
    shared_encoder: bool = False  # one encoder for all modalities | one per modality
    encoder_blocks: int = 1
    latent_channels: int = 0  # 0: model.widths[0]
    teacher_seg: str = "each"  # eq. 7: C* on each latent | on their mean | both
    class_weights: tuple[float, ...] = ()  # CE weight per internal label (teacher and students)
    #: "all" (the 15 subsets) or a list of subset names; the four single modalities: Table I
    students: object = ("flair", "t1ce", "t1", "t2")
    kd: str = "pmkl"  # none (unimodal) | kdnet | pmkl | protokd | smunet
    kd_weight: float = 1.0  # scales the whole L_KD (ours; the constants inside are the baselines')
    teacher_view: str = "full"  # what students distil from: the full-modality teacher | their own modalities
    #: SMU-Net's consistency ramp-up (sigmoid, ACN's) length in steps; the code ramps over 20 epochs; 0: none
    ramp_steps: int = 0
    disc_width: int = 64  # SMU-Net's style discriminator (the shared two-layer discriminator; width ours)

    def validate(self, where: str) -> None:
        check_choice(f"{where}.anchor", self.anchor, ANCHORS)
        check_choice(f"{where}.anchor_modality", self.anchor_modality, MODALITIES)
        check_choice(f"{where}.mix_target", self.mix_target, MIX_TARGETS)
        check_range(f"{where}.mix_floor", self.mix_floor, 0, 1, high_open=True)
        check_range(f"{where}.align_weight", self.align_weight, 0)
        check_range(f"{where}.encoder_blocks", self.encoder_blocks, 0)
        check_range(f"{where}.latent_channels", self.latent_channels, 0)
        check_choice(f"{where}.teacher_seg", self.teacher_seg, TEACHER_SEG)
        if self.class_weights and len(self.class_weights) != NUM_LABELS:
            raise ConfigError(f"{where}.class_weights needs {NUM_LABELS} values, got {list(self.class_weights)}")
        check_entries(f"{where}.class_weights", self.class_weights, 0)
        student_subsets(list(self.students) if isinstance(self.students, tuple) else self.students, f"{where}.students")
        check_choice(f"{where}.kd", self.kd, KD_LOSSES)
        check_range(f"{where}.kd_weight", self.kd_weight, 0)
        check_choice(f"{where}.teacher_view", self.teacher_view, TEACHER_VIEWS)
        check_range(f"{where}.ramp_steps", self.ramp_steps, 0)
        check_range(f"{where}.disc_width", self.disc_width, 1)


class MixWeights(nnx.Module):
    """P_mix's learnable weights, one unconstrained parameter per modality (`alignment.mix_weights`)."""

    def __init__(self, count: int):
        self.raw = nnx.Param(jnp.zeros((count,), jnp.float32))


class MindTheGap(Method):
    name = "mind_the_gap"
    Options = MindTheGapOptions
    stages = ("teacher", "students")

    def __init__(self, config):
        super().__init__(config)
        o = self.options
        self.subsets = student_subsets(list(o.students) if isinstance(o.students, tuple) else o.students)
        self.slots = np.zeros(len(SUBSET_NAMES), np.int32)  # subset index -> the student serving it
        self.slots[list(self.subsets)] = np.arange(len(self.subsets))
        self.anchor_index = MODALITIES.index(o.anchor_modality)
        self.latent_channels = o.latent_channels or config.model.widths[0]
        self.constants = KDConstants()

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        o = cls.parse_options(config)
        channels = o.latent_channels or config.model.widths[0]
        if channels % config.model.groups:
            raise ConfigError(f"method.latent_channels ({channels}) must be divisible by model.groups = "
                              f"{config.model.groups} (GroupNorm in the encoders)")
        cls.refuse_coupled_clipping(config, "students", "students")

    # --- models ------------------------------------------------------------------------
    def encoder_config(self) -> LatentEncoderConfig:
        m = self.config.model
        return LatentEncoderConfig(channels=self.latent_channels, blocks=self.options.encoder_blocks,
                                   variational=self.options.anchor == "normal", groups=m.groups, dtype=m.dtype,
                                   conv_impl=m.conv_impl, remat=m.remat)

    def families(self, stage):
        out = {} if self.options.shared_encoder else {"encoders": len(MODALITIES)}
        if stage == "students":
            out["students"] = len(self.subsets)
            if self.options.kd == "smunet":
                out["discriminators"] = len(self.subsets)
        return out

    def init_models(self, stage, rngs):
        roots = jax.random.split(rngs.params(), 4)  # encoders, predictor, students, discriminators
        enc = self.encoder_config()
        if self.options.shared_encoder:
            encoders = LatentEncoder(enc, nnx.Rngs(roots[0]))
        else:
            encoders = family.stack(lambda r: LatentEncoder(enc, r), family.member_keys(roots[0], range(len(MODALITIES))))
        models = {"encoders": encoders,
                  "predictor": UNet(unet_config(self.config, NUM_LABELS, in_channels=self.latent_channels), nnx.Rngs(roots[1]))}
        if self.options.anchor == "mix":
            models["mix"] = MixWeights(len(MODALITIES))
        if stage == "students":
            cfg = unet_config(self.config, NUM_LABELS)
            models["students"] = family.stack(lambda r: UNet(cfg, r), family.member_keys(roots[2], self.subsets))
            if self.options.kd == "smunet":
                disc = DiscriminatorConfig(in_channels=self.config.model.widths[-1], width=self.options.disc_width,
                                           dtype=self.config.model.dtype, conv_impl=self.config.model.conv_impl)
                models["discriminators"] = family.stack(lambda r: Discriminator(disc, r), family.member_keys(roots[3], self.subsets))
        return models

    def pipeline(self, stage):
        return {"dropout": "none", "instantiations": 1}  # the teacher sees all; each student drops its own

    def updates(self, stage):
        if stage == "teacher":
            trainable = {name: nnx.Param for name in TEACHER_MODELS}
            if self.options.anchor == "mix":
                trainable["mix"] = nnx.Param
            return [Update(group="teacher", trainable=trainable, loss=self.teacher_loss)]
        updates = [Update(group="students", trainable={"students": nnx.Param}, loss=self.students_loss)]
        if self.options.kd == "smunet":
            updates.append(Update(group="discriminator", trainable={"discriminators": nnx.Param}, loss=self.discriminator_loss))
        return updates

    def known_groups(self, stage):
        return ("teacher",) if stage == "teacher" else ("students", "discriminator")

    # --- the teacher -------------------------------------------------------------------
    def encode(self, models, image, key=None) -> dict:
        """Every modality's latent (J, N, D, H, W, C) (a VAE sample when `key` is given and P_N samples)."""
        out = encode_modalities(models["encoders"], image, self.options.shared_encoder, self.config.model.family_map)
        latent = out["latent"]
        if out["log_var"] is not None and key is not None and self.options.normal_sample:
            latent = latent + jnp.exp(0.5 * out["log_var"]) * jax.random.normal(key, latent.shape, latent.dtype)
        return {"latent": latent, "mean": out["latent"], "log_var": out["log_var"]}

    @staticmethod
    def combine(latents, modality_mask):
        """The mean of the present modalities' latents: (J, N, ...) and (N, J) or (J,) -> (N, ...)."""
        mask = jnp.broadcast_to(jnp.asarray(modality_mask, jnp.float32), (latents.shape[1], latents.shape[0])).T
        share = mask / jnp.maximum(jnp.sum(mask, axis=0, keepdims=True), 1.0)
        return jnp.einsum("jn,jn...->n...", share, latents.astype(jnp.float32))

    def alignment(self, models, encoded):
        """(J,) alignment terms of the anchor, and the P_mix weights (or None)."""
        o = self.options
        if o.anchor == "normal":
            return normal_kl(encoded["mean"], encoded["log_var"]), None
        if o.anchor == "modality":
            return modality_alignment(encoded["latent"], self.anchor_index, o.hold_target), None
        if o.anchor == "mix":
            weights = mix_weights(models["mix"].raw[...], o.mix_floor)
            return mix_alignment(encoded["latent"], weights, o.mix_target, self.anchor_index, o.hold_target), weights
        return jnp.zeros((len(MODALITIES),), jnp.float32), None

    def seg_loss(self, logits, labels, valid):
        weights = self.options.class_weights or None
        return label_loss(logits, labels, valid, class_weights=weights)

    def teacher_loss(self, models, batch, key, context=None):
        """Eq. 7: sum_j [align(Z_j) + CE(C*(Z_j))] (`teacher_seg` = "each"), plus the combined term."""
        o = self.options
        encoded = self.encode(models, batch["image"], key)
        latents = encoded["latent"]
        terms, weights = self.alignment(models, encoded)
        seg = jnp.zeros((), jnp.float32)
        parts = {}
        j, n = latents.shape[:2]
        if o.teacher_seg in ("each", "both"):  # the J latents in one predictor pass, the loss summed over j
            folded = latents.reshape(j * n, *latents.shape[2:])
            tile = lambda a: jnp.tile(a, (j,) + (1,) * (a.ndim - 1))
            each = j * self.seg_loss(models["predictor"](folded)["logits"], tile(batch["label"]), tile(batch["valid"]))[0]
            parts["seg_each"] = each
            seg = seg + each
        if o.teacher_seg in ("combined", "both"):
            combined = self.seg_loss(models["predictor"](jnp.mean(latents, axis=0))["logits"], batch["label"], batch["valid"])[0]
            parts["seg_combined"] = combined
            seg = seg + combined
        align = jnp.sum(terms)
        parts.update({"seg": seg, "align": align})
        parts.update({f"align/{m}": terms[i] for i, m in enumerate(MODALITIES)})
        if weights is not None:
            parts.update({f"w/{m}": weights[i] for i, m in enumerate(MODALITIES)})
        return seg + o.align_weight * align, parts

    def teacher_output(self, models, latents, modality_mask):
        return models["predictor"](self.combine(latents, modality_mask))

    # --- the students ------------------------------------------------------------------
    def students_loss(self, models, batch, key, context=None):
        """The sum over students of L_seg + kd_weight L_KD (+ SMU-Net's adversarial term)."""
        o = self.options
        distil = o.kd != "none"
        latents = jax.lax.stop_gradient(self.encode(models, batch["image"])["latent"]) if distil else None
        full = jax.lax.stop_gradient(self.teacher_output(models, latents, jnp.ones(len(MODALITIES)))) if distil else None
        ramp = sigmoid_rampup(context["step"], o.ramp_steps) if o.ramp_steps else 1.0
        names = [n for n in ("students", "discriminators") if n in models and n in self.families("students")]
        graphs = {n: nnx.split(models[n]) for n in names}
        masks = jnp.asarray(SUBSET_MASKS[list(self.subsets)])

        def one(states, mask):
            member = {n: nnx.merge(graphs[n][0], s) for n, s in states.items()}
            out = member["students"](drop_modalities(batch["image"], mask[None]))
            seg = self.seg_loss(out["logits"], batch["label"], batch["valid"])[0]
            terms, loss = {"seg": seg}, seg
            if distil:
                teacher = full if o.teacher_view == "full" else jax.lax.stop_gradient(self.teacher_output(models, latents, mask))
                kd, kd_parts = distillation_loss(o.kd, teacher, out, batch["label"], batch["valid"], self.constants, ramp)
                terms.update(kd_parts)
                terms["kd"] = kd
                loss = loss + o.kd_weight * kd
            style = style_features(out).astype(jnp.float32)
            if o.kd == "smunet":
                terms["adv_s"] = student_adversarial_loss(member["discriminators"](style))[0]
                loss = loss + self.constants.smunet_adversarial_weight * terms["adv_s"]
            return {"loss": loss, **terms, "style": style}

        out = family.map_states(one, {n: s for n, (_, s) in graphs.items()}, masks, how=self.config.model.family_map)
        parts = {k: jnp.mean(v) for k, v in out.items() if k not in ("loss", "style")}
        for slot, s in enumerate(self.subsets):
            parts.update({f"{SUBSET_NAMES[s]}/{k}": v[slot] for k, v in out.items() if k not in ("style",)})
        shared = {}
        if o.kd == "smunet":
            shared = {"teacher_style": style_features(full).astype(jnp.float32), "student_style": out["style"]}
        return jnp.sum(out["loss"]), parts, shared

    def discriminator_loss(self, models, batch, key, context=None):
        """SMU-Net's style discriminators: teacher bottleneck features real, each student's fake."""
        def one(disc, student):
            return discriminator_loss(disc(context["teacher_style"]), disc(student))

        losses, parts = family.map_members(one, models["discriminators"], context["student_style"],
                                           how=self.config.model.family_map)
        out = {k: jnp.mean(v) for k, v in parts.items()}
        return jnp.sum(losses), out

    # --- inference ---------------------------------------------------------------------
    def served_subsets(self):
        return tuple(range(len(SUBSET_NAMES))) if self.serving == "teacher" else self.subsets

    def inference_models(self, stage):
        return TEACHER_MODELS if stage == "teacher" else ("students",)

    def predict(self, models, image, modality_mask, subset=None):
        """The teacher on the present modalities' latents, or the student serving `subset`."""
        if "students" not in models:
            latents = self.encode(models, image)["mean"]
            return probabilities("labels", self.teacher_output(models, latents, modality_mask)["logits"])
        slot = jnp.asarray(self.slots)[subset if subset is not None else len(SUBSET_NAMES) - 1]
        student = family.member(models["students"], slot)
        return probabilities("labels", student(drop_modalities(image, modality_mask))["logits"])
