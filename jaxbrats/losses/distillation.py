"""Knowledge-distillation (KD) losses of the four prior methods Mind the Gap plugs its aligned teacher into.

Mind the Gap ("Mind the Gap: Promoting Missing Modality Brain Tumor Segmentation with
Alignment", arXiv:2409.19366, Sec. III-A) trains each student with
L = L_seg + L_KD, where L_KD is "the loss that receives supervision from the
teacher used in the previous works": KD-Net, PMKL, ProtoKD and SMU-Net. The
paper gives none of their equations or constants; they come from each
baseline's public code (read for facts only; nothing here is copied) or, for
KD-Net, which has no public code, are ours. Every student here is this
library's shared U-Net (`networks.unet`), NOT each baseline's own network
(PMKL's TF encoder-decoder with a metric head, ProtoKD's VNet, SMU-Net's
U-Net with a style module), so a term that reads a feature of the baseline's
own network reads the nearest feature of the shared U-Net (column "features").

Conventions: channels last; outputs are dicts like `UNet.__call__`'s:
"logits" (N, D, H, W, 4) softmax over the internal labels (0 background,
1 NCR, 2 ED, 3 ET), "encoder" (fine to coarse; [-1] = bottleneck, 1/8
resolution), "decoder" (coarse to fine; [-1] = full-resolution features).
`labels` (N, D, H, W) int, `valid` (N, D, H, W) bool. A teacher with sigmoid WT/TC/ET
outputs (a region baseline U-Net) enters as `label_logits_from_region_logits` of its
logits (label log-probabilities; ours). Everything is computed
in float32, is pure jnp (jit/vmap friendly, no branching on values) and
returns scalars; one student at a time (the method maps over its students).

Each term, by baseline: the part name, the equation as its code computes it, the constants (and
their source), and the features it reads.

- KD-Net, kl_output: KL(softmax(t/T) ‖ softmax(s/T)) per voxel, mean over voxels, x T^2. Constants:
  T = 10, weight 1, T^2 on (ours: no code). Features: logits.
- KD-Net, kl_latent: KL(softmax_c(t) ‖ softmax_c(s)) per bottleneck voxel, mean. Constants: weight
  1, T = 1 (ours). Features: encoder[-1].
- PMKL, kd_ce: sum_v w_v CE(softmax(t/T), clip(softmax(s/T), 0.005, 1)) / sum_v w_v,
  w_v = relu(CE_s - CE_t) [argmax t = y]. Constants: T = 10, weight 0.5, floor 0.005
  (cchen-cc/PMKL main.py, losses.py). Features: logits.
- PMKL, contrastive: mean over the N^2 (student i, teacher j) pairs: d^2 if i = j, relu(1 - d)^2
  otherwise. Constants: margin 1, weight 0.5 (main.py). Features: mean of decoder[-1], L2-normalised
  (ours; PMKL: a learned 2-layer head).
- ProtoKD, kl_output: kl_div(log_softmax(s/T), softmax(t/T)) averaged over all elements (= per-voxel
  KL / 4), no T^2. Constants: T = 10, weight 10 (SakurajimaMaiii/ProtoKD config.py,
  train_protokd.py). Features: logits.
- ProtoKD, prototype: MSE between the student's and the teacher's cosine maps to their OWN class
  prototypes; classes present in every sample. Constants: weight 0.1, eps 1e-5 (train_protokd.py,
  loss.py). Features: decoder[-1] (ProtoKD: the last decoder block, before the 1x1 output conv).
- SMU-Net, content_mse: mean (f_t - f_s)^2. Constants: weight 0.2 (rezazad68/smunet config.yml).
  Features: encoder[-1] (SMU-Net: its bottleneck c4d).
- SMU-Net, style_gram: sum (G_t - G_s)^2 / (4 C^2 (X Y)^2), G = F F^T / (B C X Y Z), F (B*C, XYZ).
  Constants: weight 1e-4 (losses.py). Features: "style" if the output has it, else encoder[-1]
  (ours; SMU-Net: a learned 1x1 conv of multi-scale encoder features).
- SMU-Net, consistency_mse: sum over the 3 tumour channels of mean (p_t - p_s)^2. Constants: weight
  10 x sigmoid_rampup(epoch, 20) (Wangyixinxin/ACN losses.py, config.py; smunet losses.py).
  Features: softmax of logits, labels 1-3 (ours; ACN/SMU-Net: 3 sigmoid label channels).

Not in this file: SMU-Net's adversarial style discriminator (the method
composes it with `losses.adversarial`, weight 2e-4, see `KDConstants`): in
SMU-Net's train.ipynb it reads the STYLE features (the module's output at
bottleneck resolution, 128 channels), the full-modality path's labelled
"source" (0) and the missing path's "target" (1); the missing path's
generator term is BCE(D(style_missing), source) x 0.0002. Here, the style
features are `style_features(output)` (encoder[-1] for the shared U-Net).
Also not here: each baseline's segmentation loss (SMU-Net's Dice 0.4 full /
0.6 missing, ACN's 0.2 / 0.8 apply to its co-trained full path, which Mind
the Gap replaces by the frozen teacher).

Where the padding mask applies. Voxel-level terms (every term on logits, and
ProtoKD's prototype term on the full-resolution decoder[-1]) count valid
voxels only. Feature terms at a coarser resolution (KD-Net's latent KL,
SMU-Net's content and style, PMKL's pooled embedding when given a coarse map)
use `valid_at`: `valid` brought to the feature's grid by a strided "any"
(a coarse voxel counts when any voxel of its s^3 block is valid; ours). The
means divide by the number of counted (coarse) voxels; the Gram matrix zeroes
the uncounted positions and keeps the public code's constant normaliser.
So no term changes when the inputs at padding voxels (or at coarse voxels
whose whole block is padding) change.

Gradients: the teacher's arrays are gradient-stopped here too (the
dispatcher stops the whole teacher dict; every two-network loss stops its
teacher argument), except in `pmkl_contrastive_loss`, whose two embeddings
may both come from trainable heads (PMKL trains the teacher-side metric head
with the student's loss). Nothing is stopped on the student side.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxbrats.labels import NUM_LABELS

# Full float32 products (GPUs may otherwise run float32 matmuls in TF32).
_PRECISION = jax.lax.Precision.HIGHEST

KD_LOSSES = ("none", "kdnet", "pmkl", "protokd", "smunet")
KL_REDUCTIONS = ("voxel", "element")


@dataclasses.dataclass(frozen=True)
class KDConstants:
    """Every constant of the four KD losses, with its default from the public code (or ours where noted)."""

    # KD-Net (Hu et al., MICCAI 2020): no public code; every value is ours.
    kdnet_temperature: float = 10.0  # ours: the T of PMKL (main.py TEMP) and ProtoKD (config.py T), both after KD-Net
    kdnet_output_weight: float = 1.0  # ours
    kdnet_t_squared: bool = True  # ours: Hinton's T^2, so the softened term's gradient keeps its scale
    kdnet_latent_weight: float = 1.0  # ours
    kdnet_latent_temperature: float = 1.0  # ours: softmax over the bottleneck's channels per voxel, unsoftened

    # PMKL (cchen-cc/PMKL, TensorFlow 1).
    pmkl_temperature: float = 10.0  # main.py: TEMP = 10.0 (passed to losses.kd_loss)
    pmkl_kd_weight: float = 0.5  # main.py: kd_weight = 0.5
    pmkl_contrastive_weight: float = 0.5  # main.py: contras_weight = 0.5
    pmkl_margin: float = 1.0  # main.py: contrastive_loss(..., margin=1.0)
    pmkl_prob_floor: float = 0.005  # losses.py softmax_loss: log(clip_by_value(pred, 0.005, 1)); 0 disables

    # ProtoKD (SakurajimaMaiii/ProtoKD, PyTorch).
    protokd_temperature: float = 10.0  # code/config.py: "T": 10
    protokd_kd_weight: float = 10.0  # code/train_protokd.py: --kd_weight default 10
    protokd_proto_weight: float = 0.1  # code/train_protokd.py: --proto_weight default 0.1
    protokd_eps: float = 1e-5  # code/loss.py prototype_loss: eps (prototype denominator and cosine)

    # SMU-Net (rezazad68/smunet, built on Wangyixinxin/ACN).
    smunet_content_weight: float = 0.2  # config.yml: weight_content
    smunet_style_weight: float = 1e-4  # losses.py get_style_loss: sloss * 0.0001
    smunet_batch_gram: bool = True  # losses.py gram_matrix: one Gram of the (B*C, DHW) view (False: per sample, ours)
    smunet_consistency_weight: float = 10.0  # losses.py get_current_consistency_weight: consistency = 10 (as ACN)
    smunet_rampup_length: float = 20.0  # losses.py: consistency_rampup = 20.0, in epochs (as ACN); the caller's unit
    smunet_consistency_background: bool = False  # ours: ACN/SMU-Net have 3 sigmoid channels, no background
    smunet_adversarial_weight: float = 2e-4  # train.ipynb: 0.0002 * BCE(d_style(style_m), source); the method's term
    smunet_missing_dice_weight: float = 0.6  # config.yml: weight_mispath (full path 0.4); the method's L_seg, not here


# --- shared helpers ----------------------------------------------------------------------


def sigmoid_rampup(current, length):
    """ACN's / SMU-Net's consistency ramp (Laine & Aila): exp(-5 (1 - t)^2), t = clip(current / length, 0, 1).

    0.0067 (e^-5) at current = 0, e^-1.25 at half the length, 1 from `length`
    on; 1 when length <= 0 (the code's "rampup_length == 0"). `current` and
    `length` may be traced; the unit (epochs in the public code, steps for a
    caller that has no epochs) is the caller's. Returns a float32 scalar.
    """
    current = jnp.asarray(current, jnp.float32)
    length = jnp.asarray(length, jnp.float32)
    ramping = length > 0
    t = jnp.clip(current / jnp.where(ramping, length, 1.0), 0.0, 1.0)
    return jnp.where(ramping, jnp.exp(-5.0 * jnp.square(1.0 - t)), 1.0)


def valid_at(valid, shape):
    """`valid` (N, D, H, W) brought to a feature grid of spatial `shape` (D', H', W') by a strided "any".

    Identity when the shapes agree. Otherwise each factor s = D / D' must be
    an integer (the U-Net's 2^k), and a coarse voxel is valid when any voxel
    of its s0 x s1 x s2 block is: its receptive field then sees some real
    data (ours). Returns bool (N, D', H', W').
    """
    valid = jnp.asarray(valid).astype(bool)
    spatial, shape = tuple(valid.shape[1:4]), tuple(int(s) for s in shape)
    if spatial == shape:
        return valid
    factors = []
    for size, target in zip(spatial, shape):
        if target < 1 or target > size or size % target:
            raise ValueError(f"cannot bring a {spatial} mask onto features of {shape}: each factor must be an integer")
        factors.append(size // target)
    n = valid.shape[0]
    blocks = valid.reshape(n, shape[0], factors[0], shape[1], factors[1], shape[2], factors[2])
    return jnp.any(blocks, axis=(2, 4, 6))


def _masked_mean(values, valid):
    """Mean of (N, D, H, W) `values` over the True voxels of `valid` (0 when none is)."""
    w = valid.astype(jnp.float32)
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def _stop(x):
    return jax.lax.stop_gradient(jnp.asarray(x).astype(jnp.float32))


def style_features(output):
    """The features SMU-Net's style terms read: output["style"] when present, else the bottleneck encoder[-1] (ours).

    SMU-Net's style (models/unet.py) is a learned 1x1 conv of the
    concatenation of three 1/8-resolution maps: the 1/4-resolution features
    max-pooled by 2, the features entering the bottleneck blocks, and the
    bottleneck's output (its "content"). The shared U-Net has no such module,
    so its bottleneck stands in (ours). The style discriminator should see
    this same tensor (teacher's "source", student's "target").
    """
    return output["style"] if "style" in output else output["encoder"][-1]


# --- output-level KL (KD-Net, ProtoKD) ---------------------------------------------------


def softened_kl(teacher_logits, student_logits, valid, temperature, reduction: str = "voxel", t_squared: bool = False):
    """KL(softmax(t/T) || softmax(s/T)) per voxel (summed over the last axis), averaged over the valid voxels.

    Works on any (N, D, H, W, K) pair (logits, or features whose channels
    are read as logits). The teacher is gradient-stopped. Reductions:

    - "voxel" (default): sum over the K classes, mean over valid voxels;
      PyTorch's kl_div(..., reduction="batchmean") on a (voxels, K) view.
    - "element": the mean over every element including the classes, i.e.
      "voxel" / K: PyTorch's kl_div(..., reduction="mean") or
      kl_div(..., reduction="none").mean(). ProtoKD computes its KD this way
      (loss.py softmax_kl_loss, then .mean() in trainer.py), without T^2.

    ``t_squared`` multiplies by T^2 (Hinton's convention; ProtoKD and PMKL
    do not; KD-Net's default here does, ours). PMKL's KD is not a KL: see
    `pmkl_kd_loss`.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, not {reduction!r}")
    temperature = jnp.asarray(temperature, jnp.float32)
    log_t = jax.nn.log_softmax(_stop(teacher_logits) / temperature, axis=-1)
    log_s = jax.nn.log_softmax(jnp.asarray(student_logits).astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    loss = _masked_mean(kl, jnp.asarray(valid).astype(bool))
    if reduction == "element":
        loss = loss / jnp.shape(teacher_logits)[-1]
    if t_squared:
        loss = loss * jnp.square(temperature)
    return loss


def latent_kl(teacher_features, student_features, valid, temperature: float = 1.0):
    """KD-Net's latent term (ours: no public code): KL(softmax_c(f_t/T) || softmax_c(f_s/T)) per bottleneck voxel.

    A feature map becomes a distribution by a softmax over its channels at
    each voxel (ours; the paper's KL between latent representations does not
    say how). Mean over the coarse voxels that `valid_at` counts.
    """
    return softened_kl(teacher_features, student_features, valid_at(valid, student_features.shape[1:4]), temperature)


def kdnet_loss(teacher, student, valid, constants: KDConstants):
    """KD-Net: the softened-output KL plus the bottleneck KL; returns (unweighted) parts."""
    c = constants
    return {
        "kl_output": softened_kl(
            teacher["logits"], student["logits"], valid, c.kdnet_temperature, t_squared=c.kdnet_t_squared
        ),
        "kl_latent": latent_kl(teacher["encoder"][-1], student["encoder"][-1], valid, c.kdnet_latent_temperature),
    }


# --- PMKL -------------------------------------------------------------------------------


def pmkl_voxel_weights(teacher_logits, student_logits, labels, valid):
    """PMKL's KD weight per voxel (main.py kd_mask): relu(CE_s - CE_t) * [argmax teacher = label], gradient-stopped.

    CE_s and CE_t are the unsoftened (T = 1) softmax cross-entropies of each
    network's logits against the GROUND TRUTH (tf.nn.softmax_cross_entropy_with_logits
    with labels = the one-hot label map). The weight is the size of the gap,
    not a 0/1 indicator: a voxel counts in proportion to how much better the
    teacher is there, and not at all where the teacher is wrong or no better.
    Padding voxels get 0. Returns float32 (N, D, H, W).
    """
    labels = jnp.asarray(labels).astype(jnp.int32)
    t = _stop(teacher_logits)
    s = jax.lax.stop_gradient(jnp.asarray(student_logits).astype(jnp.float32))
    onehot = jax.nn.one_hot(labels, t.shape[-1], dtype=jnp.float32)
    ce_t = -jnp.sum(onehot * jax.nn.log_softmax(t, axis=-1), axis=-1)
    ce_s = -jnp.sum(onehot * jax.nn.log_softmax(s, axis=-1), axis=-1)
    correct = jnp.argmax(t, axis=-1) == labels
    return jax.nn.relu(ce_s - ce_t) * correct * jnp.asarray(valid).astype(jnp.float32)


def pmkl_kd_loss(teacher_logits, student_logits, labels, valid, temperature: float = 10.0, prob_floor: float = 0.005):
    """PMKL's KD term: sum_v w_v CE_v / sum_v w_v, with w = `pmkl_voxel_weights` (main.py kd_ce_loss).

    CE_v = -sum_k softmax(t/T)_k log(clip(softmax(s/T)_k, prob_floor, 1))
    (losses.py kd_loss and softmax_loss): a cross-entropy, not a KL (it
    exceeds the KL by the teacher's entropy, a constant for the student), no
    T^2. The clip stops the gradient of a class whose softened student
    probability is below the floor; ``prob_floor=0`` disables it. The public
    code divides by sum w unguarded (NaN when no voxel counts); here the term
    is 0 then.
    """
    temperature = jnp.asarray(temperature, jnp.float32)
    p_t = jax.nn.softmax(_stop(teacher_logits) / temperature, axis=-1)
    log_s = jax.nn.log_softmax(jnp.asarray(student_logits).astype(jnp.float32) / temperature, axis=-1)
    if prob_floor > 0:
        log_s = jnp.maximum(log_s, math.log(prob_floor))  # = log(clip(p, floor, 1)), as p <= 1
    ce = -jnp.sum(p_t * log_s, axis=-1)
    w = pmkl_voxel_weights(teacher_logits, student_logits, labels, valid)
    total = jnp.sum(w)
    return jnp.where(total > 0, jnp.sum(ce * w) / jnp.where(total > 0, total, 1.0), 0.0)


def pooled_embedding(features, valid, eps: float = 1e-12):
    """Ours, parameter-free: the valid-voxel mean of each channel, L2-normalised; (N, C) float32.

    PMKL's embedding (model.py metric_layer) is the last decoder features
    (d1_out, 16 channels, full resolution) average-pooled 40^3 with stride 1,
    flattened, then Linear(32) + ReLU, Linear(16), L2-normalised: a learned
    head, trained by the student's optimiser (its teacher-side head too). A
    caller with such a head passes its output as output["embedding"] instead.
    """
    f = jnp.asarray(features).astype(jnp.float32)
    w = valid_at(valid, f.shape[1:4]).astype(jnp.float32)[..., None]
    mean = jnp.sum(f * w, axis=(1, 2, 3)) / jnp.maximum(jnp.sum(w, axis=(1, 2, 3)), 1.0)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(mean), axis=-1, keepdims=True), eps * eps))
    return mean / norm


def pmkl_contrastive_loss(teacher_embeddings, student_embeddings, margin: float = 1.0):
    """PMKL's contrastive term (main.py; tf.contrib metric_learning.contrastive_loss); embeddings (N, E).

    Anchors are the student's embeddings, pairs the teacher's: the N pairs
    (student i, teacher i) are positives, the N (N - 1) pairs (student i,
    teacher j != i) negatives. With d = ||a - b||_2,
    loss = mean over the N^2 pairs of [d^2 if positive else relu(margin - d)^2].
    With N = 1 there is only the positive pair. Nothing is gradient-stopped
    (both embeddings may come from trainable heads; see the module docstring).
    """
    t = jnp.asarray(teacher_embeddings).astype(jnp.float32)
    s = jnp.asarray(student_embeddings).astype(jnp.float32)
    d2 = jnp.sum(jnp.square(s[:, None, :] - t[None, :, :]), axis=-1)  # (student i, teacher j)
    d = jnp.sqrt(jnp.maximum(d2, 1e-12))  # finite gradient at d = 0
    positive = jnp.eye(s.shape[0], t.shape[0], dtype=bool)
    return jnp.mean(jnp.where(positive, d2, jnp.square(jax.nn.relu(margin - d))))


def embedding_of(output, valid):
    """output["embedding"] (N, E) when the output has one, else `pooled_embedding` of decoder[-1]."""
    if "embedding" in output:
        return jnp.asarray(output["embedding"]).astype(jnp.float32)
    return pooled_embedding(output["decoder"][-1], valid)


def pmkl_loss(teacher, student, labels, valid, constants: KDConstants):
    c = constants
    return {
        "kd_ce": pmkl_kd_loss(
            teacher["logits"], student["logits"], labels, valid, c.pmkl_temperature, c.pmkl_prob_floor
        ),
        "contrastive": pmkl_contrastive_loss(embedding_of(teacher, valid), embedding_of(student, valid), c.pmkl_margin),
    }


# --- ProtoKD ----------------------------------------------------------------------------


def prototype_maps(features, labels, valid, num_classes: int = NUM_LABELS, eps: float = 1e-5):
    """One network's prototype similarity maps (loss.py prototype_loss); returns maps (N, D, H, W, K), counts (N, K).

    Per sample n and class k (background included), the prototype is the
    mean feature under the ground-truth mask, p_nk = sum_v f_v [y_v = k] /
    (sum_v [y_v = k] + eps) over valid voxels; the map is the cosine
    cos(f_v, p_nk) = f_v . p_nk / (max(|f_v|, eps) max(|p_nk|, eps)), each
    norm clamped separately as PyTorch's cosine_similarity does. `counts` are
    the class's valid voxel counts per sample.
    """
    f = jnp.asarray(features).astype(jnp.float32)
    masks = jax.nn.one_hot(jnp.asarray(labels).astype(jnp.int32), num_classes, dtype=jnp.float32)
    masks = masks * jnp.asarray(valid).astype(jnp.float32)[..., None]
    counts = jnp.sum(masks, axis=(1, 2, 3))
    prototypes = jnp.einsum("ndhwc,ndhwk->nkc", f, masks, precision=_PRECISION) / (counts + eps)[..., None]

    def unit(x):
        return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))

    maps = jnp.einsum("ndhwc,nkc->ndhwk", unit(f), unit(prototypes), precision=_PRECISION)
    return maps, counts


def classes_in_every_sample(counts):
    """(K,) bool: the classes ProtoKD counts, those present in EVERY sample of the batch (loss.py: `.all()`)."""
    return jnp.all(counts > 0, axis=0)


def prototype_loss(teacher_features, student_features, labels, valid, num_classes: int = NUM_LABELS, eps: float = 1e-5):
    """ProtoKD's prototype term: mean (map_s - map_t)^2 over the counted classes and the valid voxels.

    Each network's map uses ITS OWN prototypes (loss.py: proto_s from the
    student's features, proto_t from the teacher's, both under the same
    ground-truth mask), so the term matches the two networks' intra-/
    inter-class similarity structure, not the student's features to the
    teacher's prototypes. A class counts only if present (among valid
    voxels) in every sample of the batch; the mean is over samples x counted
    classes x valid voxels, as torch.mean over the concatenated maps. The
    public code fails (empty torch.cat) when no class counts; here it is 0.
    The teacher is gradient-stopped.
    """
    valid = jnp.asarray(valid).astype(bool)
    maps_s, counts = prototype_maps(student_features, labels, valid, num_classes, eps)
    maps_t, _ = prototype_maps(_stop(teacher_features), labels, valid, num_classes, eps)
    w = valid.astype(jnp.float32)[..., None] * classes_in_every_sample(counts).astype(jnp.float32)
    return jnp.sum(jnp.square(maps_s - maps_t) * w) / jnp.maximum(jnp.sum(w), 1.0)


def protokd_loss(teacher, student, labels, valid, constants: KDConstants):
    c = constants
    return {
        "kl_output": softened_kl(
            teacher["logits"], student["logits"], valid, c.protokd_temperature, reduction="element"
        ),
        "prototype": prototype_loss(teacher["decoder"][-1], student["decoder"][-1], labels, valid, eps=c.protokd_eps),
    }


# --- SMU-Net ----------------------------------------------------------------------------


def content_loss(teacher_features, student_features, valid):
    """SMU-Net's content term: the mean squared difference (F.mse_loss, mean), over counted coarse voxels x channels."""
    t, s = _stop(teacher_features), jnp.asarray(student_features).astype(jnp.float32)
    per_voxel = jnp.mean(jnp.square(t - s), axis=-1)
    return _masked_mean(per_voxel, valid_at(valid, s.shape[1:4]))


def gram_matrix(features, batch_gram: bool = True):
    """SMU-Net's Gram matrix (losses.py gram_matrix) of channels-last (N, X, Y, Z, C) features.

    ``batch_gram=True`` (the code): the features viewed as (N*C, XYZ) (rows
    sample-major, as PyTorch's .view of (N, C, X, Y, Z)), G = F F^T /
    (N C XYZ), (N*C, N*C): with N > 1 it holds cross-sample channel products
    too (SMU-Net trains with batch 1, where this is the usual Gram).
    ``batch_gram=False`` (ours): one (C, C) Gram per sample, F_n F_n^T /
    (C XYZ), stacked (N, C, C): each equals the code's Gram at N = 1.
    """
    f = jnp.asarray(features).astype(jnp.float32)
    n, c = f.shape[0], f.shape[-1]
    positions = math.prod(f.shape[1:4])
    rows = jnp.moveaxis(f, -1, 1).reshape(n, c, positions)
    if batch_gram:
        rows = rows.reshape(n * c, positions)
        return jnp.einsum("iv,jv->ij", rows, rows, precision=_PRECISION) / (n * c * positions)
    return jnp.einsum("niv,njv->nij", rows, rows, precision=_PRECISION) / (c * positions)


def style_loss(teacher_features, student_features, valid, batch_gram: bool = True):
    """SMU-Net's style term before its 1e-4 weight (losses.py get_style_loss): sum (G_t - G_s)^2 / (4 C^2 (X Y)^2).

    X Y is the product of the first two spatial axes (size(2) * size(3) of
    SMU-Net's (B, C, x, y, z) nibabel-order tensors); the third, the axial z
    (our RAS+ W axis, the last), is left out of that normaliser, though the
    Gram's own normaliser counts all positions. Coarse voxels that `valid_at`
    does not count are zeroed in both feature maps (the normalisers stay the
    code's constants). With ``batch_gram=False`` the per-sample values are
    averaged. The teacher is gradient-stopped.
    """
    s = jnp.asarray(student_features).astype(jnp.float32)
    w = valid_at(valid, s.shape[1:4]).astype(jnp.float32)[..., None]
    g_t = gram_matrix(_stop(teacher_features) * w, batch_gram)
    g_s = gram_matrix(s * w, batch_gram)
    channels, size = s.shape[-1], s.shape[1] * s.shape[2]
    per_gram = jnp.sum(jnp.square(g_t - g_s), axis=(-2, -1)) / (4.0 * channels**2 * size**2)
    return jnp.mean(per_gram)


def consistency_loss(teacher_logits, student_logits, valid, include_background: bool = False):
    """ACN's / SMU-Net's output consistency: sum over channels of the MSE of the two networks' probabilities.

    ACN (config.py consistency_type = "mse", losses.py unet_Co_loss) and
    SMU-Net compare their 3 sigmoid output channels, which are the labels
    ED, NCR and ET (data.py: seg channels [ed, net, et, bg]; the code's
    comments call them WT/TC/ET), each by F.mse_loss (mean over batch and
    voxels), and sum the three. Our outputs are a softmax over 4 labels, so
    the channels are the softmax probabilities of labels 1-3 (ours), or all 4
    with ``include_background``. Means over valid voxels. The teacher is
    gradient-stopped (in ACN/SMU-Net both paths train; here the teacher is
    frozen).
    """
    p_t = jax.nn.softmax(_stop(teacher_logits), axis=-1)
    p_s = jax.nn.softmax(jnp.asarray(student_logits).astype(jnp.float32), axis=-1)
    if not include_background:
        p_t, p_s = p_t[..., 1:], p_s[..., 1:]
    return _masked_mean(jnp.sum(jnp.square(p_t - p_s), axis=-1), jnp.asarray(valid).astype(bool))


def smunet_loss(teacher, student, valid, constants: KDConstants):
    c = constants
    return {
        "content_mse": content_loss(teacher["encoder"][-1], student["encoder"][-1], valid),
        "style_gram": style_loss(style_features(teacher), style_features(student), valid, c.smunet_batch_gram),
        "consistency_mse": consistency_loss(
            teacher["logits"], student["logits"], valid, c.smunet_consistency_background
        ),
    }


# --- a teacher of the other output convention -----------------------------------------


def label_logits_from_region_logits(region_logits):
    """Log-probabilities of the 4 internal labels (usable as softmax logits) from a region network's
    WT, TC, ET sigmoid logits (..., 3): the nesting read as a chain of conditionals (ours),

        P(background) = 1 - p_WT,      P(ED)  = p_WT (1 - p_TC),
        P(NCR) = p_WT p_TC (1 - p_ET), P(ET)  = p_WT p_TC p_ET,

    with p_TC read as P(TC | WT) and p_ET as P(ET | TC). The four sum to 1 for any sigmoid
    outputs (independent sigmoids need not nest, so `labels.label_probs_from_region_probs`'
    differences can be negative), so softmax(result) is that distribution and softmax(result / T)
    its tempered form. Computed with log-sigmoids (finite for any logits). Returns float32
    (..., 4) in internal label order (background, NCR, ED, ET).
    """
    z = jnp.asarray(region_logits).astype(jnp.float32)
    on, off = jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
    wt, tc, et = (on[..., i] for i in range(3))
    not_wt, not_tc, not_et = (off[..., i] for i in range(3))
    return jnp.stack([not_wt, wt + tc + not_et, wt + not_tc, wt + tc + et], axis=-1)


# --- dispatcher -------------------------------------------------------------------------


def part_weights(kind: str, constants: KDConstants = KDConstants(), ramp=1.0) -> dict:
    """The weight of each part of `kind`'s loss: total = sum(weight * part). `ramp` scales SMU-Net's consistency."""
    c = constants
    if kind not in KD_LOSSES:
        raise ValueError(f"unknown KD loss {kind!r}; expected one of {KD_LOSSES}")
    return {
        "none": {},
        "kdnet": {"kl_output": c.kdnet_output_weight, "kl_latent": c.kdnet_latent_weight},
        "pmkl": {"kd_ce": c.pmkl_kd_weight, "contrastive": c.pmkl_contrastive_weight},
        "protokd": {"kl_output": c.protokd_kd_weight, "prototype": c.protokd_proto_weight},
        "smunet": {
            "content_mse": c.smunet_content_weight,
            "style_gram": c.smunet_style_weight,
            "consistency_mse": c.smunet_consistency_weight * jnp.asarray(ramp, jnp.float32),
        },
    }[kind]


def distillation_loss(kind: str, teacher, student, labels, valid, constants: KDConstants = KDConstants(), ramp=1.0):
    """L_KD of one student: (total float32 scalar, {part name: unweighted float32 scalar}).

    `kind` is one of `KD_LOSSES`; "none" gives 0 and no parts. `teacher` and
    `student` are output dicts (see the module docstring); the whole teacher
    dict is gradient-stopped. `ramp` is SMU-Net's consistency ramp factor,
    the caller's `sigmoid_rampup(step, length)` (1 = fully ramped).
    total = sum over parts of part_weights(kind)[part] * part.
    """
    weights = part_weights(kind, constants, ramp)
    if kind == "none":
        return jnp.zeros((), jnp.float32), {}
    teacher = jax.tree.map(jax.lax.stop_gradient, teacher)
    if kind == "kdnet":
        parts = kdnet_loss(teacher, student, valid, constants)
    elif kind == "pmkl":
        parts = pmkl_loss(teacher, student, labels, valid, constants)
    elif kind == "protokd":
        parts = protokd_loss(teacher, student, labels, valid, constants)
    else:
        parts = smunet_loss(teacher, student, valid, constants)
    total = sum(weights[name] * value for name, value in parts.items())
    return jnp.asarray(total, jnp.float32), parts
