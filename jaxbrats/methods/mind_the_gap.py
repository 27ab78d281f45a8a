"""Mind the Gap ("Mind the Gap: Promoting Missing Modality Brain Tumor Segmentation with Alignment",
Liu et al. 2024, arXiv:2409.19366): a teacher whose per-modality latents are aligned to an anchor,
then students distilled from it with a prior method's KD loss.

No public code, and the text is terse. What it gives and what is ours:

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
  names the CE; Dice is what every KD baseline adds).
- The teacher's prediction for a modality subset (`teacher_inference`; the paper
  does not say how a teacher trained by eq. 7 combines modalities, ours):
  "each" = C*(Z_j) for each PRESENT modality, their softmax probabilities
  averaged (as C* was trained: on one latent at a time); "mean_latent" = C* on
  the mean of the present latents (as "combined" trains it). "auto" (default)
  follows `teacher_seg`: "each" for "each", "mean_latent" for "combined" and
  "both" (trained on the mean of the four). It serves evaluation (`eval
  --stage teacher`, all 15 subsets) AND what students distil from, by the same
  rule: under "each" the teacher's output is log(mean_j softmax C*(Z_j)) as
  logits and the mean of the present C*(Z_j)'s features as features (ours).
  So Table IV's "none" row compares alignment, not a train/test mismatch (C*
  trained on single latents but scored on their mean). Labels, for the
  teacher and the students, are the argmax of the softmax (`decoding`; the
  KD baselines' public evaluations do so, e.g. ProtoKD's).
- Anchors (`anchor`, `losses.alignment`; every term a mean over the crop's
  valid voxels, padding excluded): "none" (Table IV's "without"), "normal"
  (P_N: KL to N(0, 1) of a learned mean and log-variance per latent voxel; C*
  sees a sample mu + sigma eps in training, `normal_sample`, the mean at
  inference, as a VAE), "modality" (P_k: MSE to Z_k, k = `anchor_modality`,
  T1ce by default as the paper's Table V picks), "mix" (P_mix, the paper's
  method: sum_j w_j ||Z* - Z_j||^2, w learned with the teacher, not frozen).
- P_mix's target (`mix_target`). The paper DEFINES P_mix as the weighted
  mixture sum_j w_j P(Z_j), but the only loss it WRITES for it is
  sum_j w_j ||Z_k - Z_j||^2 against a prior modality's latent ("an optimal
  latent space for a prior modality can serve as a foundational anchor", the
  anchor written as P_k's). Default "prior" (the written loss, k =
  `anchor_modality`): the anchor's own residual is 0, so its weight is the one
  that grows, as the paper's learned weights favour T1ce (T1 0.7759, T2 0.8977,
  T1ce 2.2055, FLAIR 0.3055); "mixture" (the definition): Z* = sum_j w_j Z_j /
  sum_j w_j, where the weight that grows is whichever latent lies nearest the
  mixture (tools/mix_weights_sim.py shows both).
- `hold_target` (default true, ours): the target gets no gradient, so it is an
  anchor the others move towards. It matters for P_k and for P_mix's "prior"
  target (a live Z_k would also be pulled towards the others). With the
  "mixture" target it changes nothing, for the latents or the weights: Z* is
  the minimiser of sum_j w_j ||Z - Z_j||^2, so the term's gradient through Z*
  is zero.
- P_mix's weights (`losses.alignment.mix_weights`, ours: the paper states no
  normalisation): w = mix_floor + (mix_sum - 4 mix_floor) softmax(raw): each in
  [mix_floor, mix_sum - 3 mix_floor], summing to `mix_sum` (default 4: unit
  weights at the start; the paper's reported weights sum to 4.1846, which the
  shipped configs use, so those values lie in the range). They learn from the
  alignment term only (its gradient in w_j is modality j's residual; never
  from segmentation), are their own model "mix" (own learning rate with the
  optimiser key `model_lr = {mix = ...}`), are never weight-decayed
  (`undecayed`), and are logged as w/<modality>. With Adam a weight moves
  about its learning rate per step in raw units whatever the residuals' size,
  so how far they travel is set by the weights' learning rate and the
  schedule (tools/mix_weights_sim.py). Unit weight (`align_weight`), as eq. 7.
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
  discriminator is a family (one per student), trained in a second update, on
  bottleneck features: "real" is the style of the same teacher view the KD
  term uses (the full teacher, or the student's subset teacher), "fake" the
  student's.
- Table I's columns: "Original Method" (each KD method with its usual
  4-channel teacher) is `teacher_from` = a baseline run's work directory (or
  its checkpoints/<stage> folder; also an RIRN run's teacher): that run's U-Net
  ("unet", or RIRN's "teacher") becomes the frozen teacher of the students,
  and the run is the students stage alone (no teacher stage: `train --stage
  students` works in a fresh work directory; the students' seeds are then
  train.seed + 0, a two-stage run's students use train.seed + 1). Its [model]
  must build the same U-Net as this run's (widths, blocks, groups, upsample:
  else one line), and the run must stay where `teacher_from` names it (its
  config.json gives the output head). A region teacher (the baseline's default
  sigmoid WT/TC/ET head) is converted to the students' label softmax by
  `losses.distillation.label_logits_from_region_logits`; a "labels" teacher is
  used as it is. "without Alignment" is `anchor = "none"`, "with P_N / P_k /
  P_mix" the other anchors.

The code, by stage: `AlignedTeacher` is stage "teacher" (encoders, anchor, C*, eq. 7, and the
teacher's output for a subset); `KDStudents` is stage "students" (the teacher's views, the KD
losses, SMU-Net's discriminators); `MindTheGap` holds the hooks the engine calls and hands each
stage's work to them. What dedicated students share with RIRN (slots, prediction, per-subset
metrics, a teacher from another run) is `methods.students`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbrats.config import check_choice, check_entries, check_range
from jaxbrats.errors import ConfigError
from jaxbrats.labels import NUM_LABELS, REGIONS
from jaxbrats.losses import label_loss
from jaxbrats.losses.adversarial import student_adversarial_loss
from jaxbrats.losses.alignment import ANCHORS, MIX_TARGETS, mix_alignment, mix_weights, modality_alignment, normal_kl
from jaxbrats.losses.distillation import (
    KD_LOSSES,
    KDConstants,
    distillation_loss,
    label_logits_from_region_logits,
    sigmoid_rampup,
    style_features,
)
from jaxbrats.methods.base import Method, Update
from jaxbrats.methods.students import (
    Students,
    TeacherRun,
    discriminator_family,
    family_discriminator_loss,
    find_teacher_run,
    restore_teacher,
)
from jaxbrats.modalities import MODALITIES, SUBSET_NAMES, drop_modalities, student_subsets
from jaxbrats.networks import family
from jaxbrats.networks.factory import probabilities, unet_config
from jaxbrats.networks.latent_encoder import LatentEncoder, LatentEncoderConfig, encode_modalities
from jaxbrats.networks.unet import UNet

TEACHER_SEG = ("each", "combined", "both")
TEACHER_INFERENCE = ("auto", "each", "mean_latent")
TEACHER_VIEWS = ("full", "subset")
TEACHER_MODELS = ("encoders", "predictor")


@dataclasses.dataclass(frozen=True)
class MindTheGapOptions:
    anchor: str = "mix"  # none | normal (P_N) | modality (P_k) | mix (P_mix, the paper's)
    anchor_modality: str = "t1ce"  # k of P_k, and the prior of mix_target = "prior"
    mix_target: str = "prior"  # Z* of P_mix: the prior modality's latent (the written loss) | the weighted mixture
    mix_floor: float = 0.1  # the least P_mix weight (ours)
    mix_sum: float = 4.0  # what the P_mix weights sum to (ours; the paper's reported weights sum to 4.1846)
    hold_target: bool = True  # the anchor's target gets no gradient (no effect with mix_target = "mixture")
    normal_sample: bool = True  # P_N: the predictor sees mu + sigma eps in training (VAE), else mu
    align_weight: float = 1.0
    shared_encoder: bool = False  # one encoder for all modalities | one per modality
    encoder_blocks: int = 1
    latent_channels: int = 0  # 0: model.widths[0]
    teacher_seg: str = "each"  # eq. 7: C* on each latent | on their mean | both
    #: how the teacher predicts a subset (eval and what students distil from): average C*(Z_j)'s softmax over
    #: the present modalities | C* on the mean of the present latents | auto: as `teacher_seg` trained C*
    teacher_inference: str = "auto"
    class_weights: tuple[float, ...] = ()  # CE weight per internal label (teacher and students)
    #: "all" (the 15 subsets) or a list of subset names; the four single modalities: Table I
    students: object = ("flair", "t1ce", "t1", "t2")
    kd: str = "pmkl"  # none (unimodal) | kdnet | pmkl | protokd | smunet
    kd_weight: float = 1.0  # scales the whole L_KD (ours; the constants inside are the baselines')
    teacher_view: str = "full"  # what students distil from: the full-modality teacher | their own modalities
    #: SMU-Net's consistency ramp-up (sigmoid, ACN's) length in steps; the code ramps over 20 epochs; 0: none
    ramp_steps: int = 0
    disc_width: int = 64  # SMU-Net's style discriminator (the shared two-layer discriminator; width ours)
    #: Table I's "Original Method": another run's plain U-Net (a baseline run's work directory, or its
    #: checkpoints/<stage>) as the students' frozen teacher; the run is then the students stage alone
    teacher_from: str = ""

    def validate(self, where: str) -> None:
        check_choice(f"{where}.anchor", self.anchor, ANCHORS)
        check_choice(f"{where}.anchor_modality", self.anchor_modality, MODALITIES)
        check_choice(f"{where}.mix_target", self.mix_target, MIX_TARGETS)
        check_range(f"{where}.mix_floor", self.mix_floor, 0, 1, high_open=True)
        if not self.mix_sum > len(MODALITIES) * self.mix_floor:
            raise ConfigError(
                f"{where}.mix_sum must exceed {len(MODALITIES)} x {where}.mix_floor = "
                f"{len(MODALITIES) * self.mix_floor:g}, got {self.mix_sum}"
            )
        check_range(f"{where}.align_weight", self.align_weight, 0)
        check_range(f"{where}.encoder_blocks", self.encoder_blocks, 0)
        check_range(f"{where}.latent_channels", self.latent_channels, 0)
        check_choice(f"{where}.teacher_seg", self.teacher_seg, TEACHER_SEG)
        check_choice(f"{where}.teacher_inference", self.teacher_inference, TEACHER_INFERENCE)
        if self.class_weights and len(self.class_weights) != NUM_LABELS:
            raise ConfigError(f"{where}.class_weights needs {NUM_LABELS} values, got {list(self.class_weights)}")
        check_entries(f"{where}.class_weights", self.class_weights, 0)
        student_subsets(list(self.students) if isinstance(self.students, tuple) else self.students, f"{where}.students")
        check_choice(f"{where}.kd", self.kd, KD_LOSSES)
        check_range(f"{where}.kd_weight", self.kd_weight, 0)
        check_choice(f"{where}.teacher_view", self.teacher_view, TEACHER_VIEWS)
        check_range(f"{where}.ramp_steps", self.ramp_steps, 0)
        check_range(f"{where}.disc_width", self.disc_width, 1)
        if not isinstance(self.teacher_from, str):
            raise ConfigError(f"{where}.teacher_from must be a path (a string), got {self.teacher_from!r}")


class MixWeights(nnx.Module):
    """P_mix's learnable weights, one unconstrained parameter per modality (`alignment.mix_weights`)."""

    def __init__(self, count: int):
        self.raw = nnx.Param(jnp.zeros((count,), jnp.float32))


def check_latent_channels(config, options: MindTheGapOptions) -> None:
    """The encoders' GroupNorm splits the latent's channels into `model.groups` groups."""
    channels = options.latent_channels or config.model.widths[0]
    if channels % config.model.groups:
        raise ConfigError(
            f"method.latent_channels ({channels}) must be divisible by model.groups = "
            f"{config.model.groups} (GroupNorm in the encoders)"
        )


def inference_rule(options: MindTheGapOptions) -> str:
    """How the teacher predicts a subset: "each" or "mean_latent" (`teacher_inference`, "auto" resolved)."""
    if options.teacher_inference != "auto":
        return options.teacher_inference
    return "each" if options.teacher_seg == "each" else "mean_latent"


def seg_loss(options: MindTheGapOptions, logits, labels, valid):
    """The label softmax's CE + soft Dice, the teacher's and the students' alike."""
    return label_loss(logits, labels, valid, class_weights=options.class_weights or None)


# --- the teacher's latents and outputs ------------------------------------------------------------


def shares(modality_mask, j: int, n: int):
    """(J, N) weights of the present modalities (each 1 / their count) from a (N, J) or (J,) mask."""
    mask = jnp.broadcast_to(jnp.asarray(modality_mask, jnp.float32), (n, j)).T
    return mask / jnp.maximum(jnp.sum(mask, axis=0, keepdims=True), 1.0)


def combine(latents, modality_mask):
    """The mean of the present modalities' latents: (J, N, ...) and (N, J) or (J,) -> (N, ...)."""
    share = shares(modality_mask, latents.shape[0], latents.shape[1])
    return jnp.einsum("jn,jn...->n...", share, latents.astype(jnp.float32))


def fold(a):
    """(J, N, ...) -> (J*N, ...): the J latents in one predictor pass."""
    return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def per_latent_outputs(predictor, latents) -> dict:
    """C*(Z_j) for every modality in one predictor pass: {"logits", "encoder", "decoder"}, each (J, N, ...)."""
    j, n = latents.shape[:2]
    out = predictor(fold(latents))

    def unfold(a):
        return a.reshape(j, n, *a.shape[1:])

    return {
        "logits": unfold(out["logits"]),
        "encoder": [unfold(f) for f in out["encoder"]],
        "decoder": [unfold(f) for f in out["decoder"]],
    }


def average_outputs(per, modality_mask) -> dict:
    """The "each" rule: the present modalities' C*(Z_j) softmax averaged (returned as its log, usable as
    logits), and their features averaged; `per` from `per_latent_outputs`."""
    j, n = per["logits"].shape[:2]
    share = shares(modality_mask, j, n)

    def mean(a):
        return jnp.einsum("jn,jn...->n...", share, a.astype(jnp.float32))

    probs = mean(jax.nn.softmax(per["logits"].astype(jnp.float32), axis=-1))
    return {
        "logits": jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny)),
        "encoder": [mean(f) for f in per["encoder"]],
        "decoder": [mean(f) for f in per["decoder"]],
    }


def teacher_seg_terms(options: MindTheGapOptions, predictor, latents, batch) -> dict:
    """Eq. 7's segmentation terms (`teacher_seg`): "seg_each", C* on every latent alone, the loss summed
    over the modalities; "seg_combined", C* on the mean of the latents."""
    terms = {}
    if options.teacher_seg in ("each", "both"):  # the J latents in one predictor pass
        j = latents.shape[0]

        def tile(a):
            return jnp.tile(a, (j,) + (1,) * (a.ndim - 1))

        logits = predictor(fold(latents))["logits"]
        terms["seg_each"] = j * seg_loss(options, logits, tile(batch["label"]), tile(batch["valid"]))[0]
    if options.teacher_seg in ("combined", "both"):
        logits = predictor(jnp.mean(latents, axis=0))["logits"]
        terms["seg_combined"] = seg_loss(options, logits, batch["label"], batch["valid"])[0]
    return terms


class AlignedTeacher:
    """Stage "teacher" (eq. 7): the modality encoders, the anchor their latents align to, and the
    predictor C*; and what the trained teacher outputs for a subset of modalities (`rule`)."""

    def __init__(self, config, options: MindTheGapOptions):
        self.config = config
        self.options = options
        self.rule = inference_rule(options)
        self.anchor_index = MODALITIES.index(options.anchor_modality)
        self.latent_channels = options.latent_channels or config.model.widths[0]

    def encoder_config(self) -> LatentEncoderConfig:
        m = self.config.model
        return LatentEncoderConfig(
            channels=self.latent_channels,
            blocks=self.options.encoder_blocks,
            variational=self.options.anchor == "normal",
            groups=m.groups,
            dtype=m.dtype,
            conv_impl=m.conv_impl,
            remat=m.remat,
        )

    def models(self, encoders_root, predictor_root) -> dict:
        """The encoders (one per modality, a family, or one shared), C* and the P_mix weights."""
        enc = self.encoder_config()
        if self.options.shared_encoder:
            encoders = LatentEncoder(enc, nnx.Rngs(encoders_root))
        else:
            keys = family.member_keys(encoders_root, range(len(MODALITIES)))
            encoders = family.stack(lambda r: LatentEncoder(enc, r), keys)
        predictor_config = unet_config(self.config, NUM_LABELS, in_channels=self.latent_channels)
        models = {"encoders": encoders, "predictor": UNet(predictor_config, nnx.Rngs(predictor_root))}
        if self.options.anchor == "mix":
            models["mix"] = MixWeights(len(MODALITIES))
        return models

    def encode(self, models, image, key=None) -> dict:
        """Every modality's latent (J, N, D, H, W, C) (a VAE sample when `key` is given and P_N samples)."""
        out = encode_modalities(models["encoders"], image, self.options.shared_encoder, self.config.model.family_map)
        latent = out["latent"]
        if out["log_var"] is not None and key is not None and self.options.normal_sample:
            latent = latent + jnp.exp(0.5 * out["log_var"]) * jax.random.normal(key, latent.shape, latent.dtype)
        return {"latent": latent, "mean": out["latent"], "log_var": out["log_var"]}

    def alignment(self, models, encoded, valid=None):
        """(J,) alignment terms of the anchor over the `valid` voxels, and the P_mix weights (or None)."""
        o = self.options
        if o.anchor == "normal":
            return normal_kl(encoded["mean"], encoded["log_var"], valid), None
        if o.anchor == "modality":
            return modality_alignment(encoded["latent"], self.anchor_index, o.hold_target, valid), None
        if o.anchor == "mix":
            weights = mix_weights(models["mix"].raw[...], o.mix_floor, o.mix_sum)
            terms = mix_alignment(encoded["latent"], weights, o.mix_target, self.anchor_index, o.hold_target, valid)
            return terms, weights
        return jnp.zeros((len(MODALITIES),), jnp.float32), None

    def loss(self, models, batch, key):
        """Eq. 7: sum_j [align(Z_j) + CE(C*(Z_j))] (`teacher_seg` = "each"), plus the combined term."""
        encoded = self.encode(models, batch["image"], key)
        terms, weights = self.alignment(models, encoded, batch["valid"])
        parts = teacher_seg_terms(self.options, models["predictor"], encoded["latent"], batch)
        seg = jnp.zeros((), jnp.float32)
        for value in parts.values():
            seg = seg + value
        align = jnp.sum(terms)
        parts.update({"seg": seg, "align": align})
        parts.update({f"align/{m}": terms[i] for i, m in enumerate(MODALITIES)})
        if weights is not None:
            parts.update({f"w/{m}": weights[i] for i, m in enumerate(MODALITIES)})
        return seg + self.options.align_weight * align, parts

    def output(self, models, latents, modality_mask):
        """The teacher's output for the present modalities (`rule`): logits over the labels + features."""
        if self.rule == "each":
            return average_outputs(per_latent_outputs(models["predictor"], latents), modality_mask)
        return models["predictor"](combine(latents, modality_mask))

    def predict(self, models, image, modality_mask):
        """Region probabilities for the present modalities ("each": the logits are log(mean_j softmax C*(Z_j)))."""
        return self.predict_from_features(models, self.window_features(models, image), modality_mask)

    def window_features(self, models, image) -> dict:
        """What does not depend on the subset: every modality's latent (the mean under P_N) and, for
        "each", C*(Z_j)'s label logits of every latent (J, N, ..., labels)."""
        latents = self.encode(models, image)["mean"]
        if self.rule == "each":
            return {"logits": per_latent_outputs(models["predictor"], latents)["logits"]}
        return {"latents": latents}

    def predict_from_features(self, models, features, modality_mask):
        """The present modalities' share of `window_features`: their softmax averaged ("each"), or C* on
        their latents' mean ("mean_latent")."""
        if "logits" in features:
            per = {"logits": features["logits"], "encoder": [], "decoder": []}
            logits = average_outputs(per, modality_mask)["logits"]
        else:
            logits = models["predictor"](combine(features["latents"], modality_mask))["logits"]
        return probabilities("labels", logits)

    def basis(self, models, image) -> dict:
        """What every view the students distil from is computed from, once per step (no gradient)."""
        latents = self.encode(models, image)["latent"]  # no key: the mean under P_N
        if self.rule == "each":  # C*(Z_j) do not depend on the view: computed once
            return jax.lax.stop_gradient({"per": per_latent_outputs(models["predictor"], latents)})
        return jax.lax.stop_gradient({"latents": latents})

    def view(self, models, basis, mask) -> dict:
        """The teacher seeing the modalities of `mask` (J,), from `basis` (label logits + features)."""
        if "per" in basis:
            return jax.lax.stop_gradient(average_outputs(basis["per"], mask))
        return jax.lax.stop_gradient(models["predictor"](combine(basis["latents"], mask)))


# --- a teacher from another run (`teacher_from`) and the students --------------------------------


def outside_teacher(config, run: TeacherRun, root) -> UNet:
    """An untrained U-Net shaped like the `teacher_from` run's (its head's width from its output)."""
    channels = len(REGIONS) if run.output == "regions" else NUM_LABELS
    return UNet(unet_config(config, channels, run.deep_supervision), nnx.Rngs(root))


def outside_teacher_view(teacher, output: str, image, mask) -> dict:
    """Another run's U-Net on the modalities of `mask` (J,), its head read in the students' convention
    (label logits: a region head converted by `label_logits_from_region_logits`)."""
    out = teacher(drop_modalities(image, mask[None]))
    if output == "regions":
        out = {**out, "logits": label_logits_from_region_logits(out["logits"])}
    return jax.lax.stop_gradient({k: out[k] for k in ("logits", "encoder", "decoder")})


def student_terms(options, constants: KDConstants, member, batch, mask, teacher_of, ramp, own_teacher_style: bool):
    """One student's L_seg + kd_weight L_KD (+ SMU-Net's adversarial term) as "loss", its terms, and its
    style features for the discriminators' update ("style"; with `own_teacher_style` also its own teacher
    view's, "teacher_style"). `teacher_of(mask)` is the teacher's view it distils from."""
    out = member["students"](drop_modalities(batch["image"], mask[None]))
    seg = seg_loss(options, out["logits"], batch["label"], batch["valid"])[0]
    terms, loss = {"seg": seg}, seg
    teacher = None
    if options.kd != "none":
        teacher = teacher_of(mask)
        kd, kd_parts = distillation_loss(options.kd, teacher, out, batch["label"], batch["valid"], constants, ramp)
        terms.update(kd_parts)
        terms["kd"] = kd
        loss = loss + options.kd_weight * kd
    style = style_features(out).astype(jnp.float32)
    shared = {"style": style}
    if options.kd == "smunet":
        terms["adv_s"] = student_adversarial_loss(member["discriminators"](style))[0]
        loss = loss + constants.smunet_adversarial_weight * terms["adv_s"]
        if own_teacher_style:  # the discriminator's "real": this student's own teacher view, as its KD term
            shared["teacher_style"] = style_features(teacher).astype(jnp.float32)
    return {"loss": loss, **terms, **shared}


class KDStudents:
    """Stage "students": every student distilled (`kd`) from a view of the frozen teacher (`teacher_view`:
    the full set or the student's own modalities), that teacher being stage "teacher"'s (`aligned`) or
    another run's U-Net (`teacher_from`); and SMU-Net's style discriminators."""

    def __init__(self, config, options: MindTheGapOptions, students: Students, aligned: AlignedTeacher, teacher_run):
        self.config = config
        self.options = options
        self.students = students
        self.aligned = aligned
        self.teacher_run = teacher_run  # () -> the `teacher_from` run's `TeacherRun`, resolved when first needed
        self.constants = KDConstants()

    def basis(self, models, image) -> dict:
        """What every view of the teacher is computed from, once per step (no gradient)."""
        return {"image": image} if self.options.teacher_from else self.aligned.basis(models, image)

    def view(self, models, basis, mask) -> dict:
        """The teacher seeing the modalities of `mask` (J,), in the students' convention (label logits)."""
        if self.options.teacher_from:
            return outside_teacher_view(models["teacher"], self.teacher_run().output, basis["image"], mask)
        return self.aligned.view(models, basis, mask)

    def loss(self, models, batch, context):
        """The sum over students of L_seg + kd_weight L_KD (+ SMU-Net's adversarial term)."""
        o = self.options
        distil = o.kd != "none"
        basis = self.basis(models, batch["image"]) if distil else None
        full = (
            self.view(models, basis, jnp.ones(len(MODALITIES), bool)) if distil and o.teacher_view == "full" else None
        )
        ramp = sigmoid_rampup(context["step"], o.ramp_steps) if o.ramp_steps else 1.0

        def teacher_of(mask):
            return full if full is not None else self.view(models, basis, mask)

        def one(member, mask, subset):
            return student_terms(o, self.constants, member, batch, mask, teacher_of, ramp, full is None)

        trained = ("students", "discriminators") if o.kd == "smunet" else ("students",)  # the families mapped
        out = self.students.map(one, models, [n for n in trained if n in models], self.config.model.family_map)
        private = ("style", "teacher_style")
        parts = {k: jnp.mean(v) for k, v in out.items() if k not in ("loss", *private)}
        parts.update(self.students.named(out, skip=private))
        shared = {}
        if o.kd == "smunet":
            teacher_style = out["teacher_style"] if full is None else style_features(full).astype(jnp.float32)
            shared = {"teacher_style": teacher_style, "student_style": out["style"]}
        return jnp.sum(out["loss"]), parts, shared

    def discriminator_loss(self, models, context):
        """SMU-Net's style discriminators: the teacher view's bottleneck features real (the full teacher's,
        shared, or each student's subset teacher's), each student's fake."""
        losses, parts = family_discriminator_loss(
            models["discriminators"],
            context["teacher_style"],
            context["student_style"],
            real_per_member=self.options.teacher_view == "subset",
            how=self.config.model.family_map,
        )
        return jnp.sum(losses), parts


class MindTheGap(Method):
    name = "mind_the_gap"
    Options = MindTheGapOptions
    stages = ("teacher", "students")
    #: The teacher and the students are softmax networks over the labels: their labels are the argmax
    #: (no public code; the KD baselines' evaluation, e.g. ProtoKD's, takes the argmax of the
    #: window-averaged softmax).
    decoding = "argmax"

    def __init__(self, config):
        super().__init__(config)
        o = self.options
        if o.teacher_from:  # Table I's "Original Method": students of another run's U-Net, no teacher stage
            self.stages = ("students",)
        self.students = Students(
            student_subsets(list(o.students) if isinstance(o.students, tuple) else o.students), self.name
        )
        self.subsets = self.students.subsets
        self.aligned = AlignedTeacher(config, o)  # stage "teacher"
        self.latent_channels = self.aligned.latent_channels
        self._teacher_run = None
        self.distilled = KDStudents(config, o, self.students, self.aligned, self.teacher_run)  # stage "students"
        self.constants = self.distilled.constants

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        check_latent_channels(config, cls.parse_options(config))
        cls.refuse_coupled_clipping(config, "students", "students")
        cls.refuse_coupled_clipping(config, "students", "discriminator", members="discriminators")

    @property
    def inference_rule(self) -> str:
        return self.aligned.rule

    def teacher_run(self) -> TeacherRun:
        """The run `teacher_from` names (`students.find_teacher_run`), resolved once."""
        if self._teacher_run is None:
            self._teacher_run = find_teacher_run(self.options.teacher_from, self.config)
        return self._teacher_run

    def start_from(self, stage, abstract):
        """`teacher_from`: the students' teacher is the other run's U-Net, restored in this run's shapes."""
        if stage != "students" or not self.options.teacher_from:
            return {}
        run = self.teacher_run()
        return {"teacher": restore_teacher(run.checkpoints, (run.model,), abstract()["teacher"])}

    # --- models ------------------------------------------------------------------------
    def outside_teacher(self, stage) -> bool:
        return stage == "students" and bool(self.options.teacher_from)

    def families(self, stage):
        out = {} if self.options.shared_encoder or self.outside_teacher(stage) else {"encoders": len(MODALITIES)}
        if stage == "students":
            out["students"] = len(self.students)
            if self.options.kd == "smunet":
                out["discriminators"] = len(self.students)
        return out

    def init_models(self, stage, rngs):
        roots = jax.random.split(rngs.params(), 4)  # encoders, predictor (or teacher), students, discriminators
        if self.outside_teacher(stage):
            models = {"teacher": outside_teacher(self.config, self.teacher_run(), roots[1])}
        else:
            models = self.aligned.models(roots[0], roots[1])
        if stage == "students":
            cfg = unet_config(self.config, NUM_LABELS)
            models["students"] = self.students.stack(lambda r: UNet(cfg, r), roots[2])
            if self.options.kd == "smunet":
                width, channels = self.options.disc_width, self.config.model.widths[-1]
                models["discriminators"] = discriminator_family(self.config, self.students, channels, width, roots[3])
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
            updates.append(
                Update(group="discriminator", trainable={"discriminators": nnx.Param}, loss=self.discriminator_loss)
            )
        return updates

    def undecayed(self, stage, group):
        """Models of an optimiser group that weight decay leaves alone (the engine masks them): the P_mix
        weights, which would otherwise be pulled towards equal weights whatever the alignment says."""
        return ("mix",) if stage == "teacher" and self.options.anchor == "mix" else ()

    def known_groups(self, stage):
        return ("teacher",) if stage == "teacher" else ("students", "discriminator")

    def optimizer(self, stage, group):
        """The configured optimiser; the P_mix weights' own rate (`model_lr.mix`) is kept only while
        they exist, so one config serves every anchor of Table IV (`anchor = "none"` has no weights)."""
        cfg = super().optimizer(stage, group)
        if "mix" in cfg.model_lr and not (stage == "teacher" and self.options.anchor == "mix"):
            cfg = dataclasses.replace(cfg, model_lr={k: v for k, v in cfg.model_lr.items() if k != "mix"})
        return cfg

    # --- the teacher (`AlignedTeacher`) ------------------------------------------------
    def encoder_config(self) -> LatentEncoderConfig:
        return self.aligned.encoder_config()

    def encode(self, models, image, key=None) -> dict:
        return self.aligned.encode(models, image, key)

    def alignment(self, models, encoded, valid=None):
        return self.aligned.alignment(models, encoded, valid)

    def teacher_loss(self, models, batch, key, context=None):
        return self.aligned.loss(models, batch, key)

    # --- the students (`KDStudents`) ---------------------------------------------------
    def teacher_basis(self, models, image) -> dict:
        return self.distilled.basis(models, image)

    def teacher_view_output(self, models, basis, mask) -> dict:
        return self.distilled.view(models, basis, mask)

    def students_loss(self, models, batch, key, context=None):
        return self.distilled.loss(models, batch, context)

    def discriminator_loss(self, models, batch, key, context=None):
        return self.distilled.discriminator_loss(models, context)

    # --- inference ---------------------------------------------------------------------
    def served_subsets(self):
        return tuple(range(len(SUBSET_NAMES))) if self.serving == "teacher" else self.subsets

    def inference_models(self, stage):
        return TEACHER_MODELS if stage == "teacher" else ("students",)

    def predict(self, models, image, modality_mask, subset=None):
        """The teacher on the present modalities (`inference_rule`), or the student serving `subset`."""
        return self.predict_from_features(models, self.window_features(models, image), image, modality_mask, subset)

    def window_features(self, models, window):  # the teacher's per-modality work; the students share none
        return None if "students" in models else self.aligned.window_features(models, window)

    def predict_from_features(self, models, features, window, modality_mask, subset=None):
        if features is None:  # the students
            return self.students.predict(models["students"], window, modality_mask, subset, "labels")
        return self.aligned.predict_from_features(models, features, modality_mask)
