"""M3AE ("M3AE: Multimodal Representation Learning for Brain Tumor Segmentation with Missing
Modalities", Liu et al., AAAI 2023, arXiv:2303.05302): one U-Net, two stages.

``pretrain``: multimodal masked autoencoding with model inversion. The
pipeline drops k ~ U{0..3} whole modalities (``drop_k``); inside the step,
16^3 patches of the remaining modalities are hidden so that `mask_ratio` of
all patches (over the 4 modalities) is masked, drawn from the step's key.
Every hidden voxel is replaced by the learned substitute image x_sub at the
same place, and the U-Net with a 4-channel regression head reconstructs the
whole image: loss = MSE + gamma * R(x_sub). x_sub is a parameter of the
size of a padded full volume, with its own learning rate (optimiser key
``model_lr = {x_sub = ...}``).

``finetune``: a fresh segmentation head (3 sigmoid regions, deep supervision
at 1, 1/2, 1/4), x_sub frozen. Each subject is seen as two different
missing-modality instantiations (drop 0-3 modalities each, redrawn while
equal), missing channels filled from x_sub:
loss = sum_i (Dice + BCE over the three scales) + lambda * MSE(f0, f1)
(``seg_balance = "paper"``; the public code's balance is an option, below).

One coordinate frame for x_sub, for training crops and inference alike
(the public code reads training crops in original-volume coordinates but
test volumes in cropped coordinates). ``substitute_frame = "template"``
(default): x_sub spans the source volume's RAS+ grid (padded to whole
patches: 240x240x155 -> 240x240x160 for BraTS); BraTS cases are
co-registered to one atlas (SRI24), so the paper's "the same location" is
the same voxel of that grid in every case: a training crop reads x_sub at
``box_start + crop_start`` (the cached case's corner in its source grid plus
the crop's corner) with the crop's flips, and inference reads the whole case
at ``box_start``. ``"centred"``: the cached (brain-cropped) case centred in
x_sub, for data that is not in one atlas space (`transforms.case_corner`).

Where the paper and the public code differ, the paper is the default:

===================  ============================  ==================================
option               paper (default)               public code (option)
===================  ============================  ==================================
consistency_feature  "bottleneck": the deepest     "deep_quarter": the upsampled
                     encoder features              1/4-scale deep-supervision logits
distinct_views       true: "two different          false: two independent draws
                     missing-modal situations"     (equal views ~10 % of the time)
seg_balance          "paper": eq. 4, per view      "code": (0.7 Dice_sq + 0.3 BCE)
                     and scale Dice + BCE 1:1,     per scale, the two views pooled
                     summed over the two views     in one batch (loss/dice.py)
===================  ============================  ==================================

The fine-tuning segmentation term (``seg_balance``). "paper" (default): the
paper's eqs. 4-5 read literally, sum over the two views i and the three scales
of (soft Dice + BCE): per-sample soft Dice with a linear denominator,
1 - (2 sum(p g) + 1e-5) / (sum(p) + sum(g) + 1e-5), averaged over samples and
the regions WT/TC/ET, plus BCE averaged over the valid voxels and regions.
"code": what the public code (github.com/ccarliu/m3ae, loss/dice.py and
train_18.py) computes: for each of the three deep-supervision outputs, equally
weighted and summed, (0.7 sum_c Dice_c + 0.3 sum_c BCE_c) / 3 over the 3
regions, where Dice_c = 1 - (2 sum(p g) + 1) / (sum(p^2) + sum(g^2) + 1) sums
over the whole batch (both views, every subject: the code's batch is one
subject seen twice) and BCE_c is the mean over the batch's voxels; the views
are one batch, counted once, not summed. Crop padding counts nowhere in
either form (the code pads a brain box under 128 voxels with zeros and counts
them as background). The consistency term is the same in
both, so the choice moves self-distillation's weight relative to
segmentation: the paper form's segmentation term is about 2 (views) x
(Dice + BCE) / (0.7 Dice + 0.3 BCE) times the code's, 2/0.7 ~ 3 where Dice
dominates and ~4 where the two are equal, so lambda = 0.1 weighs about 3-4x
more against segmentation in the code form.

R(x_sub) (``substitute_penalty``): the paper gives no form for its "small
amount of L2 regularization" with gamma = 0.005; the default is this
library's choice, measured on the phantom (issue 12), and happens to be the
public code's form. Adam divides each value's gradient by its running RMS,
so what R does depends on its gradient next to the reconstruction's on the
same x_sub value: that one is about c/M (M values in a training batch; one
x_sub value feeds many outputs: c ~ 250 at initialisation, 3-10 once the
U-Net has trained). A squared L2 on the MSE's per-value scale (gradient
2 gamma x/M) is 0.1-0.4 % of it at gamma = 0.005 and changed nothing visible
in 600 phantom steps (x_sub stayed noise: RMS 0.79, 0.93 with no penalty).
The unsquared norm's gradient, gamma (x - mean)/||x - mean||, has total norm
gamma whatever x_sub's size: 20-60 % of the reconstruction's per value on
the trained phantom, far above Adam's eps (1e-8) at BraTS size too (~8e-7
per value), and x_sub becomes a head-like template (the paper's Fig. 3),
shrunk towards its channel means (phantom: RMS 0.015 against the mean
image's 0.35, so the fill is faint).

- ``"centered_norm"`` (default): ||x_sub - per-channel mean||_2, unsquared
  (the public code's R).
- ``"sum_square_per_batch_value"``: sum(x_sub^2) / (values in one training
  batch, B x crop x 4), a squared L2 on the MSE's per-value scale: the same
  pull next to the reconstruction whatever the volume, crop and batch sizes,
  in proportion to each value (what the reconstruction builds keeps more of
  its amplitude); at gamma = 1 it cleared the background around the head in
  600 phantom steps and left noise inside.
- ``"mean_square"``: mean(x_sub^2), the previous default, kept so earlier
  runs load: 2 gamma x/N per value for N values of x_sub (2.7e-10 at BraTS
  size, under Adam's eps); weaker than the above by N/M.

The backbone's upsampling (`model.upsample`) is trilinear in M3AE's
supplement and nearest in the public code; the BraTS configs use trilinear.

Ablations of the paper's Table 3: no M3AE pretraining (row a:
``pretrained_unet = false``: pretraining still learns x_sub by model
inversion, fine-tuning starts from a fresh U-Net; ``stages.pretrain.epochs = 0``
instead skips pretraining altogether, so the fill is untrained noise),
``patch_masking = false`` (modality
dropout only, row b), ``fill = "zero"`` (row c) or ``"mean"`` (the mean
image of the training cases in the same frame, row d), and
``consistency_weight = 0`` (no self-distillation, row e).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbrats import files
from jaxbrats.config import ConfigError, check_entries, check_range
from jaxbrats.data.pipeline import box_start
from jaxbrats.data.transforms import (
    FRAMES,
    case_corner,
    patch_grid,
    patch_mask_to_voxels,
    place_case,
    read_window,
    read_windows,
    visible_patches,
)
from jaxbrats.labels import REGIONS
from jaxbrats.losses import masked_mse, region_loss, segmentation_loss
from jaxbrats.methods.base import Method, Update
from jaxbrats.modalities import MODALITIES, NUM_MODALITIES, drop_modalities
from jaxbrats.networks.factory import check_deep_supervision, probabilities, unet_config
from jaxbrats.networks.unet import UNet
from jaxbrats.runtime.rundir import RunDir

FILLS = ("x_sub", "zero", "mean")
PENALTIES = ("centered_norm", "sum_square_per_batch_value", "mean_square")  # R(x_sub): module docstring
FEATURES = ("bottleneck", "deep_quarter")
SEG_BALANCES = ("paper", "code")  # the fine-tuning segmentation term: module docstring
#: the public code's segmentation term (loss/dice.py): weights of the Dice and the BCE, Dice smoothing
CODE_DICE_WEIGHT, CODE_BCE_WEIGHT, CODE_SMOOTH = 0.7, 0.3, 1.0


@dataclasses.dataclass(frozen=True)
class M3AEOptions:
    mask_ratio: float = 0.875  # share of all patches (4 modalities) hidden in pretraining
    patch_size: int = 16
    patch_masking: bool = True  # false: modality dropout only (Table 3 b)
    fill: str = "x_sub"  # x_sub (model inversion) | zero | mean (Table 3 c, d)
    #: x_sub's spatial shape: the source grid (RAS+) padded to whole patches.
    substitute_shape: tuple[int, int, int] = (240, 240, 160)
    #: Where a case lies in x_sub: "template" (its place in the source grid, one atlas for
    #: BraTS) or "centred" (the brain-cropped case centred; data not in one atlas space).
    substitute_frame: str = "template"
    substitute_init_std: float = 1.0  # x_sub starts as Gaussian noise
    #: R(x_sub) (PENALTIES): centered_norm (the public code's, this library's choice: the paper
    #: gives no form) | sum_square_per_batch_value | mean_square (the previous default).
    substitute_penalty: str = "centered_norm"
    substitute_weight: float = 0.005  # gamma
    consistency_weight: float = 0.1  # lambda; 0 turns self-distillation off (Table 3 e)
    consistency_feature: str = "bottleneck"  # paper | deep_quarter (public code)
    distinct_views: bool = True  # paper: the two fine-tuning views differ; false: independent draws
    #: Fine-tuning's segmentation term: "paper" (eq. 4: Dice + BCE per view and scale, summed over the views) |
    #: "code" (the public code's (0.7 squared-denominator batch Dice + 0.3 BCE) per scale, views pooled, counted once).
    seg_balance: str = "paper"
    #: Fine-tuning starts from the pretrained U-Net (true) or a fresh one that keeps only the
    #: pretrained x_sub (false: Table 3 row a, "no M3AE pretraining", model inversion kept).
    pretrained_unet: bool = True

    def validate(self, where: str) -> None:
        for name, value, allowed in (
            ("fill", self.fill, FILLS),
            ("substitute_penalty", self.substitute_penalty, PENALTIES),
            ("consistency_feature", self.consistency_feature, FEATURES),
            ("seg_balance", self.seg_balance, SEG_BALANCES),
            ("substitute_frame", self.substitute_frame, FRAMES),
        ):
            if value not in allowed:
                raise ConfigError(f"{where}.{name} must be one of {list(allowed)}, got {value!r}")
        check_range(f"{where}.mask_ratio", self.mask_ratio, 0, 1, high_open=True)
        check_range(f"{where}.patch_size", self.patch_size, 1)
        check_entries(f"{where}.substitute_shape", self.substitute_shape, 1)
        # > 0: x_sub = 0 everywhere would put centered_norm's sqrt at 0, whose gradient is NaN.
        check_range(f"{where}.substitute_init_std", self.substitute_init_std, 0, low_open=True)
        check_range(f"{where}.substitute_weight", self.substitute_weight, 0)
        check_range(f"{where}.consistency_weight", self.consistency_weight, 0)


class SubstituteImage(nnx.Module):
    """A learned full-modal image (S0, S1, S2, 4), channels-last like the data."""

    def __init__(self, shape, std: float, rngs: nnx.Rngs, value=None):
        if value is None:
            value = std * jax.random.normal(rngs.params(), tuple(shape) + (NUM_MODALITIES,), jnp.float32)
        self.image = nnx.Param(jnp.asarray(value, jnp.float32))


def substitute_penalty(x_sub, kind: str, batch_values: int | None = None):
    """R(x_sub) of x_sub (S0, S1, S2, 4); the forms and why the default: module docstring.

    "centered_norm": ||x - per-channel mean||_2; "sum_square_per_batch_value":
    sum(x^2) / `batch_values` (the number of values in one training batch,
    B x crop x 4); "mean_square": mean(x^2).
    """
    if kind == "centered_norm":
        centred = x_sub - jnp.mean(x_sub, axis=(0, 1, 2), keepdims=True)
        return jnp.sqrt(jnp.sum(jnp.square(centred)))
    if kind == "sum_square_per_batch_value":
        if not batch_values:
            raise ValueError(
                "sum_square_per_batch_value needs batch_values, the number of values in one training batch"
            )
        return jnp.sum(jnp.square(x_sub)) / batch_values
    if kind == "mean_square":
        return jnp.mean(jnp.square(x_sub))
    raise ValueError(f"substitute_penalty must be one of {list(PENALTIES)}, got {kind!r}")


def mean_image(dataset, shape, frame: str = "template") -> np.ndarray:
    """Voxel-wise mean of the cases, each placed in `shape` in x_sub's `frame`; a modality averages over
    the cases that have it."""
    total = np.zeros(tuple(shape) + (NUM_MODALITIES,), np.float64)
    count = np.zeros(NUM_MODALITIES)
    for i in range(len(dataset)):
        manifest = dataset.manifests[i]
        present = np.asarray(manifest["present"], bool)  # per modality, in MODALITIES order
        image = np.asarray(dataset.arrays(i)["image"], np.float32)
        corner = case_corner(frame, image.shape[:3], box_start(manifest), shape, xp=np)
        total += place_case(image, corner, shape) * present
        count += present
    return (total / np.maximum(count, 1)).astype(np.float32)


class M3AE(Method):
    name = "m3ae"
    Options = M3AEOptions
    stages = ("pretrain", "finetune")
    VIEWS = 2  # fine-tuning: a pair of missing-modality views of each subject (the consistency is pairwise)

    def __init__(self, config):
        super().__init__(config)
        self.train_set = None
        self._mean = None

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        check_deep_supervision(config, "M3AE fine-tuning")
        check_fill_and_patches(config, cls.parse_options(config))

    # --- models -----------------------------------------------------------------------
    def init_models(self, stage, rngs):
        pretrain = stage == "pretrain"
        unet = UNet(
            unet_config(self.config, NUM_MODALITIES if pretrain else len(REGIONS), deep_supervision=not pretrain), rngs
        )
        models = {"unet": unet}
        if self.options.fill != "zero":
            value = self.mean() if self.options.fill == "mean" else None
            models["x_sub"] = SubstituteImage(
                self.options.substitute_shape, self.options.substitute_init_std, rngs, value
            )
        return models

    def setup(self, train_set) -> None:
        self.train_set = train_set

    def mean(self):
        """The mean-image fill; zeros when no training set is bound (a template to restore into)."""
        if self.train_set is None:
            return jnp.zeros(tuple(self.options.substitute_shape) + (NUM_MODALITIES,))
        if self._mean is None:
            self._mean = mean_image(self.train_set, self.options.substitute_shape, self.options.substitute_frame)
        return self._mean

    def pipeline(self, stage):
        if stage == "pretrain":
            return {"dropout": "drop_k", "instantiations": 1}
        return {"dropout": "drop_k", "instantiations": self.VIEWS, "distinct": self.options.distinct_views}

    def updates(self, stage):
        if stage == "pretrain":
            trainable = {"unet": nnx.Param}
            if self.options.fill == "x_sub":
                trainable["x_sub"] = nnx.Param  # model inversion: x_sub learns from the same loss
            return [Update(group="model", trainable=trainable, loss=self.pretrain_loss)]
        return [Update(group="model", trainable={"unet": nnx.Param}, loss=self.finetune_loss)]

    def can_predict(self, stage):
        return stage == "finetune"

    def carry(self, stage, fresh, previous):
        if stage == "finetune" and not self.options.pretrained_unet:
            previous = {n: s for n, s in previous.items() if n == "x_sub"}  # row a: a fresh U-Net, the learned x_sub
        return super().carry(stage, fresh, previous)

    # --- filling --------------------------------------------------------------------------
    def substitute(self, models, batch):
        """x_sub under each crop of the batch (B, *crop, 4); zeros for the zero fill."""
        image = batch["image"]
        if "x_sub" not in models:
            return jnp.zeros_like(image)
        x_sub = models["x_sub"].image[...]
        origin = case_corner(self.options.substitute_frame, batch["case_shape"], batch["box_start"], x_sub.shape[:3])
        return read_windows(x_sub, batch["crop_start"] + origin, batch["flipped"], image.shape[1:4]).astype(image.dtype)

    def visible(self, key, modality_mask, crop):
        """(B, *crop, 4) bool: voxels kept in pretraining (kept modalities, visible patches)."""
        if not self.options.patch_masking:
            return jnp.broadcast_to(
                modality_mask[:, None, None, None, :], (modality_mask.shape[0], *crop, NUM_MODALITIES)
            )
        grid = patch_grid(crop, self.options.patch_size)
        keys = jax.random.split(key, modality_mask.shape[0])
        patches = jax.vmap(lambda k, m: visible_patches(k, m, grid, 1.0 - self.options.mask_ratio))(keys, modality_mask)
        return jax.vmap(lambda p: patch_mask_to_voxels(p, self.options.patch_size))(patches)

    def fill(self, models, image, modality_mask, case):
        if "x_sub" not in models:
            return drop_modalities(image, modality_mask)
        x_sub = models["x_sub"].image[...]
        corner = case_corner(self.options.substitute_frame, case["shape"], case["box_start"], x_sub.shape[:3])
        window = read_window(x_sub, corner, jnp.zeros(3, bool), image.shape[:3])
        return drop_modalities(image, modality_mask, window.astype(image.dtype))

    # --- losses -----------------------------------------------------------------------------
    def pretrain_loss(self, models, batch, key, context=None):
        image = batch["image"]
        mask_key, dropout_key = jax.random.split(key)
        keep = self.visible(mask_key, batch["modality_mask"][:, 0], image.shape[1:4])
        masked = jnp.where(keep, image, self.substitute(models, batch))
        reconstruction = models["unet"](masked, dropout_key=dropout_key)["logits"]
        # The target is the whole image: every real modality, visible or not (padding and absent modalities excluded).
        weight = batch["valid"][..., None] & batch["present"][:, None, None, None, :]
        mse = masked_mse(reconstruction, image, weight)
        parts = {"mse": mse, "visible_fraction": jnp.mean(keep.astype(jnp.float32))}
        if "x_sub" not in models or self.options.fill != "x_sub":
            return mse, parts
        r = substitute_penalty(models["x_sub"].image[...], self.options.substitute_penalty, batch_values=image.size)
        penalty = self.options.substitute_weight * r
        return mse + penalty, {**parts, "x_sub_penalty": penalty}

    def finetune_loss(self, models, batch, key, context=None):
        image, masks = batch["image"], batch["modality_mask"]
        substitute = self.substitute(models, batch)  # frozen: x_sub is not among this update's trainables
        views = [drop_modalities(image, masks[:, i], substitute) for i in range(self.VIEWS)]
        out = models["unet"](jnp.concatenate(views, axis=0), dropout_key=key)
        n = image.shape[0]
        seg, parts = self.segmentation_terms(out, batch)
        feature = out["encoder"][-1] if self.options.consistency_feature == "bottleneck" else out["deep"][0]
        feature = feature.astype(jnp.float32)
        consistency = jnp.mean(jnp.square(feature[:n] - feature[n:]))
        total = seg + self.options.consistency_weight * consistency
        return total, {**parts, "seg_loss": seg, "consistency": consistency}

    def segmentation_terms(self, out, batch):
        """Fine-tuning's segmentation term on the network's outputs for the views stacked on the batch axis
        (view 0's samples, then view 1's): (loss, {"dice_loss", "bce"} unweighted, summed like the loss)."""
        heads = (out["logits"], *out["deep"])
        if self.options.seg_balance == "code":
            return code_segmentation(heads, batch, self.VIEWS)
        return paper_segmentation(heads, batch, self.VIEWS)

    # --- inference and outputs -------------------------------------------------------------
    def predict(self, models, image, modality_mask, subset=None):
        # `fill` has already put x_sub (or zeros) into the missing channels of the whole case.
        return probabilities("regions", models["unet"](image)["logits"])

    def on_stage_end(self, stage, models, workdir):
        if stage == "pretrain" and "x_sub" in models:
            save_substitute(np.asarray(jax.device_get(models["x_sub"]["image"][...])), RunDir(workdir).substitute)


def check_fill_and_patches(config, options: M3AEOptions) -> None:
    """The fill is read where the unrotated crop lies, and the patches tile the crop."""
    if config.data.rotation_degrees > 0 and options.fill != "zero":
        raise ConfigError(
            f"data.rotation_degrees must be 0 for M3AE with method.fill = {options.fill!r}, got "
            f"{config.data.rotation_degrees}: the fill is read where the unrotated crop lies "
            "(crop_start, flipped), not under a rotated crop"
        )
    if options.patch_masking:
        try:
            patch_grid(config.data.crop_size, options.patch_size)
        except ValueError as e:
            raise ConfigError(f"method.patch_size: {e}") from None


def code_segmentation(heads, batch, views: int):
    """``seg_balance = "code"``: the public code's term per scale, the views pooled in one batch and
    counted once, each scale once: (loss, {"dice_loss", "bce"})."""
    labels = jnp.concatenate([batch["label"]] * views, axis=0)
    valid = jnp.concatenate([batch["valid"]] * views, axis=0)
    parts = {"dice_loss": 0.0, "bce": 0.0}
    seg = 0.0
    for logits in heads:
        loss, terms = region_loss(
            logits,
            labels,
            valid,
            dice_weight=CODE_DICE_WEIGHT,
            bce_weight=CODE_BCE_WEIGHT,
            batch_dice=True,
            squared_dice=True,
            smooth=CODE_SMOOTH,
        )
        seg = seg + loss
        parts = {k: parts[k] + terms[k] for k in parts}
    return seg, parts


def paper_segmentation(heads, batch, views: int):
    """``seg_balance = "paper"`` (eq. 4): Dice + BCE of every view at every scale, summed: (loss, parts)."""
    parts = {"dice_loss": 0.0, "bce": 0.0}
    seg = 0.0
    n = batch["label"].shape[0]
    for i in range(views):
        for logits in heads:
            loss, terms = segmentation_loss("regions", logits[i * n : (i + 1) * n], batch["label"], batch["valid"])
            seg = seg + loss
            parts = {k: parts[k] + terms[k] for k in parts}
    return seg, parts


def save_substitute(x_sub: np.ndarray, out_dir: Path) -> list[Path]:
    """x_sub as a 4-channel NIfTI (1 mm, RAS+: the cache's frame) and a PNG of mid slices per modality,
    each written atomically (`files.write_atomic`: a failed write leaves no file under either name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxbrats.errors import require

    nib = require("nibabel", "saving M3AE's substitute image")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nifti, png = out_dir / "x_sub.nii.gz", out_dir / "x_sub.png"
    image = nib.Nifti1Image(x_sub.astype(np.float32), np.eye(4))
    files.write_atomic(nifti, lambda tmp: nib.save(image, tmp))  # the temporary name keeps ".nii.gz": gzipped
    fig = substitute_figure(plt, x_sub)
    try:
        files.write_atomic(png, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
    return [nifti, png]


def substitute_figure(plt, x_sub: np.ndarray):
    """A grid of x_sub's mid slices: one row per modality, sagittal, coronal and axial columns."""
    centre = [s // 2 for s in x_sub.shape[:3]]
    views = (
        ("sagittal", lambda v: v[centre[0]]),
        ("coronal", lambda v: v[:, centre[1]]),
        ("axial", lambda v: v[:, :, centre[2]]),
    )
    fig, axes = plt.subplots(NUM_MODALITIES, 3, figsize=(7.5, 2.4 * NUM_MODALITIES), squeeze=False)
    for row, modality in enumerate(MODALITIES):
        channel = x_sub[..., row]
        lo, hi = np.percentile(channel, [1, 99])
        for col, (view, cut) in enumerate(views):
            ax = axes[row, col]
            ax.imshow(np.rot90(cut(channel)), cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(view)
            if col == 0:
                ax.set_ylabel(modality)
    fig.suptitle("M3AE substitute image x_sub (mid slices)")
    fig.tight_layout()
    return fig
