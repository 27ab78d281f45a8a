"""RIRN ("Reconstruct incomplete relation for incomplete modality brain tumor segmentation",
Su et al., Neural Networks 2024): a full-modality teacher and
dedicated missing-modality students, trained together, the students taught by relation
distillation (CRR, CAR) and an adversarial term.

What the paper gives and how it maps here (choices are marked as ours):

- Teacher: the shared U-Net on the full image, trained with Dice only (eq. 1's
  L_full). One teacher serves every student: that equals the paper's
  teacher-student pairs because no student-side term reaches the teacher (its
  outputs and features enter CRR, CAR and the discriminator through
  `stop_gradient`; tests/test_rirn.py checks the teacher's gradient).
  `method.teacher_from` (ours) starts from another run's U-Net and freezes it.
- Students: one U-Net per modality subset (`method.students`: "all" = the 15,
  or a list of names, e.g. ["t1ce"] for Table 4), stacked as one family
  (`networks.family`): one jitted step trains them all, vmapped, the family
  split along the mesh's "model" axis. The paper's student takes the N
  available modalities as N channels; here it takes the 4 channels with the
  missing ones zero-filled, which is the same function: a zero channel adds
  nothing to the first convolution (and its weights get no gradient), so the
  student computes what an N-channel first convolution would.
  Region sigmoid outputs (the paper thresholds P_region), Dice only.
  Backbone per the paper: 16 initial channels, spatial dropout 0.2 after the
  first encoder convolution (`model.stem_dropout`, in the configs).
- L_SEG = Dice(teacher, full) + Dice(student, incomplete) (eq. 1). Each Dice is
  the SUM of the WT, TC and ET soft Dice losses (`dice_regions = "sum"`): the
  paper does not say how regions combine; ACN's public code, on which RIRN
  builds, sums them. Only the sum is taken from ACN, not its 0.2/0.8 weighting
  of the teacher's and student's terms (eq. 1 is unweighted). `"mean"`
  weighs L_SEG a third as much against CRR, CAR and ADV.
- Test: the paper centre-crops ("For testing, we use center crop"; the size,
  160x192x128, is ACN's validation crop): `eval.center_crop`, image and
  labels alike. The default evaluation slides windows over the whole brain.
- CRR (eqs. 2-5, `losses.relation.crr_loss`) on the penultimate layer (the
  last decoder block's output, full resolution, before the 1x1 head), the
  mask M_r = 1(P_r^T > 0.5) AND GT_r ("MF", `method.mf`; GT_r alone without
  it), the same teacher-filtered mask for teacher and student. A pair with an
  empty region contributes 0 (`crr_pairs` counts the pairs used).
- CAR (eqs. 6-7, `losses.relation.car_loss`) on an encoder level
  (`method.car_level`, default the bottleneck, 1/8 resolution: the matrix is
  quadratic in voxels: float32, batch 1, 16^3 -> 4096^2 floats = 64 MiB per
  matrix at a 128^3 crop, 20x24x16 -> 225 MiB at 160x192x128; one for the
  teacher and one per student, about twice that with the backward pass;
  `losses.relation.car_memory_bytes`). The paper's softmax(e^{theta^T phi}) is read as the non-local
  block's embedded Gaussian softmax(theta^T phi) over the keys
  (`method.car_axis`). Who owns theta/phi is open in the paper; ours: one
  shared pair, fixed at its random initialisation (`car_embeddings =
  "fixed"`), because trained by L_CAR alone they have a trivial minimiser
  (theta = phi = 0 makes every row uniform for teacher and student: L_CAR = 0).
  `"trained"`: one pair per student, trained by that student's L_CAR (the
  collapse risk is the user's). Embedding width C/2 (the non-local block's).
- ADV (eq. 8, `losses.adversarial`): one discriminator per student (a family),
  two stride-2 3x3x3 convolutions (`networks.discriminator`; widths ours) on
  the region probabilities (`method.adv_input`, or the logits). Eq. 8 is the
  discriminator's objective (teacher -> 1, student -> 0); the student's term,
  which the paper does not write, is the non-saturating -log D(S_out). The
  student update runs first with the discriminators frozen and shares its
  outputs (the step context); the discriminators' update then reads them
  without gradient, so neither side's loss helps the other.
- L = L_SEG + L_CRR + L_CAR + L_ADV (eq. 9): unit weights (the `*_weight`
  options default to 1). The students' objective is the SUM of their losses
  (and the teacher's Dice), so each student's gradient is exactly its own
  loss's: trained together = trained alone (Adam is per parameter; global-norm
  clipping would couple them and is refused).
- Table 4 ablations: `method.crr`, `method.mf`, `method.car`, `method.adv`
  (README lists the rows). On the demo phantom the student alone beats RIRN at
  unit weights; CRR is the cause (docs/ablations.md): its L1 gradient is of
  L_SEG's size and does not shrink near the optimum, and lowering `crr_weight`
  to 0.03 gives the student back its Dice (measured; the default stays the
  paper's unit weight).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbrats.config import check_choice, check_range
from jaxbrats.errors import ConfigError
from jaxbrats.labels import REGIONS, regions_of
from jaxbrats.losses import region_loss
from jaxbrats.losses.adversarial import student_adversarial_loss
from jaxbrats.losses.relation import car_loss, crr_loss, region_masks, resize_to_features
from jaxbrats.losses.segmentation import DICE_CHANNELS
from jaxbrats.methods.base import Method, Update
from jaxbrats.methods.students import Students, discriminator_family, family_discriminator_loss, restore_teacher
from jaxbrats.modalities import drop_modalities, student_subsets
from jaxbrats.networks.factory import unet_config
from jaxbrats.networks.unet import UNet

ADV_INPUTS = ("probabilities", "logits")
CAR_EMBEDDINGS = ("fixed", "trained")
SEG_LOSSES = ("dice", "dice_bce")


@dataclasses.dataclass(frozen=True)
class RIRNOptions:
    #: "all" (the 15 subsets, in the library's order) or a list of subset names ("t1ce", "flair+t2", ...)
    students: object = "all"
    seg_loss: str = "dice"  # the paper: Dice only; "dice_bce" adds BCE (ours, an option)
    #: The Dice of WT, TC and ET summed (ACN's code, on which RIRN builds; the paper is silent)
    #: or averaged ("mean": 1/3 of the weight of L_SEG against CRR, CAR and ADV).
    dice_regions: str = "sum"
    crr: bool = True
    mf: bool = True  # CRR's manual filtering: only voxels the teacher gets right (eq. 3)
    crr_threshold: float = 0.5  # lambda of eq. 3
    car: bool = True
    car_level: int = -1  # encoder level of CAR's features (0: full resolution, -1: the bottleneck)
    car_axis: str = "keys"  # softmax over the keys j (non-local block) or the queries i
    car_embeddings: str = "fixed"  # one fixed random theta/phi pair | one trained pair per student
    adv: bool = True
    adv_input: str = "probabilities"  # what the discriminator sees: region probabilities or logits
    disc_width: int = 64
    crr_weight: float = 1.0
    car_weight: float = 1.0
    adv_weight: float = 1.0
    #: A checkpoint directory of another run (`<workdir>/checkpoints/<stage>`) whose U-Net
    #: ("teacher" or "unet") becomes the teacher, frozen (ours: the paper co-trains it).
    teacher_from: str = ""

    def validate(self, where: str) -> None:
        student_subsets(self.students, f"{where}.students")
        check_choice(f"{where}.seg_loss", self.seg_loss, SEG_LOSSES)
        check_choice(f"{where}.dice_regions", self.dice_regions, DICE_CHANNELS)
        check_range(f"{where}.crr_threshold", self.crr_threshold, 0, 1, low_open=True, high_open=True)
        check_choice(f"{where}.car_axis", self.car_axis, ("keys", "queries"))
        check_choice(f"{where}.car_embeddings", self.car_embeddings, CAR_EMBEDDINGS)
        check_choice(f"{where}.adv_input", self.adv_input, ADV_INPUTS)
        check_range(f"{where}.disc_width", self.disc_width, 1)
        for name in ("crr_weight", "car_weight", "adv_weight"):
            check_range(f"{where}.{name}", getattr(self, name), 0)


class RelationEmbeddings(nnx.Module):
    """CAR's non-local embeddings theta and phi: two 1x1x1 convolutions C -> C/2."""

    def __init__(self, channels: int, rngs: nnx.Rngs):
        inner = max(channels // 2, 1)
        init = nnx.initializers.lecun_normal()
        self.theta = nnx.Param(init(rngs.params(), (channels, inner), jnp.float32))
        self.theta_bias = nnx.Param(jnp.zeros((inner,), jnp.float32))
        self.phi = nnx.Param(init(rngs.params(), (channels, inner), jnp.float32))
        self.phi_bias = nnx.Param(jnp.zeros((inner,), jnp.float32))

    def pair(self):
        return (
            {"kernel": self.theta[...], "bias": self.theta_bias[...]},
            {"kernel": self.phi[...], "bias": self.phi_bias[...]},
        )


def check_car_level(config, options: RIRNOptions) -> None:
    """CAR's encoder level exists in the U-Net (negative: from the bottleneck up)."""
    levels = len(config.model.widths)
    if not -levels <= options.car_level < levels:
        raise ConfigError(
            f"method.car_level must be in [{-levels}, {levels - 1}] (model.widths has {levels} levels), "
            f"got {options.car_level}"
        )


def car_embeddings(config, options: RIRNOptions, students: Students, root) -> nnx.Module:
    """CAR's theta/phi: one fixed pair, or one trained pair per student (`car_embeddings`)."""
    channels = config.model.widths[options.car_level]
    if options.car_embeddings == "trained":
        return students.stack(lambda r: RelationEmbeddings(channels, r), root)
    return RelationEmbeddings(channels, nnx.Rngs(root))


def crr_term(options: RIRNOptions, out, teacher, teacher_probs, gt):
    """L_CRR on the penultimate layer and the number of (sample, region) pairs it used."""
    penultimate = out["decoder"][-1]
    masks = region_masks(
        resize_to_features(teacher_probs, penultimate.shape[1:4]),
        resize_to_features(gt, penultimate.shape[1:4]),
        options.crr_threshold,
        filtered=options.mf,
    )
    loss, parts = crr_loss(teacher["decoder"][-1], penultimate, masks)
    return loss, parts["crr_pairs"]


def car_term(options: RIRNOptions, out, teacher, embeddings):
    """L_CAR on the encoder level `car_level`, through the embeddings theta and phi."""
    theta, phi = embeddings.pair()
    level = options.car_level
    return car_loss(teacher["encoder"][level], out["encoder"][level], theta, phi, options.car_axis)[0]


class RIRN(Method):
    name = "rirn"
    Options = RIRNOptions
    stages = ("train",)

    def __init__(self, config):
        super().__init__(config)
        self.students = Students(student_subsets(self.options.students), self.name)
        self.subsets = self.students.subsets

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        check_car_level(config, cls.parse_options(config))
        cls.refuse_coupled_clipping(config, "train", "model", " for RIRN")
        cls.refuse_coupled_clipping(config, "train", "discriminator", " for RIRN", "discriminators")

    # --- models ------------------------------------------------------------------------
    def families(self, stage):
        k = len(self.students)
        out = {"students": k}
        if self.options.adv:
            out["discriminators"] = k
        if self.options.car and self.options.car_embeddings == "trained":
            out["embeddings"] = k
        return out

    def init_models(self, stage, rngs):
        roots = jax.random.split(rngs.params(), 3)  # students, discriminators, embeddings
        cfg = unet_config(self.config, len(REGIONS))
        models = {
            "teacher": UNet(cfg, rngs),
            "students": self.students.stack(lambda r: UNet(cfg, r), roots[0]),
        }
        if self.options.adv:
            width = self.options.disc_width
            models["discriminators"] = discriminator_family(self.config, self.students, len(REGIONS), width, roots[1])
        if self.options.car:
            models["embeddings"] = car_embeddings(self.config, self.options, self.students, roots[2])
        return models

    def start_from(self, stage, abstract):
        """`teacher_from`: the teacher is another run's U-Net ("teacher" of an RIRN run, "unet" of a
        baseline run), restored with the shapes of this run's teacher (or one line saying why not).
        It names the checkpoints/<stage> folder itself (`restore_model` says what else it finds)."""
        if not self.options.teacher_from:
            return {}
        return {"teacher": restore_teacher(self.options.teacher_from, ("teacher", "unet"), abstract()["teacher"])}

    def pipeline(self, stage):
        return {"dropout": "none", "instantiations": 1}  # every student applies its own subset on device

    def updates(self, stage):
        trainable = {"students": nnx.Param}
        if not self.options.teacher_from:
            trainable["teacher"] = nnx.Param
        if self.options.car and self.options.car_embeddings == "trained":
            trainable["embeddings"] = nnx.Param
        updates = [Update(group="model", trainable=trainable, loss=self.model_loss)]
        if self.options.adv:
            updates.append(
                Update(group="discriminator", trainable={"discriminators": nnx.Param}, loss=self.discriminator_loss)
            )
        return updates

    def known_groups(self, stage):
        return ("model", "discriminator")  # a config's discriminator settings stay valid with adv = false

    # --- losses ------------------------------------------------------------------------
    def seg_loss(self, logits, batch):
        bce = 1.0 if self.options.seg_loss == "dice_bce" else 0.0
        return region_loss(
            logits, batch["label"], batch["valid"], bce_weight=bce, dice_channels=self.options.dice_regions
        )[0]

    def adversary_input(self, out):
        logits = out["logits"].astype(jnp.float32)
        return jax.nn.sigmoid(logits) if self.options.adv_input == "probabilities" else logits

    def model_loss(self, models, batch, key, context=None):
        """Teacher Dice + the sum over students of L_SEG + L_CRR + L_CAR + L_ADV (eq. 9)."""
        teacher_key, students_key = jax.random.split(key)
        teacher_out = models["teacher"](batch["image"], dropout_key=teacher_key)
        teacher_dice = self.seg_loss(teacher_out["logits"], batch)
        teacher = jax.lax.stop_gradient(teacher_out)  # nothing below reaches the teacher
        terms = self.student_terms(models, batch, teacher, students_key)
        total = jnp.sum(terms["loss"])
        if not self.options.teacher_from:
            total = total + teacher_dice
        parts = {"teacher_dice": teacher_dice}
        parts.update({k: jnp.mean(v) for k, v in terms.items() if k not in ("loss", "adversary_input")})
        parts.update(self.students.named(terms, skip=("adversary_input",)))
        shared = {
            "teacher_adversary_input": self.adversary_input(teacher),
            "student_adversary_input": terms["adversary_input"],
        }
        return total, parts, shared

    def student_terms(self, models, batch, teacher, key):
        """Each student's loss terms, vmapped over the family: dict of (K,) arrays (+ its outputs)."""
        o = self.options
        gt = regions_of(batch["label"], xp=jnp) & batch["valid"][..., None]
        teacher_probs = jax.nn.sigmoid(teacher["logits"].astype(jnp.float32))
        fixed_embeddings = models.get("embeddings") if o.car and o.car_embeddings == "fixed" else None

        def one(member, mask, subset):
            image = drop_modalities(batch["image"], mask[None])
            out = member["students"](image, dropout_key=jax.random.fold_in(key, subset))
            terms = {"seg": self.seg_loss(out["logits"], batch)}
            loss = terms["seg"]
            if o.crr:
                terms["crr"], terms["crr_pairs"] = crr_term(o, out, teacher, teacher_probs, gt)
                loss = loss + o.crr_weight * terms["crr"]
            if o.car:
                terms["car"] = car_term(o, out, teacher, member.get("embeddings", fixed_embeddings))
                loss = loss + o.car_weight * terms["car"]
            adversary_input = self.adversary_input(out)
            if o.adv:
                terms["adv_s"] = student_adversarial_loss(member["discriminators"](adversary_input))[0]
                loss = loss + o.adv_weight * terms["adv_s"]
            return {"loss": loss, **terms, "adversary_input": adversary_input}

        return self.students.map(one, models, self.families("train"), self.config.model.family_map)

    def discriminator_loss(self, models, batch, key, context=None):
        """Eq. 8 for each student's discriminator, on the outputs the model update shared."""
        losses, out = family_discriminator_loss(
            models["discriminators"],
            context["teacher_adversary_input"],
            context["student_adversary_input"],
            real_per_member=False,
            how=self.config.model.family_map,
        )
        out.update(self.students.named({"adv_d": losses}))
        return jnp.sum(losses), out

    # --- inference ---------------------------------------------------------------------
    def served_subsets(self):
        return self.subsets

    def inference_models(self, stage):
        return ("students",)

    def predict(self, models, image, modality_mask, subset=None):
        """The student of `subset` on its modalities (`Students.predict`: an unserved subset is refused)."""
        return self.students.predict(models["students"], image, modality_mask, subset, "regions")
