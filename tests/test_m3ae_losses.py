"""M3AE's two losses against numpy references written from the paper's equations ("M3AE: Multimodal
Representation Learning for Brain Tumor Segmentation with Missing Modalities", arXiv:2303.05302).

Pretraining, eq. (3): L = L_mse(x, F(S(x, x_sub))) + gamma R(x_sub); fine-tuning,
eqs. (2), (4), (5): L = sum_{i=0,1} sum_{alpha in 1, 1/2, 1/4} (Dice + BCE)(s_gt, s_i^alpha)
+ lambda L_mse(f_0, f_1). The network is run here on the input the references build
(S(x, x_sub) from the batch in numpy: x_sub read voxel by voxel where the crop came
from), and the losses are computed in float64 numpy from its outputs, the image, `valid`
and `present`. The batches have crop padding (`valid` False, zero image, background
label) and absent modalities (`present` False, zero channel), and modalities that are
present but dropped by `modality_mask`; each test checks that a reference ignoring
padding or absence (or visibility, scales, views, the fill) gives another value.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_losses import bce_reference, dice_reference, regions_reference, sigmoid_reference
from test_m3ae import batch_of, models_of, numpy_window, tiny

from jaxbrats.methods import get_method

CASE_SHAPE = np.asarray([20, 18, 22])
CROP = (16, 16, 16)
GAMMA = 0.005  # the paper's gamma (eq. 3)
LAMBDA = 0.1  # the paper's lambda (eq. 4)

#: pretraining: 4 samples (the fine-tuning step runs 2 samples x 2 views = 4 volumes: shared op shapes)
PRESENT_4 = [[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1]]
PRETRAIN_MASKS = [[[1, 0, 1, 1]], [[1, 0, 0, 1]], [[1, 1, 1, 0]], [[0, 0, 1, 0]]]  # subsets of PRESENT_4
#: fine-tuning: 2 samples, 2 different views each
PRESENT_2 = [[1, 1, 1, 1], [1, 0, 1, 1]]
FINETUNE_MASKS = [[[1, 1, 1, 1], [0, 1, 0, 0]], [[1, 0, 1, 1], [0, 0, 1, 0]]]


def ragged_batch(masks, present, seed=0):
    """`batch_of` with padding and absent modalities, as the pipeline gives them: zeros (image and label) there."""
    masks, present = np.asarray(masks, bool), np.asarray(present, bool)
    b, k = masks.shape[:2]
    assert not (masks & ~present[:, None]).any()  # the pipeline only keeps present modalities
    batch = {key: np.asarray(value) for key, value in batch_of(CASE_SHAPE, b=b, k=k, seed=seed).items()}
    valid = np.ones((b, *CROP), bool)
    valid[0, 12:] = False  # padding at the end of depth
    valid[1, :, :, 13:] = False  # ... of width
    if b > 2:
        valid[2, :, :3] = False  # ... at the start of height (a crop over the case's edge)
    image, label = batch["image"].copy(), batch["label"].copy()
    image[~valid] = 0
    image *= present[:, None, None, None, :]
    label[~valid] = 0
    batch.update(image=image, label=label, valid=valid, present=present, modality_mask=masks)
    return {key: jnp.asarray(value) for key, value in batch.items()}


def substitute_reference(x_sub, batch):
    """x_sub under each crop: read voxel by voxel at the source-grid voxel box_start + crop_start (the default
    "template" frame), with the crop's flips."""
    starts, flips = np.asarray(batch["crop_start"]) + np.asarray(batch["box_start"]), np.asarray(batch["flipped"])
    return np.stack([numpy_window(x_sub, starts[n], flips[n], CROP) for n in range(len(starts))])


def mse_reference(reconstruction, image, valid, present):
    """L_mse of eq. (3): sum_{n,v,m} w (F(S(x))_{n,v,m} - x_{n,v,m})^2 / sum_{n,v,m} w, with
    w = valid[n, v] * present[n, m]: every real modality (visible or hidden), no padding, no absent modality."""
    r, x = np.asarray(reconstruction, np.float64), np.asarray(image, np.float64)
    w = np.asarray(valid, bool)[..., None] & np.asarray(present, bool)[:, None, None, None, :]
    return float(np.sum(w * (r - x) ** 2) / np.sum(w))


def mean_square_reference(x_sub, image):
    """R(x_sub) = (1 / (S0 S1 S2 4)) sum_{v,m} x_sub[v, m]^2: the mean over x_sub (the previous default)."""
    x = np.asarray(x_sub, np.float64)
    return float(np.mean(x**2))


def sum_square_per_batch_value_reference(x_sub, image):
    """R(x_sub) = sum_{v,m} x_sub[v, m]^2 / (B D H W 4): the sum over x_sub per value of the training batch."""
    x = np.asarray(x_sub, np.float64)
    return float(np.sum(x**2) / np.asarray(image).size)


def centered_norm_reference(x_sub, image):
    """R(x_sub) = sqrt(sum_{v,m} (x_sub[v, m] - mean_v x_sub[:, m])^2): the public code's unsquared centred norm."""
    x = np.asarray(x_sub, np.float64).reshape(-1, 4)
    return float(np.sqrt(np.sum((x - x.mean(axis=0)) ** 2)))


#: every `substitute_penalty` form; R of eq. (3): the paper gives no form (m3ae.py's docstring)
PENALTY_REFERENCES = {
    "centered_norm": centered_norm_reference,
    "sum_square_per_batch_value": sum_square_per_batch_value_reference,
    "mean_square": mean_square_reference,
}


def seg_reference(logits, labels, valid):
    """L of eq. (5) at one scale: soft Dice (per sample and region over valid voxels, mean) + BCE (mean over valid
    voxels and regions) of sigmoid region outputs against WT/TC/ET; returns (dice, bce)."""
    g = regions_reference(labels)
    return dice_reference(sigmoid_reference(logits), g, valid), bce_reference(logits, g, valid)


def consistency_reference(f0, f1):
    """L_con of eq. (2): L_mse(f_0, f_1) = mean over all elements (C, D', H', W' and the batch) of (f_0 - f_1)^2."""
    return float(np.mean((np.asarray(f0, np.float64) - np.asarray(f1, np.float64)) ** 2))


def _differs(a, b, rtol=1e-3):
    return not np.isclose(float(a), float(b), rtol=rtol)


# --- pretraining ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "penalty,patch_masking",
    [("centered_norm", True), ("sum_square_per_batch_value", True), ("mean_square", True), ("centered_norm", False)],
)
def test_pretrain_loss_is_mse_over_real_voxels_plus_gamma_r(penalty, patch_masking):
    method = get_method("m3ae")(
        tiny(f"method.substitute_penalty='{penalty}'", f"method.patch_masking={str(patch_masking).lower()}")
    )
    assert method.options.substitute_weight == GAMMA and method.config.model.dropout == 0.0
    models = models_of(method, "pretrain")
    batch = ragged_batch(PRETRAIN_MASKS, PRESENT_4)
    key = jax.random.PRNGKey(7)
    total, parts = method.pretrain_loss(models, batch, key)

    # S(x, x_sub): visible voxels of x, x_sub at the same place elsewhere.
    image, valid, present = (np.asarray(batch[k]) for k in ("image", "valid", "present"))
    kept = np.asarray(batch["modality_mask"])[:, 0]
    mask_key, dropout_key = jax.random.split(key)
    if patch_masking:  # the patch draw is the step key's (its exactness is tested in test_m3ae)
        keep = np.asarray(method.visible(mask_key, batch["modality_mask"][:, 0], CROP))
        assert not keep[~np.broadcast_to(kept[:, None, None, None, :], keep.shape)].any()
        assert 0 < keep.mean() < kept.mean()
    else:  # modality dropout only: the kept modalities are visible everywhere
        keep = np.broadcast_to(kept[:, None, None, None, :], image.shape)
    np.testing.assert_allclose(parts["visible_fraction"], keep.mean(), rtol=1e-6)  # the same mask as the loss's
    x_sub = np.asarray(models["x_sub"].image[...])
    masked = np.where(keep, image, substitute_reference(x_sub, batch))
    unet = models["unet"]
    reconstruction = np.asarray(unet(jnp.asarray(masked, jnp.float32), dropout_key=dropout_key)["logits"])

    want_mse = mse_reference(reconstruction, image, valid, present)
    r = PENALTY_REFERENCES[penalty](x_sub, image)
    np.testing.assert_allclose(parts["mse"], want_mse, rtol=1e-5)
    np.testing.assert_allclose(parts["x_sub_penalty"], GAMMA * r, rtol=1e-5)
    np.testing.assert_allclose(total, want_mse + GAMMA * r, rtol=1e-5)

    # The batch exercises every exclusion and the target is the whole image, not only what was visible.
    assert _differs(parts["mse"], mse_reference(reconstruction, image, np.ones_like(valid), present))
    assert _differs(parts["mse"], mse_reference(reconstruction, image, valid, np.ones_like(present)))
    visible_only = np.sum(keep * valid[..., None] * (reconstruction - image.astype(np.float64)) ** 2) / np.sum(
        keep * valid[..., None]
    )
    assert _differs(parts["mse"], visible_only)
    unmasked = np.asarray(unet(jnp.asarray(image), dropout_key=dropout_key)["logits"])
    assert _differs(parts["mse"], mse_reference(unmasked, image, valid, present))  # the input really was masked
    for other, reference in PENALTY_REFERENCES.items():  # the form asked for, not another
        assert other == penalty or _differs(parts["x_sub_penalty"], GAMMA * reference(x_sub, image))


# --- fine-tuning ---------------------------------------------------------------------------------


def finetune_reference(models, batch, feature, fill="x_sub", scales=3):
    """Eq. (4): sum_{i=0,1} sum_{3 scales} (Dice + BCE) + lambda L_mse(f_0, f_1), from the network's outputs on the
    two views x_i (dropped modalities replaced by x_sub where the crop came from, or by zeros if fill="zero").

    The views are run in the order (x_1, x_0), the reverse of the loss's, so a mix-up of views and samples shows.
    Returns (total, seg, dice, bce, consistency) and the outputs.
    """
    image, masks = np.asarray(batch["image"]), np.asarray(batch["modality_mask"])
    labels, valid = np.asarray(batch["label"]), np.asarray(batch["valid"])
    n = image.shape[0]
    fillers = (
        substitute_reference(np.asarray(models["x_sub"].image[...]), batch) if fill == "x_sub" else np.zeros_like(image)
    )
    views = [np.where(masks[:, i, None, None, None, :], image, fillers) for i in range(2)]
    out = models["unet"](jnp.asarray(np.concatenate([views[1], views[0]]), jnp.float32))
    rows = {0: slice(n, 2 * n), 1: slice(0, n)}
    dice = bce = 0.0
    for i in (0, 1):
        for logits in (out["logits"], *out["deep"])[:scales]:
            d, b = seg_reference(np.asarray(logits)[rows[i]], labels, valid)
            dice, bce = dice + d, bce + b
    f = np.asarray(out["encoder"][-1] if feature == "bottleneck" else out["deep"][0])
    consistency = consistency_reference(f[rows[0]], f[rows[1]])
    seg = dice + bce
    return (seg + LAMBDA * consistency, seg, dice, bce, consistency), out


@pytest.mark.parametrize("feature", ["bottleneck", "deep_quarter"])
def test_finetune_loss_is_dice_plus_bce_over_views_and_scales_plus_lambda_consistency(feature):
    method = get_method("m3ae")(tiny(f"method.consistency_feature='{feature}'"))
    assert method.options.consistency_weight == LAMBDA and method.config.model.dropout == 0.0
    models = models_of(method, "finetune")
    batch = ragged_batch(FINETUNE_MASKS, PRESENT_2, seed=1)
    total, parts = method.finetune_loss(models, batch, jax.random.PRNGKey(0))
    (want, seg, dice, bce, consistency), out = finetune_reference(models, batch, feature)

    # the feature of eq. (2): the bottleneck (1/8 scale, deepest width) or the 1/4-scale deep-supervision output
    if feature == "bottleneck":
        assert out["encoder"][-1].shape == (4, 2, 2, 2, method.config.model.widths[-1])
    else:
        quarter = models["unet"].decoder.ds_heads[0](out["decoder"][0])
        assert quarter.shape == (4, 4, 4, 4, 3)
        np.testing.assert_allclose(
            out["deep"][0], jax.image.resize(quarter, (4, *CROP, 3), "trilinear"), rtol=1e-5, atol=1e-6
        )

    np.testing.assert_allclose(parts["dice_loss"], dice, rtol=1e-5)
    np.testing.assert_allclose(parts["bce"], bce, rtol=1e-5)
    np.testing.assert_allclose(parts["seg_loss"], seg, rtol=1e-5)
    np.testing.assert_allclose(parts["consistency"], consistency, rtol=1e-5)
    np.testing.assert_allclose(total, want, rtol=1e-5)

    # The batch exercises the padding, both deep-supervision scales, the x_sub fill and the consistency term.
    labels, valid = np.asarray(batch["label"]), np.asarray(batch["valid"])
    z = np.asarray(out["logits"])[2:]  # view 0 at full resolution
    masked, unmasked = seg_reference(z, labels, valid), seg_reference(z, labels, np.ones_like(valid))
    assert _differs(masked[0], unmasked[0]) and _differs(masked[1], unmasked[1])
    assert _differs(parts["seg_loss"], finetune_reference(models, batch, feature, scales=1)[0][1])
    assert _differs(parts["seg_loss"], finetune_reference(models, batch, feature, fill="zero")[0][1])
    assert consistency > 0 and _differs(total, seg)
