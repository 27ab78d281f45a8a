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
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbrats.config import check_choice, check_entries, check_range
from jaxbrats.errors import ConfigError
from jaxbrats.labels import NUM_LABELS, REGIONS
from jaxbrats.losses import label_loss
from jaxbrats.losses.adversarial import discriminator_loss, student_adversarial_loss
from jaxbrats.losses.alignment import ANCHORS, MIX_TARGETS, mix_alignment, mix_weights, modality_alignment, normal_kl
from jaxbrats.losses.distillation import (
    KD_LOSSES,
    KDConstants,
    distillation_loss,
    label_logits_from_region_logits,
    sigmoid_rampup,
    style_features,
)
from jaxbrats.methods.base import Method, Update, student_slot
from jaxbrats.modalities import MODALITIES, SUBSET_MASKS, SUBSET_NAMES, drop_modalities, student_subsets
from jaxbrats.networks import family
from jaxbrats.networks.discriminator import Discriminator, DiscriminatorConfig
from jaxbrats.networks.factory import probabilities, unet_config
from jaxbrats.networks.latent_encoder import LatentEncoder, LatentEncoderConfig, encode_modalities
from jaxbrats.networks.unet import UNet
from jaxbrats.runtime.checkpoints import restore_model

TEACHER_SEG = ("each", "combined", "both")
TEACHER_INFERENCE = ("auto", "each", "mean_latent")
TEACHER_VIEWS = ("full", "subset")
TEACHER_MODELS = ("encoders", "predictor")
#: The runs a `teacher_from` U-Net may come from: method -> (model name, output convention or None: the
#: run's `method.output`).
TEACHER_RUNS = {"baseline": ("unet", None), "rirn": ("teacher", "regions")}
#: [model] keys that make two U-Nets the same network (the rest are how it is computed).
ARCHITECTURE_KEYS = ("widths", "blocks", "groups", "upsample")


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


@dataclasses.dataclass(frozen=True)
class TeacherRun:
    """Where a `teacher_from` U-Net comes from."""

    checkpoints: Path  # the stage folder to restore from
    model: str  # its model name there ("unet", "teacher")
    output: str  # "regions" (sigmoid WT/TC/ET) | "labels" (softmax over the internal labels)
    deep_supervision: bool


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
        self.subsets = student_subsets(list(o.students) if isinstance(o.students, tuple) else o.students)
        self.slots = np.full(len(SUBSET_NAMES), -1, np.int32)  # subset index -> the student serving it (-1: none)
        self.slots[list(self.subsets)] = np.arange(len(self.subsets))
        self.anchor_index = MODALITIES.index(o.anchor_modality)
        self.latent_channels = o.latent_channels or config.model.widths[0]
        self.constants = KDConstants()
        self._teacher_run = None

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        o = cls.parse_options(config)
        channels = o.latent_channels or config.model.widths[0]
        if channels % config.model.groups:
            raise ConfigError(
                f"method.latent_channels ({channels}) must be divisible by model.groups = "
                f"{config.model.groups} (GroupNorm in the encoders)"
            )
        cls.refuse_coupled_clipping(config, "students", "students")
        cls.refuse_coupled_clipping(config, "students", "discriminator", members="discriminators")

    @property
    def inference_rule(self) -> str:
        """How the teacher predicts a subset: "each" or "mean_latent" (`teacher_inference`, "auto" resolved)."""
        o = self.options
        if o.teacher_inference != "auto":
            return o.teacher_inference
        return "each" if o.teacher_seg == "each" else "mean_latent"

    # --- a teacher from another run (teacher_from) -------------------------------------
    def teacher_run(self) -> TeacherRun:
        """The run `teacher_from` names: a work directory (its last stage with checkpoints) or one of its
        checkpoints/<stage> folders; its config says which U-Net and which output head. One line if not."""
        if self._teacher_run is None:
            self._teacher_run = self._find_teacher_run(Path(self.options.teacher_from).expanduser())
        return self._teacher_run

    def _find_teacher_run(self, path: Path) -> TeacherRun:
        from jaxbrats.methods import get_method, load_config  # the registry (no import of another method)

        key = "method.teacher_from"
        if (path / "config.json").is_file():
            run, stage = path, None
        elif path.parent.name == "checkpoints" and (path.parent.parent / "config.json").is_file():
            run, stage = path.parent.parent, path.name
        else:
            raise ConfigError(
                f"{key}: {path} is neither a run's work directory (with config.json) nor its checkpoints/<stage> folder"
            )
        try:
            other = load_config(run / "config.json")
        except ConfigError as e:
            raise ConfigError(f"{key}: {run}/config.json cannot be read: {e}") from None
        if other.method_name not in TEACHER_RUNS:
            raise ConfigError(
                f"{key}: {run} is a run of method {other.method_name}; the teacher must be the plain U-Net of a "
                f"{' or '.join(TEACHER_RUNS)} run"
            )
        model, output = TEACHER_RUNS[other.method_name]
        options = get_method(other.method_name).parse_options(other)
        output = output or options.output
        deep = bool(getattr(options, "deep_supervision", False))
        differs = [k for k in ARCHITECTURE_KEYS if getattr(other.model, k) != getattr(self.config.model, k)]
        if differs:
            k = differs[0]
            raise ConfigError(
                f"{key}: {run}'s U-Net has model.{k} = {getattr(other.model, k)!r}, this run's "
                f"{getattr(self.config.model, k)!r} (the KD terms compare the two networks' features)"
            )
        if stage is None:
            stages = [s for s in reversed(get_method(other.method_name).stages) if (run / "checkpoints" / s).is_dir()]
            if not stages:
                raise ConfigError(f"{key}: {run} has no checkpoints (train it first)")
            stage = stages[0]
        return TeacherRun(run / "checkpoints" / stage, model, output, deep)

    def start_from(self, stage, abstract):
        """`teacher_from`: the students' teacher is the other run's U-Net, restored in this run's shapes."""
        if stage != "students" or not self.options.teacher_from:
            return {}
        run = self.teacher_run()
        return {"teacher": restore_model(run.checkpoints, (run.model,), abstract()["teacher"], "method.teacher_from")}

    # --- models ------------------------------------------------------------------------
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

    def outside_teacher(self, stage) -> bool:
        return stage == "students" and bool(self.options.teacher_from)

    def families(self, stage):
        out = {} if self.options.shared_encoder or self.outside_teacher(stage) else {"encoders": len(MODALITIES)}
        if stage == "students":
            out["students"] = len(self.subsets)
            if self.options.kd == "smunet":
                out["discriminators"] = len(self.subsets)
        return out

    def init_models(self, stage, rngs):
        roots = jax.random.split(rngs.params(), 4)  # encoders, predictor (or teacher), students, discriminators
        if self.outside_teacher(stage):
            run = self.teacher_run()
            channels = len(REGIONS) if run.output == "regions" else NUM_LABELS
            models = {"teacher": UNet(unet_config(self.config, channels, run.deep_supervision), nnx.Rngs(roots[1]))}
        else:
            enc = self.encoder_config()
            if self.options.shared_encoder:
                encoders = LatentEncoder(enc, nnx.Rngs(roots[0]))
            else:
                encoders = family.stack(
                    lambda r: LatentEncoder(enc, r), family.member_keys(roots[0], range(len(MODALITIES)))
                )
            models = {
                "encoders": encoders,
                "predictor": UNet(
                    unet_config(self.config, NUM_LABELS, in_channels=self.latent_channels), nnx.Rngs(roots[1])
                ),
            }
            if self.options.anchor == "mix":
                models["mix"] = MixWeights(len(MODALITIES))
        if stage == "students":
            cfg = unet_config(self.config, NUM_LABELS)
            models["students"] = family.stack(lambda r: UNet(cfg, r), family.member_keys(roots[2], self.subsets))
            if self.options.kd == "smunet":
                disc = DiscriminatorConfig(
                    in_channels=self.config.model.widths[-1],
                    width=self.options.disc_width,
                    dtype=self.config.model.dtype,
                    conv_impl=self.config.model.conv_impl,
                )
                models["discriminators"] = family.stack(
                    lambda r: Discriminator(disc, r), family.member_keys(roots[3], self.subsets)
                )
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

    # --- the teacher -------------------------------------------------------------------
    def encode(self, models, image, key=None) -> dict:
        """Every modality's latent (J, N, D, H, W, C) (a VAE sample when `key` is given and P_N samples)."""
        out = encode_modalities(models["encoders"], image, self.options.shared_encoder, self.config.model.family_map)
        latent = out["latent"]
        if out["log_var"] is not None and key is not None and self.options.normal_sample:
            latent = latent + jnp.exp(0.5 * out["log_var"]) * jax.random.normal(key, latent.shape, latent.dtype)
        return {"latent": latent, "mean": out["latent"], "log_var": out["log_var"]}

    @staticmethod
    def shares(modality_mask, j: int, n: int):
        """(J, N) weights of the present modalities (each 1 / their count) from a (N, J) or (J,) mask."""
        mask = jnp.broadcast_to(jnp.asarray(modality_mask, jnp.float32), (n, j)).T
        return mask / jnp.maximum(jnp.sum(mask, axis=0, keepdims=True), 1.0)

    @classmethod
    def combine(cls, latents, modality_mask):
        """The mean of the present modalities' latents: (J, N, ...) and (N, J) or (J,) -> (N, ...)."""
        share = cls.shares(modality_mask, latents.shape[0], latents.shape[1])
        return jnp.einsum("jn,jn...->n...", share, latents.astype(jnp.float32))

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

    def seg_loss(self, logits, labels, valid):
        weights = self.options.class_weights or None
        return label_loss(logits, labels, valid, class_weights=weights)

    def teacher_loss(self, models, batch, key, context=None):
        """Eq. 7: sum_j [align(Z_j) + CE(C*(Z_j))] (`teacher_seg` = "each"), plus the combined term."""
        o = self.options
        encoded = self.encode(models, batch["image"], key)
        latents = encoded["latent"]
        terms, weights = self.alignment(models, encoded, batch["valid"])
        seg = jnp.zeros((), jnp.float32)
        parts = {}
        j, n = latents.shape[:2]
        if o.teacher_seg in ("each", "both"):  # the J latents in one predictor pass, the loss summed over j
            folded = latents.reshape(j * n, *latents.shape[2:])
            tile = lambda a: jnp.tile(a, (j,) + (1,) * (a.ndim - 1))
            each = (
                j * self.seg_loss(models["predictor"](folded)["logits"], tile(batch["label"]), tile(batch["valid"]))[0]
            )
            parts["seg_each"] = each
            seg = seg + each
        if o.teacher_seg in ("combined", "both"):
            combined = self.seg_loss(
                models["predictor"](jnp.mean(latents, axis=0))["logits"], batch["label"], batch["valid"]
            )[0]
            parts["seg_combined"] = combined
            seg = seg + combined
        align = jnp.sum(terms)
        parts.update({"seg": seg, "align": align})
        parts.update({f"align/{m}": terms[i] for i, m in enumerate(MODALITIES)})
        if weights is not None:
            parts.update({f"w/{m}": weights[i] for i, m in enumerate(MODALITIES)})
        return seg + o.align_weight * align, parts

    def per_latent_outputs(self, models, latents) -> dict:
        """C*(Z_j) for every modality in one predictor pass: {"logits", "encoder", "decoder"}, each (J, N, ...)."""
        j, n = latents.shape[:2]
        out = models["predictor"](latents.reshape(j * n, *latents.shape[2:]))
        unfold = lambda a: a.reshape(j, n, *a.shape[1:])
        return {
            "logits": unfold(out["logits"]),
            "encoder": [unfold(f) for f in out["encoder"]],
            "decoder": [unfold(f) for f in out["decoder"]],
        }

    def average_outputs(self, per, modality_mask) -> dict:
        """The "each" rule: the present modalities' C*(Z_j) softmax averaged (returned as its log, usable as
        logits), and their features averaged; `per` from `per_latent_outputs`."""
        j, n = per["logits"].shape[:2]
        share = self.shares(modality_mask, j, n)
        mean = lambda a: jnp.einsum("jn,jn...->n...", share, a.astype(jnp.float32))
        probs = mean(jax.nn.softmax(per["logits"].astype(jnp.float32), axis=-1))
        return {
            "logits": jnp.log(jnp.maximum(probs, jnp.finfo(jnp.float32).tiny)),
            "encoder": [mean(f) for f in per["encoder"]],
            "decoder": [mean(f) for f in per["decoder"]],
        }

    def teacher_output(self, models, latents, modality_mask):
        """The teacher's output for the present modalities (`inference_rule`): logits over the labels + features."""
        if self.inference_rule == "each":
            return self.average_outputs(self.per_latent_outputs(models, latents), modality_mask)
        return models["predictor"](self.combine(latents, modality_mask))

    # --- the students ------------------------------------------------------------------
    def teacher_basis(self, models, image) -> dict:
        """What every view of the students' teacher is computed from, once per step (no gradient)."""
        if self.options.teacher_from:
            return {"image": image}
        latents = self.encode(models, image)["latent"]  # no key: the mean under P_N
        if self.inference_rule == "each":  # C*(Z_j) do not depend on the view: computed once
            return jax.lax.stop_gradient({"per": self.per_latent_outputs(models, latents)})
        return jax.lax.stop_gradient({"latents": latents})

    def teacher_view_output(self, models, basis, mask) -> dict:
        """The teacher seeing the modalities of `mask` (J,), in the students' convention (label logits)."""
        if self.options.teacher_from:
            out = models["teacher"](drop_modalities(basis["image"], mask[None]))
            if self.teacher_run().output == "regions":
                out = {**out, "logits": label_logits_from_region_logits(out["logits"])}
            return jax.lax.stop_gradient({k: out[k] for k in ("logits", "encoder", "decoder")})
        if "per" in basis:
            return jax.lax.stop_gradient(self.average_outputs(basis["per"], mask))
        return jax.lax.stop_gradient(models["predictor"](self.combine(basis["latents"], mask)))

    def students_loss(self, models, batch, key, context=None):
        """The sum over students of L_seg + kd_weight L_KD (+ SMU-Net's adversarial term)."""
        o = self.options
        distil = o.kd != "none"
        basis = self.teacher_basis(models, batch["image"]) if distil else None
        full = (
            self.teacher_view_output(models, basis, jnp.ones(len(MODALITIES), bool))
            if distil and o.teacher_view == "full"
            else None
        )
        ramp = sigmoid_rampup(context["step"], o.ramp_steps) if o.ramp_steps else 1.0
        names = [n for n in ("students", "discriminators") if n in models and n in self.families("students")]
        graphs = {n: nnx.split(models[n]) for n in names}
        masks = jnp.asarray(SUBSET_MASKS[list(self.subsets)])

        def one(states, mask):
            member = {n: nnx.merge(graphs[n][0], s) for n, s in states.items()}
            out = member["students"](drop_modalities(batch["image"], mask[None]))
            seg = self.seg_loss(out["logits"], batch["label"], batch["valid"])[0]
            terms, loss = {"seg": seg}, seg
            teacher = None
            if distil:
                teacher = full if full is not None else self.teacher_view_output(models, basis, mask)
                kd, kd_parts = distillation_loss(
                    o.kd, teacher, out, batch["label"], batch["valid"], self.constants, ramp
                )
                terms.update(kd_parts)
                terms["kd"] = kd
                loss = loss + o.kd_weight * kd
            style = style_features(out).astype(jnp.float32)
            shared = {"style": style}
            if o.kd == "smunet":
                terms["adv_s"] = student_adversarial_loss(member["discriminators"](style))[0]
                loss = loss + self.constants.smunet_adversarial_weight * terms["adv_s"]
                if full is None:  # the discriminator's "real": this student's own teacher view, as its KD term
                    shared["teacher_style"] = style_features(teacher).astype(jnp.float32)
            return {"loss": loss, **terms, **shared}

        private = ("style", "teacher_style")
        out = family.map_states(one, {n: s for n, (_, s) in graphs.items()}, masks, how=self.config.model.family_map)
        parts = {k: jnp.mean(v) for k, v in out.items() if k not in ("loss", *private)}
        for slot, s in enumerate(self.subsets):
            parts.update({f"{SUBSET_NAMES[s]}/{k}": v[slot] for k, v in out.items() if k not in private})
        shared = {}
        if o.kd == "smunet":
            teacher_style = out["teacher_style"] if full is None else style_features(full).astype(jnp.float32)
            shared = {"teacher_style": teacher_style, "student_style": out["style"]}
        return jnp.sum(out["loss"]), parts, shared

    def discriminator_loss(self, models, batch, key, context=None):
        """SMU-Net's style discriminators: the teacher view's bottleneck features real (the full teacher's,
        shared, or each student's subset teacher's), each student's fake."""

        def one(disc, teacher, student):
            return discriminator_loss(disc(teacher), disc(student))

        per_student = self.options.teacher_view == "subset"
        losses, parts = family.map_members(
            one,
            models["discriminators"],
            context["teacher_style"],
            context["student_style"],
            in_axes=(0 if per_student else None, 0),
            how=self.config.model.family_map,
        )
        out = {k: jnp.mean(v) for k, v in parts.items()}
        return jnp.sum(losses), out

    # --- inference ---------------------------------------------------------------------
    def served_subsets(self):
        return tuple(range(len(SUBSET_NAMES))) if self.serving == "teacher" else self.subsets

    def inference_models(self, stage):
        return TEACHER_MODELS if stage == "teacher" else ("students",)

    def predict(self, models, image, modality_mask, subset=None):
        """The teacher on the present modalities (`inference_rule`), or the student serving `subset`."""
        if "students" not in models:  # "each": the logits are log(mean_j softmax C*(Z_j))
            latents = self.encode(models, image)["mean"]
            return probabilities("labels", self.teacher_output(models, latents, modality_mask)["logits"])
        slot, served = student_slot(self.slots, subset, self.subsets, self.name)
        student = family.member(models["students"], slot)
        return jnp.where(
            served, probabilities("labels", student(drop_modalities(image, modality_mask))["logits"]), jnp.nan
        )
