"""ACDIS (Zhang et al., "Anatomical Consistency Distillation and Inconsistency Synthesis for Brain
Tumor Segmentation with Missing Modalities", ECAI 2024, arXiv:2408.13733): anatomical consistency
distillation and inconsistency synthesis. A catch-all model: four mono-modal encoders with AFEB,
an auxiliary multi-modal encoder E_aux and decoder D_aux used in training only, the MFSB and a
fusion decoder.

No public code. The networks and what in them is ours: `networks.acdis`. The training objective,
eq. 12, unweighted: L = L_ACCT + L_seg + L_syn.

- L_seg (eq. 11) sums six outputs: D_aux on each modality's raw encoder features (4, the
  modalities folded into the batch: one D_aux pass), D_fuse on E_aux's features and D_fuse on
  the completed features f_comp (one D_fuse pass for both). "weighted CE + Dice in line with
  [7, 36]" is RFNet's criterion (`seg_loss = "rfnet"`, `losses.segmentation.rfnet_loss`);
  `"label"` is this library's weighted CE + foreground soft Dice (`class_weights`).
- D_fuse decodes 4C channels per level; E_aux gives C (the shared encoder reading the four
  modalities), so its feature fills all four modality slots (ours: the completion ACCT asks of
  every mono feature). Skips: every level, as the shared U-Net.
- ACCT (eqs. 1-4, `losses.consistency`) between each enhanced mono feature f_m and E_aux's
  feature at the same level, at every AFEB level, E_aux's a fixed target (no gradient: E_aux
  learns only from its D_fuse segmentation). Windows of `acct_window`^3 voxels with stride
  `acct_stride` (0: the window, non-overlapping; at most the window), and where they do not
  tile an axis one more window ending at its far edge, so that every voxel gets ACCT's gradient
  (an 80^3 crop's 10^3 bottleneck: windows at 0, 4 and 6); statistics per channel
  (`acct_pooled = false`) or over all channels: the paper gives neither (ours). Averaged over
  windows, channels and batch, then over modalities and levels (`term_reduce = "mean"`: eq. 12
  adds L_ACCT and L_syn as single terms next to L_seg's explicit sum over six outputs; "sum"
  sums modalities and levels instead: on the phantom that made L_ACCT ~12 against ~0.7 per
  segmentation output at the start, and after 200 steps the model had found no tumour core,
  Dice 0). `distill` picks Table 2's loss (none | mse | kl | var | covar | acct).
- MFSB synthesises every modality's feature from the present ones (`networks.acdis.MFSB`); the
  missing slots of f_comp take the syntheses (and L_seg's gradient flows through them into the
  encoders). L_syn (eq. 10) on the missing modalities only; `syn_norm = "mse"` (the text: "Mean
  Square Error", default) or "l2" (eq. 10 as printed). Eq. 12 is a plain sum and the paper
  stops no gradient in L_syn, so by default (`syn_grad_encoders = true`, `syn_grad_target =
  true`) L_syn trains the MFSB, the mono encoders through the MFSB's input f_ava, and the mono
  encoders through its target f_m (pulled towards the synthesis). Our options, each alone or
  both: `syn_grad_encoders = false` keeps L_syn's gradient out of f_ava (the MFSB's weights
  still learn from it; the same MFSB pass serves f_comp and L_syn, `networks.acdis.shared_pass`);
  `syn_grad_target = false` makes f_m a fixed label. Both false: L_syn trains the MFSB only.
  Why one may want that (measured): our encoders' features are the residual stream,
  unnormalised (an MSE of ~250 at step 50 on the phantom against ~0.7 for each segmentation
  term), and such a term can rule the encoders' gradient, whose cheapest answer is smaller
  features, not better syntheses. The MFSB runs once per step in every setting. Table 3's other
  synthesis losses (`synthesis`): "var", "covar" (the ACCT terms between f_hat_m and f_m, the
  same gradient options), "adv" (a discriminator on the bottleneck level's features: f_m real,
  f_hat_m fake, every modality; non-saturating generator term x `adv_weight`, trained in a
  second update "discriminator").
- Schedule. The paper: "initial training omitted L_ACCT and L_syn" and, in the same paragraph,
  consistency distillation "from the first to the final epoch" and feature synthesis "from the
  21st epoch onwards". Our reading (settings): ACCT from epoch `acct_start_epoch` = 0, the MFSB
  path and L_syn from `synthesis_start_epoch` = 20 (0-based: the 21st); before it the missing
  slots of f_comp are zeros. An epoch is `iterations_per_epoch` steps, for the schedule and for
  the stage's `epochs` alike: 150 by default, RFNet's training script's (batch 2, 150
  iterations per epoch, its fusion loss from epoch 20 on, 0-based: the same 21st epoch). ACDIS
  takes RFNet's split, loss and metric, and we read its epochs as RFNet's; 500 epochs are
  75,000 steps, synthesis from step 3,000. `iterations_per_epoch = 0`: one pass over the
  training split (BraTS 2020's 219 cases at batch 2: 109 steps, synthesis from step 2,180).
  The switch is data in the step (no recompilation).
- Missing modalities in training (the paper does not say): uniform over the 15 subsets, as
  RFNet; the mono encoders always see every modality (D_aux, ACCT and L_syn's labels need them),
  the masks act on f_ava. At inference E_aux, D_aux and the discriminator are not loaded:
  mono encoders + AFEB -> f_ava of the present modalities -> MFSB -> D_fuse. Labels are the
  argmax of D_fuse's softmax (`decoding = "argmax"`): the paper evaluates "aligning with"
  RFNet, whose prediction averages softmax outputs and takes the argmax (thresholding the
  regions would differ: `eval.decoding = "threshold"`).
- Ablations (Sec. 4.4): `afeb = false` and `mfsb = false` put a 3x3x3 convolution in the
  block's place, as the paper, "to maintain the invariance of parameter counts": AFEB's becomes
  a C -> C convolution, the MFSB's (`mfsb_conv`) by default a 4C -> C convolution of f_ava
  filling the missing modalities' slots ("fill", ours), or "full", a 4C -> 4C convolution
  giving all of f_comp. At the BraTS config (all five encoders, both decoders, the completion;
  27.59 M parameters) the ablations stay within 5 % (our tolerance) of the full model: afeb =
  false -2.2 %, mfsb = false +1.6 % ("full": +27.1 %), both -0.7 %.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbrats.config import check_choice, check_entries, check_range
from jaxbrats.errors import ConfigError, JaxbratsError
from jaxbrats.labels import NUM_LABELS
from jaxbrats.losses import label_loss
from jaxbrats.losses.adversarial import discriminator_loss, student_adversarial_loss
from jaxbrats.losses.consistency import (
    DISTILLATION_LOSSES,
    SYNTHESIS_NORMS,
    acct_loss,
    consistency_distillation,
    synthesis_loss,
)
from jaxbrats.losses.segmentation import rfnet_loss
from jaxbrats.methods.base import Method, Update
from jaxbrats.modalities import MODALITIES
from jaxbrats.networks import family
from jaxbrats.networks.acdis import (
    ATTENTION_CHUNK,
    COMPLETION_CONVS,
    HEAD_CHANNELS,
    FeatureCompletion,
    FusionDecoder,
    MonoEncoder,
    afeb_width_problem,
)
from jaxbrats.networks.discriminator import Discriminator, DiscriminatorConfig
from jaxbrats.networks.factory import probabilities, unet_config
from jaxbrats.networks.latent_encoder import modality_stack
from jaxbrats.networks.unet import Decoder, Encoder

SYNTHESIS_LOSSES = ("syn", "adv", "var", "covar")
SEG_LOSSES = ("rfnet", "label")
TERM_REDUCTIONS = ("mean", "sum")
INFERENCE_MODELS = ("mono", "completion", "fuse_decoder")


@dataclasses.dataclass(frozen=True)
class ACDISOptions:
    afeb: bool = True  # false: a 3x3x3 convolution in each AFEB's place (Table 2's first row)
    afeb_levels: tuple[int, ...] = ()  # encoder levels with AFEB (and ACCT); (): every level
    distill: str = "acct"  # Table 2: none | mse | kl | var | covar | acct (= var + covar, eq. 4)
    acct_window: int = 4  # local window edge, voxels (ours; the paper gives none)
    acct_stride: int = 0  # 0: the window (non-overlapping)
    acct_pooled: bool = False  # window statistics over all channels, else per channel
    mfsb: bool = True  # false: a 3x3x3 convolution in its place (Table 3's first row), `mfsb_conv`
    #: the convolution in the MFSB's place (ours): "fill" (4C -> C into the missing slots) | "full" (4C -> 4C)
    mfsb_conv: str = "fill"
    synthesis: tuple[str, ...] = ("syn",)  # Table 3: any of syn, adv, var, covar
    syn_norm: str = "mse"  # mse (the text) | l2 (eq. 10 as printed)
    #: "mean" (eq. 12 adds L_ACCT and L_syn as single terms): L_ACCT's mean over (level, modality),
    #: L_syn's over levels | "sum": their sums (L_syn is a mean over the missing modalities either way)
    term_reduce: str = "mean"
    #: the synthesis losses' gradient reaches the mono encoders through f_ava (true: eq. 12's plain
    #: sum) or only the MFSB's weights (false, ours)
    syn_grad_encoders: bool = True
    #: ... and through the target f_m (true: eq. 12's plain sum) or f_m is a fixed label (false, ours)
    syn_grad_target: bool = True
    acct_start_epoch: int = 0  # 0-based epoch from which L_ACCT counts
    synthesis_start_epoch: int = 20  # 0-based epoch from which MFSB fills f_comp and L_syn counts
    #: steps per epoch for the schedule and the stage's `epochs`: RFNet's training script's 150;
    #: 0: one pass over the training split (cases // batch)
    iterations_per_epoch: int = 150
    seg_loss: str = "rfnet"  # rfnet (RFNet/mmFormer's weighted CE + Dice) | label
    class_weights: tuple[float, ...] = ()  # seg_loss = "label" only: CE weight per internal label
    adv_weight: float = 1.0  # synthesis "adv": the generator term's weight (ours)
    disc_width: int = 64  # synthesis "adv": the feature discriminator's hidden channels (ours)
    #: queries per block of AFEB's attention (an implementation choice: memory chunk x tokens, the
    #: same result); 0: all at once (tokens^2 logits)
    afeb_attention_chunk: int = ATTENTION_CHUNK

    def validate(self, where: str) -> None:
        check_choice(f"{where}.distill", self.distill, DISTILLATION_LOSSES)
        check_range(f"{where}.acct_window", self.acct_window, 2)
        check_range(f"{where}.acct_stride", self.acct_stride, 0)
        if self.acct_stride > self.acct_window:
            raise ConfigError(
                f"{where}.acct_stride must be 0 (the window) or at most {where}.acct_window "
                f"({self.acct_window}) so that every voxel is in a window, got {self.acct_stride}"
            )
        check_choice(f"{where}.mfsb_conv", self.mfsb_conv, COMPLETION_CONVS)
        for name in self.synthesis:
            check_choice(f"{where}.synthesis", name, SYNTHESIS_LOSSES)
        if not self.mfsb and self.synthesis:
            raise ConfigError(
                f"{where}.synthesis must be [] with {where}.mfsb = false (nothing is synthesised), "
                f"got {list(self.synthesis)}"
            )
        check_choice(f"{where}.syn_norm", self.syn_norm, SYNTHESIS_NORMS)
        check_choice(f"{where}.term_reduce", self.term_reduce, TERM_REDUCTIONS)
        check_range(f"{where}.acct_start_epoch", self.acct_start_epoch, 0)
        check_range(f"{where}.synthesis_start_epoch", self.synthesis_start_epoch, 0)
        check_range(f"{where}.iterations_per_epoch", self.iterations_per_epoch, 0)
        check_choice(f"{where}.seg_loss", self.seg_loss, SEG_LOSSES)
        if self.class_weights and (self.seg_loss != "label" or len(self.class_weights) != NUM_LABELS):
            raise ConfigError(
                f"{where}.class_weights needs seg_loss = 'label' and {NUM_LABELS} values, "
                f"got {list(self.class_weights)}"
            )
        check_entries(f"{where}.class_weights", self.class_weights, 0)
        check_range(f"{where}.adv_weight", self.adv_weight, 0)
        check_range(f"{where}.disc_width", self.disc_width, 1)
        check_range(f"{where}.afeb_attention_chunk", self.afeb_attention_chunk, 0)


class ACDIS(Method):
    name = "acdis"
    Options = ACDISOptions
    stages = ("train",)
    #: ACDIS evaluates "aligning with" RFNet, whose prediction averages softmax outputs and takes
    #: the argmax: region thresholds would call a voxel with softmax (0.40, 0.35, 0, 0.25) NCR.
    decoding = "argmax"

    def __init__(self, config):
        super().__init__(config)
        levels = len(config.model.widths)
        self.afeb_levels = tuple(self.options.afeb_levels) or tuple(range(levels))
        # the schedule's epochs -> steps: `iterations_per_epoch`, or set by `setup` from the data
        self.steps_per_epoch = self.options.iterations_per_epoch or None

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        check_afeb_levels(config, cls.parse_options(config))

    @classmethod
    def stage_length(cls, config, stage: str, steps_per_epoch: int) -> int:
        """The stage's steps: `steps`, or its `epochs` of `iterations_per_epoch` steps (0: of the data's)."""
        return super().stage_length(config, stage, cls.parse_options(config).iterations_per_epoch or steps_per_epoch)

    def setup(self, train_set) -> None:
        if self.options.iterations_per_epoch:
            self.steps_per_epoch = self.options.iterations_per_epoch
            return
        stage = self.config.stages.get("train")
        batch = stage.batch_size if stage and stage.batch_size else self.config.data.batch_size
        self.steps_per_epoch = max(len(train_set) // batch, 1)

    def start_step(self, epoch: int) -> int:
        if epoch and self.steps_per_epoch is None:
            raise JaxbratsError(
                "acdis: the schedule's start epochs need the steps per epoch (`setup(train_set)`, "
                "which `train` calls, or method.iterations_per_epoch); outside a run set "
                "method.acct_start_epoch and method.synthesis_start_epoch to 0"
            )
        return epoch * (self.steps_per_epoch or 0)

    # --- models ------------------------------------------------------------------------
    def families(self, stage):
        return {"mono": len(MODALITIES)}

    def init_models(self, stage, rngs):
        return acdis_models(self.config, self.options, self.afeb_levels, rngs)

    def pipeline(self, stage):
        return {"dropout": "uniform", "instantiations": 1}

    def updates(self, stage):
        trainable = {name: nnx.Param for name in (*INFERENCE_MODELS, "aux_encoder", "aux_decoder")}
        updates = [Update(group="model", trainable=trainable, loss=self.loss)]
        if "adv" in self.options.synthesis:
            updates.append(
                Update(group="discriminator", trainable={"discriminator": nnx.Param}, loss=self.discriminator_loss)
            )
        return updates

    def known_groups(self, stage):
        return ("model", "discriminator")

    # --- training ------------------------------------------------------------------------
    def encode(self, models, image) -> dict:
        """Every modality through its encoder and AFEBs: {"raw", "enhanced"}: per level (M, N, ..., C)."""
        return family.map_members(
            lambda encoder, x: encoder(x), models["mono"], modality_stack(image), how=self.config.model.family_map
        )

    def seg_loss(self, logits, labels, valid):
        return seg_loss(self.options, logits, labels, valid)

    def segmentation_terms(self, models, batch, mono, aux, comp) -> dict:
        """Eq. 11's six outputs: 4 x D_aux(raw mono), D_fuse(E_aux, tiled to the 4C layout), D_fuse(f_comp)."""
        m, n = len(MODALITIES), batch["image"].shape[0]
        mono_logits = models["aux_decoder"]([fold(f) for f in mono["raw"]])[0]  # one D_aux pass, M*N samples
        # Each output's loss on its own (RFNet's Dice sums over the batch), summed.
        per_modality = jax.vmap(lambda logits: self.seg_loss(logits, batch["label"], batch["valid"]))
        seg_mono = jnp.sum(per_modality(mono_logits.reshape(m, n, *mono_logits.shape[1:])))
        both = [jnp.concatenate([jnp.tile(a, (1,) * (a.ndim - 1) + (m,)), c], axis=0) for a, c in zip(aux, comp)]
        logits = models["fuse_decoder"](both)
        seg_aux = self.seg_loss(logits[:n], batch["label"], batch["valid"])
        seg_fuse = self.seg_loss(logits[n:], batch["label"], batch["valid"])
        return {"seg_mono": seg_mono, "seg_aux": seg_aux, "seg_fuse": seg_fuse}

    def distillation(self, mono, aux):
        """L_ACCT (or Table 2's alternative) over modalities and AFEB levels (`term_reduce`)."""
        return distillation_terms(self.options, self.afeb_levels, mono, aux)

    def loss(self, models, batch, key, context):
        o = self.options
        image, mask, step = batch["image"], batch["modality_mask"][:, 0], context["step"]
        acct_on = step >= self.start_step(o.acct_start_epoch)
        synthesis_on = step >= self.start_step(o.synthesis_start_epoch)
        mono = self.encode(models, image)
        aux = models["aux_encoder"](image)
        # One MFSB pass: f_comp for L_seg, f_hat for the synthesis losses (`syn_grad_encoders`).
        comp, synthesised = models["completion"](
            mono["enhanced"], mask, synthesise=synthesis_on, grad_to_features=o.syn_grad_encoders
        )
        parts = self.segmentation_terms(models, batch, mono, aux, comp)
        loss = parts["seg_mono"] + parts["seg_aux"] + parts["seg_fuse"]
        if o.distill != "none":
            distill, terms = self.distillation(mono, aux)
            parts.update(terms, distill=distill)
            loss = loss + jnp.where(acct_on, distill, 0.0)
        shared = {}
        if synthesised is not None and o.synthesis:
            terms = synthesis_terms(o, mono["enhanced"], synthesised, mask)
            if "adv" in o.synthesis:
                terms["adv"], shared = adversarial_synthesis(o, models["discriminator"], mono["enhanced"], synthesised)
            synthesis = sum(terms.values())
            parts.update(terms, synthesis=synthesis)
            loss = loss + jnp.where(synthesis_on, synthesis, 0.0)
        parts["acct_on"] = acct_on.astype(jnp.float32)
        parts["synthesis_on"] = synthesis_on.astype(jnp.float32)
        return loss, parts, shared

    def discriminator_loss(self, models, batch, key, context):
        """Table 3's adversarial synthesis: full-modality bottleneck features real, syntheses fake."""
        disc = models["discriminator"]
        loss, parts = discriminator_loss(disc(context["real"]), disc(context["fake"]))
        on = context["step"] >= self.start_step(self.options.synthesis_start_epoch)
        return jnp.where(on, loss, 0.0), parts

    # --- inference -----------------------------------------------------------------------
    def inference_models(self, stage):
        return INFERENCE_MODELS

    def predict(self, models, image, modality_mask, subset=None):
        """Mono encoders + AFEB -> f_ava of the present modalities -> MFSB -> D_fuse."""
        return self.predict_from_features(models, self.window_features(models, image), image, modality_mask, subset)

    def window_features(self, models, window):
        """The mono encoders + AFEB of every modality (they see all four; the mask acts on f_ava): the
        same for every subset, so the evaluation runs them once per window."""
        return self.encode(models, window)["enhanced"]

    def predict_from_features(self, models, features, window, modality_mask, subset=None):
        """MFSB on the present modalities' enhanced features -> D_fuse's label softmax as regions."""
        mask = jnp.broadcast_to(jnp.asarray(modality_mask, bool), (window.shape[0], len(MODALITIES)))
        comp, _ = models["completion"](features, mask)
        return probabilities("labels", models["fuse_decoder"](comp))


def check_afeb_levels(config, options: ACDISOptions) -> None:
    """The AFEB levels exist in the U-Net, and AFEB's heads divide each one's width."""
    widths = tuple(config.model.widths)
    levels = len(widths)
    bad = [level for level in options.afeb_levels if not 0 <= level < levels]
    if bad:
        raise ConfigError(
            f"method.afeb_levels: no encoder level {bad} (model.widths has {levels} levels: 0..{levels - 1})"
        )
    for level in (options.afeb_levels or range(levels)) if options.afeb else ():
        problem = afeb_width_problem(widths[level])
        if problem:
            raise ConfigError(
                f"model.widths: {problem} (level {level} of {list(widths)}; a multiple of "
                f"{HEAD_CHANNELS} or a width under {2 * HEAD_CHANNELS}, for example, works there)"
            )


def acdis_models(config, options: ACDISOptions, afeb_levels: tuple[int, ...], rngs) -> dict:
    """The mono encoders (a family over the modalities), the completion, D_fuse, E_aux, D_aux and, for
    the adversarial synthesis, the feature discriminator."""
    roots = jax.random.split(rngs.params(), 6)
    mono_cfg = unet_config(config, NUM_LABELS, in_channels=1)
    cfg = unet_config(config, NUM_LABELS)
    models = {
        "mono": family.stack(
            lambda r: MonoEncoder(mono_cfg, afeb_levels, options.afeb, r, options.afeb_attention_chunk),
            family.member_keys(roots[0], range(len(MODALITIES))),
        ),
        "completion": FeatureCompletion(
            cfg.widths, len(MODALITIES), options.mfsb, cfg, nnx.Rngs(roots[1]), conv=options.mfsb_conv
        ),
        "fuse_decoder": FusionDecoder(cfg, len(MODALITIES), nnx.Rngs(roots[2])),
        "aux_encoder": Encoder(cfg, nnx.Rngs(roots[3])),
        "aux_decoder": Decoder(cfg, nnx.Rngs(roots[4])),
    }
    if "adv" in options.synthesis:
        disc = DiscriminatorConfig(
            in_channels=cfg.widths[-1], width=options.disc_width, dtype=cfg.dtype, conv_impl=cfg.conv_impl
        )
        models["discriminator"] = Discriminator(disc, nnx.Rngs(roots[5]))
    return models


def seg_loss(options: ACDISOptions, logits, labels, valid):
    """One output's segmentation loss (`seg_loss`): RFNet's weighted CE + Dice, or this library's."""
    if options.seg_loss == "rfnet":
        return rfnet_loss(logits, labels, valid)[0]
    return label_loss(logits, labels, valid, class_weights=options.class_weights or None)[0]


def distillation_terms(o: ACDISOptions, afeb_levels, mono, aux):
    """L_ACCT (or Table 2's alternative, `distill`) between every enhanced mono feature and E_aux's at
    each AFEB level, summed or averaged over modalities and levels (`term_reduce`): (loss, parts)."""
    scale = 1.0 if o.term_reduce == "sum" else 1.0 / (len(afeb_levels) * len(MODALITIES))
    total, parts = jnp.zeros((), jnp.float32), {}
    for level in afeb_levels:
        loss, terms = consistency_distillation(
            o.distill, mono["enhanced"][level], aux[level], o.acct_window, o.acct_stride or o.acct_window, o.acct_pooled
        )
        total = total + scale * jnp.sum(loss)
        for k, v in terms.items():
            parts[k] = parts.get(k, 0.0) + scale * jnp.sum(v)
    return total, parts


def adversarial_synthesis(o: ACDISOptions, discriminator, features: list, synthesised: list):
    """Table 3's "adv" synthesis loss: the generator term on the bottleneck syntheses (x `adv_weight`),
    and what the discriminator's update reads: the real features and the syntheses, folded."""
    fake = fold(synthesised[-1])
    loss = o.adv_weight * student_adversarial_loss(discriminator(fake))[0]
    return loss, {"real": fold(features[-1]).astype(jnp.float32), "fake": fake.astype(jnp.float32)}


def fold(f):
    """(M, N, ...) -> (M*N, ...)."""
    return f.reshape(f.shape[0] * f.shape[1], *f.shape[2:])


def synthesis_terms(o: ACDISOptions, features: list, synthesised: list, mask) -> dict:
    """Table 3's synthesis losses (`o.synthesis`) of f_hat against f, averaged over the missing
    modalities, then over the levels (or summed: `term_reduce`); f gets their gradient unless
    `o.syn_grad_target` is false."""
    missing = ~jnp.asarray(mask, bool).T  # (M, N)
    weight = missing.astype(jnp.float32)
    stride = o.acct_stride or o.acct_window
    stop = not o.syn_grad_target
    terms = {}
    for f_hat, f in zip(synthesised, features):
        if "syn" in o.synthesis:
            terms["syn"] = terms.get("syn", 0.0) + synthesis_loss(f_hat, f, missing, o.syn_norm, stop_target=stop)
        if {"var", "covar"} & set(o.synthesis):
            # (M, N, 1, ...): one value per modality and sample, averaged over the missing ones.
            acct = acct_loss(f_hat[:, :, None], f[:, :, None], o.acct_window, stride, o.acct_pooled, stop_target=stop)
            for name in ("var", "covar"):
                if name in o.synthesis:
                    value = jnp.sum(acct[name] * weight) / jnp.maximum(jnp.sum(weight), 1.0)
                    terms[f"syn_{name}"] = terms.get(f"syn_{name}", 0.0) + value
    if o.term_reduce == "mean":
        terms = {k: v / len(synthesised) for k, v in terms.items()}
    return terms
