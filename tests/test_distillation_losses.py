"""The KD losses of Mind the Gap's four baselines against numpy references written from their equations.

The references are float64 numpy (explicit loops where the equation has
them: coarse blocks, class prototypes, contrastive pairs) and call nothing of
jaxbrats. Data are tiny: N = 2 samples of 4 x 6 x 8 voxels, C = 8 feature
channels, a one-level "U-Net" output whose bottleneck is 2 x 3 x 4 (factor 2);
the grid is not cubic so that the Gram normaliser's choice of axes shows.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbrats.losses.distillation import (
    KD_LOSSES,
    KDConstants,
    classes_in_every_sample,
    consistency_loss,
    content_loss,
    distillation_loss,
    gram_matrix,
    label_logits_from_region_logits,
    latent_kl,
    part_weights,
    pmkl_contrastive_loss,
    pmkl_kd_loss,
    pmkl_voxel_weights,
    pooled_embedding,
    prototype_loss,
    prototype_maps,
    sigmoid_rampup,
    softened_kl,
    style_loss,
    valid_at,
)

N, SHAPE, C, K = 2, (4, 6, 8), 8, 4
COARSE = tuple(s // 2 for s in SHAPE)
RTOL, ATOL = 1e-5, 1e-9


# --- data ------------------------------------------------------------------------------


def padding_mask():
    """Whole coarse blocks of padding (x >= 2 everywhere, y >= 4 in sample 1) plus lone padding voxels."""
    valid = np.ones((N, *SHAPE), bool)
    valid[:, 2:] = False
    valid[1, :, 4:] = False
    valid[0, 0, 0, 0] = valid[1, 1, 1, 3] = False
    return valid


def make_output(rng, labels=None, teacher=False):
    logits = rng.normal(size=(N, *SHAPE, K)) * 2.0
    if teacher:  # a teacher right at most voxels, wrong at some
        logits = logits * 0.5 + 4.0 * np.eye(K)[labels]
    return {
        "logits": logits,
        "encoder": [rng.normal(size=(N, *SHAPE, C)), rng.normal(size=(N, *COARSE, C))],
        "decoder": [rng.normal(size=(N, *COARSE, C)), rng.normal(size=(N, *SHAPE, C))],
        "deep": [],
    }


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, K, size=(N, *SHAPE))
    return {
        "labels": labels,
        "valid": padding_mask(),
        "teacher": make_output(rng, labels, teacher=True),
        "student": make_output(rng),
    }


def f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def close(got, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(float(got), float(expected), rtol=rtol, atol=atol)


# --- numpy references (float64) --------------------------------------------------------


def log_softmax_np(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def softmax_np(x):
    return np.exp(log_softmax_np(x))


def valid_at_np(valid, coarse):
    """A coarse voxel is valid when any voxel of its block is."""
    factors = [s // c for s, c in zip(valid.shape[1:], coarse)]
    out = np.zeros((valid.shape[0], *coarse), bool)
    for n, i, j, k in itertools.product(range(valid.shape[0]), *(range(c) for c in coarse)):
        block = valid[
            n,
            i * factors[0] : (i + 1) * factors[0],
            j * factors[1] : (j + 1) * factors[1],
            k * factors[2] : (k + 1) * factors[2],
        ]
        out[n, i, j, k] = block.any()
    return out


def kl_np(t, s, valid, T, reduction="voxel", t_squared=False):
    """KL(softmax(t/T) || softmax(s/T)) summed over classes, mean over valid voxels; / K per element; x T^2."""
    p, log_p, log_q = softmax_np(t / T), log_softmax_np(t / T), log_softmax_np(s / T)
    kl = (p * (log_p - log_q)).sum(axis=-1)
    loss = kl[valid].mean()
    if reduction == "element":
        loss /= t.shape[-1]
    return loss * T**2 if t_squared else loss


def pmkl_weights_np(t, s, labels, valid):
    onehot = np.eye(t.shape[-1])[labels]
    ce_t = -(onehot * log_softmax_np(t)).sum(-1)
    ce_s = -(onehot * log_softmax_np(s)).sum(-1)
    return np.maximum(ce_s - ce_t, 0.0) * (t.argmax(-1) == labels) * valid


def pmkl_kd_np(t, s, labels, valid, T, floor):
    """PMKL: CE of softmax(t/T) against log(clip(softmax(s/T), floor, 1)), weighted by relu(CE_s - CE_t)[t right]."""
    ce = -(softmax_np(t / T) * np.log(np.clip(softmax_np(s / T), floor, 1.0))).sum(-1)
    w = pmkl_weights_np(t, s, labels, valid)
    return (ce * w).sum() / w.sum()


def contrastive_np(t_emb, s_emb, margin):
    """tf.contrib contrastive_loss over PMKL's pairs: (s_i, t_i) positives, (s_i, t_j != i) negatives."""
    terms = []
    for i, j in itertools.product(range(len(s_emb)), range(len(t_emb))):
        d = np.linalg.norm(s_emb[i] - t_emb[j])
        terms.append(d**2 if i == j else max(margin - d, 0.0) ** 2)
    return np.mean(terms)


def pooled_np(f, valid):
    out = []
    for n in range(f.shape[0]):
        mean = f[n][valid[n]].mean(axis=0)
        out.append(mean / np.linalg.norm(mean))
    return np.stack(out)


def proto_maps_np(f, labels, valid, eps=1e-5):
    """Per sample and class: prototype = mean feature under (label = k) & valid; map = clamped cosine to it."""
    maps = np.zeros((*f.shape[:-1], K))
    counts = np.zeros((f.shape[0], K))
    for n, k in itertools.product(range(f.shape[0]), range(K)):
        mask = (labels[n] == k) & valid[n]
        counts[n, k] = mask.sum()
        proto = f[n][mask].sum(axis=0) / (mask.sum() + eps)
        norms = np.maximum(np.linalg.norm(f[n], axis=-1), eps) * max(np.linalg.norm(proto), eps)
        maps[n, ..., k] = (f[n] @ proto) / norms
    return maps, counts


def proto_loss_np(ft, fs, labels, valid):
    maps_s, counts = proto_maps_np(fs, labels, valid)
    maps_t, _ = proto_maps_np(ft, labels, valid)
    kept = [k for k in range(K) if all(counts[n, k] > 0 for n in range(fs.shape[0]))]
    total = sum(
        ((maps_s[n, ..., k] - maps_t[n, ..., k])[valid[n]] ** 2).sum() for n in range(fs.shape[0]) for k in kept
    )
    return total / (len(kept) * valid.sum())


def gram_np(f, batch):
    """SMU-Net: the (B*C, XYZ) view (PyTorch's (B, C, X, Y, Z) order), F F^T / (B C XYZ); or per sample."""
    n, c = f.shape[0], f.shape[-1]
    rows = np.transpose(f, (0, 4, 1, 2, 3)).reshape(n, c, -1)
    if batch:
        flat = rows.reshape(n * c, -1)
        return flat @ flat.T / flat.size
    return np.stack([r @ r.T / r.size for r in rows])


def style_np(ft, fs, coarse_valid, batch=True):
    w = coarse_valid[..., None]
    gt, gs = gram_np(ft * w, batch), gram_np(fs * w, batch)
    c, xy = fs.shape[-1], fs.shape[1] * fs.shape[2]  # first two spatial axes; the third (axial) left out
    if batch:
        return ((gt - gs) ** 2).sum() / (4 * c**2 * xy**2)
    return np.mean([((a - b) ** 2).sum() / (4 * c**2 * xy**2) for a, b in zip(gt, gs)])


def consistency_np(t, s, valid, background=False):
    pt, ps = softmax_np(t), softmax_np(s)
    channels = range(K) if background else range(1, K)
    return sum(((pt[..., c] - ps[..., c])[valid] ** 2).mean() for c in channels)


# --- ramp and masks ----------------------------------------------------------------------


def test_sigmoid_rampup_values():
    close(sigmoid_rampup(0, 20), math.exp(-5.0))
    close(sigmoid_rampup(10, 20), math.exp(-5.0 * 0.25))
    close(sigmoid_rampup(20, 20), 1.0)
    close(sigmoid_rampup(35, 20), 1.0)  # beyond the length: stays 1
    close(sigmoid_rampup(-3, 20), math.exp(-5.0))  # clipped at 0
    close(sigmoid_rampup(7, 0), 1.0)  # no ramp
    ramp = jax.jit(sigmoid_rampup)
    close(ramp(jnp.int32(5), jnp.float32(20)), math.exp(-5.0 * 0.75**2))


def test_valid_at_is_a_strided_any(data):
    got = np.asarray(valid_at(data["valid"], COARSE))
    np.testing.assert_array_equal(got, valid_at_np(data["valid"], COARSE))
    assert got.all(axis=(1, 2, 3)).sum() == 0 and got.any()  # some coarse blocks are padding, some not
    assert valid_at(data["valid"], SHAPE).shape == (N, *SHAPE)
    with pytest.raises(ValueError):
        valid_at(data["valid"], (3, 3, 4))


# --- output KL ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.5, 10.0])
def test_softened_kl_matches_the_formula(data, temperature):
    t, s, valid = data["teacher"]["logits"], data["student"]["logits"], data["valid"]
    for reduction, t_squared in itertools.product(("voxel", "element"), (False, True)):
        got = softened_kl(f32(t), f32(s), valid, temperature, reduction, t_squared)
        close(got, kl_np(t, s, valid, temperature, reduction, t_squared))
    # the reductions relate as documented
    voxel = float(softened_kl(f32(t), f32(s), valid, temperature))
    close(softened_kl(f32(t), f32(s), valid, temperature, "element"), voxel / K)
    close(softened_kl(f32(t), f32(s), valid, temperature, t_squared=True), voxel * temperature**2)


def test_softened_kl_temperature_softens(data):
    t, s, valid = f32(data["teacher"]["logits"]), f32(data["student"]["logits"]), data["valid"]
    values = [float(softened_kl(t, s, valid, T)) for T in (1.0, 2.0, 10.0)]
    assert values[0] > values[1] > values[2] > 0  # softer distributions are closer
    with pytest.raises(ValueError):
        softened_kl(t, s, valid, 1.0, reduction="sum")


def test_latent_kl_over_counted_bottleneck_voxels(data):
    ft, fs = data["teacher"]["encoder"][-1], data["student"]["encoder"][-1]
    coarse = valid_at_np(data["valid"], COARSE)
    close(latent_kl(f32(ft), f32(fs), data["valid"], 1.0), kl_np(ft, fs, coarse, 1.0))
    close(latent_kl(f32(ft), f32(fs), data["valid"], 3.0), kl_np(ft, fs, coarse, 3.0))


# --- PMKL --------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, floor", [(10.0, 0.005), (1.0, 0.005), (1.0, 0.0), (4.0, 0.05)])
def test_pmkl_kd_matches_the_public_code(data, temperature, floor):
    t, labels, valid = data["teacher"]["logits"], data["labels"], data["valid"]
    s = data["student"]["logits"] * 3.0  # peaked: some softened probabilities fall under the floor at T = 1
    w = pmkl_weights_np(t, s, labels, valid)
    np.testing.assert_allclose(np.asarray(pmkl_voxel_weights(f32(t), f32(s), labels, valid)), w, rtol=1e-5, atol=1e-5)
    assert 0 < (w > 0).sum() < valid.sum()
    got = pmkl_kd_loss(f32(t), f32(s), labels, valid, temperature, floor)
    close(got, pmkl_kd_np(t, s, labels, valid, temperature, floor))


def test_pmkl_floor_matters_when_probabilities_are_small(data):
    t, s, labels, valid = data["teacher"]["logits"], data["student"]["logits"] * 3.0, data["labels"], data["valid"]
    assert (softmax_np(s)[valid] < 0.005).any()
    assert not np.isclose(pmkl_kd_np(t, s, labels, valid, 1.0, 0.005), pmkl_kd_np(t, s, labels, valid, 1.0, 0.0))


def test_pmkl_counts_only_voxels_where_the_teacher_is_right_and_better(data):
    t, s, labels, valid = data["teacher"]["logits"].copy(), data["student"]["logits"], data["labels"], data["valid"]
    t[0, 1, 2] = 4.0 * np.eye(K)[(labels[0, 1, 2] + 1) % K]  # a row of voxels where the teacher is wrong
    onehot = np.eye(K)[labels]
    wrong = (t.argmax(-1) != labels) & valid
    ce_t = -(onehot * log_softmax_np(t)).sum(-1)
    ce_s = -(onehot * log_softmax_np(s)).sum(-1)
    worse = (t.argmax(-1) == labels) & (ce_t >= ce_s) & valid
    counted = (t.argmax(-1) == labels) & (ce_t < ce_s) & valid
    assert wrong.any() and worse.any() and counted.any()
    base = float(pmkl_kd_loss(f32(t), f32(s), labels, valid))
    rng = np.random.default_rng(5)

    # where the teacher is wrong, any student change is ignored
    s_wrong = np.where(wrong[..., None], rng.normal(size=s.shape) * 10, s)
    close(pmkl_kd_loss(f32(t), f32(s_wrong), labels, valid), base)
    # where the teacher is no better, a student that gets better still is ignored
    s_worse = s + 5.0 * onehot * worse[..., None]
    close(pmkl_kd_loss(f32(t), f32(s_worse), labels, valid), base)
    # padding is ignored
    s_pad = np.where(valid[..., None], s, rng.normal(size=s.shape) * 10)
    close(pmkl_kd_loss(f32(t), f32(s_pad), labels, valid), base)
    # a counted voxel matters
    s_counted = np.where(counted[..., None], rng.normal(size=s.shape) * 3, s)
    assert abs(float(pmkl_kd_loss(f32(t), f32(s_counted), labels, valid)) - base) > 1e-4


def test_pmkl_kd_is_zero_when_no_voxel_counts(data):
    s, labels, valid = f32(data["student"]["logits"]), data["labels"], data["valid"]
    wrong_teacher = f32(4.0 * np.eye(K)[(labels + 1) % K])
    value, grad = jax.jit(jax.value_and_grad(lambda x: pmkl_kd_loss(wrong_teacher, x, labels, valid)))(s)
    assert float(value) == 0.0 and np.isfinite(np.asarray(grad)).all()


def test_pmkl_contrastive_pairs(data):
    rng = np.random.default_rng(3)
    contrastive = jax.jit(pmkl_contrastive_loss)
    for n in (1, 3):  # one sample: the positive pair only
        t_emb = rng.normal(size=(n, 5)) * 0.4
        s_emb = rng.normal(size=(n, 5)) * 0.4
        for margin in (1.0, 2.0):
            close(contrastive(f32(t_emb), f32(s_emb), margin), contrastive_np(t_emb, s_emb, margin))
    # pooled, L2-normalised embeddings of the last decoder features (valid voxels only)
    ft, fs, valid = data["teacher"]["decoder"][-1], data["student"]["decoder"][-1], data["valid"]
    pooled = jax.jit(pooled_embedding)
    np.testing.assert_allclose(np.asarray(pooled(f32(fs), valid)), pooled_np(fs, valid), rtol=1e-5, atol=1e-6)
    close(
        contrastive(pooled(f32(ft), valid), pooled(f32(fs), valid), 1.0),
        contrastive_np(pooled_np(ft, valid), pooled_np(fs, valid), 1.0),
    )
    # identical embeddings, far-apart samples: zero, with a finite gradient at d = 0
    far = f32(np.array([[1.0, 0.0], [-1.0, 0.0]]))
    value, grad = jax.jit(jax.value_and_grad(lambda e: pmkl_contrastive_loss(far, e)))(far)
    assert float(value) == 0.0 and np.isfinite(np.asarray(grad)).all()


# --- ProtoKD -----------------------------------------------------------------------------


def test_prototype_maps(data):
    f, labels, valid = data["student"]["decoder"][-1], data["labels"], data["valid"]
    maps, counts = prototype_maps(f32(f), labels, valid)
    ref_maps, ref_counts = proto_maps_np(f, labels, valid)
    np.testing.assert_allclose(np.asarray(maps), ref_maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(counts), ref_counts)
    assert np.abs(ref_maps).max() <= 1.0 + 1e-12


def test_prototype_loss_counts_classes_present_in_every_sample(data):
    ft, fs, valid = data["teacher"]["decoder"][-1], data["student"]["decoder"][-1], data["valid"]
    labels = data["labels"].copy()
    close(prototype_loss(f32(ft), f32(fs), labels, valid), proto_loss_np(ft, fs, labels, valid))
    # ET gone from sample 1's valid voxels (still in sample 0, and in sample 1's padding): ET no longer counts
    labels[1][(labels[1] == 3) & valid[1]] = 2
    assert (labels[1] == 3).any() and (labels[0][valid[0]] == 3).any()
    _, counts = prototype_maps(f32(fs), labels, valid)
    np.testing.assert_array_equal(np.asarray(classes_in_every_sample(counts)), [True, True, True, False])
    close(prototype_loss(f32(ft), f32(fs), labels, valid), proto_loss_np(ft, fs, labels, valid))
    # no class in every sample: 0, not NaN
    only = np.zeros_like(labels)
    only[1] = 1
    assert float(prototype_loss(f32(ft), f32(fs), only, valid)) == 0.0


def test_prototype_loss_uses_each_networks_own_prototypes(data):
    """Scaling or rotating one network's features as a whole leaves its own cosine maps unchanged."""
    fs, labels, valid = data["student"]["decoder"][-1], data["labels"], data["valid"]
    rotation = np.linalg.qr(np.random.default_rng(4).normal(size=(C, C)))[0]
    close(prototype_loss(f32(3.0 * fs @ rotation), f32(fs), labels, valid), 0.0, atol=1e-10)


# --- SMU-Net -----------------------------------------------------------------------------


def test_gram_matrix_views(data):
    f = data["student"]["encoder"][-1]
    np.testing.assert_allclose(np.asarray(gram_matrix(f32(f))), gram_np(f, True), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.asarray(gram_matrix(f32(f), False)), gram_np(f, False), rtol=1e-5, atol=1e-9)
    assert gram_matrix(f32(f)).shape == (N * C, N * C)  # cross-sample blocks, as the code's (B*C, DHW) view
    np.testing.assert_allclose(
        np.asarray(gram_matrix(f32(f[:1]))), np.asarray(gram_matrix(f32(f[:1]), False))[0], rtol=1e-6
    )


def test_style_loss_normalisation(data):
    ft, fs, valid = data["teacher"]["encoder"][-1], data["student"]["encoder"][-1], data["valid"]
    coarse = valid_at_np(valid, COARSE)
    for batch in (True, False):
        close(style_loss(f32(ft), f32(fs), valid, batch), style_np(ft, fs, coarse, batch))
    # the normaliser: 4 C^2 (X Y)^2 with X Y = 2 * 3 here (not 3 * 4 nor 2 * 4)
    ones = np.ones((N, *COARSE), bool)
    flat = np.transpose(fs, (0, 4, 1, 2, 3)).reshape(N * C, -1)
    flat_t = np.transpose(ft, (0, 4, 1, 2, 3)).reshape(N * C, -1)
    g_diff = (flat_t @ flat_t.T - flat @ flat.T) / (N * C * math.prod(COARSE))
    close(style_loss(f32(ft), f32(fs), ones), (g_diff**2).sum() / (4 * C**2 * (2 * 3) ** 2))


def test_content_and_consistency(data):
    t, s, valid = data["teacher"], data["student"], data["valid"]
    coarse = valid_at_np(valid, COARSE)
    diff = (t["encoder"][-1] - s["encoder"][-1]) ** 2
    close(content_loss(f32(t["encoder"][-1]), f32(s["encoder"][-1]), valid), diff[coarse].mean())
    for background in (False, True):
        close(
            consistency_loss(f32(t["logits"]), f32(s["logits"]), valid, background),
            consistency_np(t["logits"], s["logits"], valid, background),
        )


# --- dispatcher --------------------------------------------------------------------------


def expected_parts(kind, data):
    """Every part from the references above, with the public code's constants."""
    t, s, labels, valid = data["teacher"], data["student"], data["labels"], data["valid"]
    coarse = valid_at_np(valid, COARSE)
    if kind == "kdnet":
        return {
            "kl_output": kl_np(t["logits"], s["logits"], valid, 10.0, t_squared=True),
            "kl_latent": kl_np(t["encoder"][-1], s["encoder"][-1], coarse, 1.0),
        }
    if kind == "pmkl":
        return {
            "kd_ce": pmkl_kd_np(t["logits"], s["logits"], labels, valid, 10.0, 0.005),
            "contrastive": contrastive_np(pooled_np(t["decoder"][-1], valid), pooled_np(s["decoder"][-1], valid), 1.0),
        }
    if kind == "protokd":
        return {
            "kl_output": kl_np(t["logits"], s["logits"], valid, 10.0, "element"),
            "prototype": proto_loss_np(t["decoder"][-1], s["decoder"][-1], labels, valid),
        }
    return {
        "content_mse": ((t["encoder"][-1] - s["encoder"][-1]) ** 2)[coarse].mean(),
        "style_gram": style_np(t["encoder"][-1], s["encoder"][-1], coarse),
        "consistency_mse": consistency_np(t["logits"], s["logits"], valid),
    }


WEIGHTS = {  # the public code's weights, written out
    "kdnet": {"kl_output": 1.0, "kl_latent": 1.0},
    "pmkl": {"kd_ce": 0.5, "contrastive": 0.5},
    "protokd": {"kl_output": 10.0, "prototype": 0.1},
    "smunet": {"content_mse": 0.2, "style_gram": 1e-4, "consistency_mse": 10.0},
}


@pytest.mark.parametrize("kind", ["kdnet", "pmkl", "protokd", "smunet"])
def test_dispatcher_totals_are_weighted_sums_of_parts(data, kind):
    ramp = 0.3
    total, parts = distillation_loss(
        kind, f32(data["teacher"]), f32(data["student"]), data["labels"], data["valid"], KDConstants(), ramp
    )
    reference = expected_parts(kind, data)
    assert set(parts) == set(reference) == set(WEIGHTS[kind])
    for name, value in reference.items():
        close(parts[name], value, rtol=2e-5)
    weights = dict(WEIGHTS[kind])
    if kind == "smunet":
        weights["consistency_mse"] *= ramp
    close(total, sum(weights[k] * reference[k] for k in reference), rtol=2e-5)
    close(total, sum(float(part_weights(kind, KDConstants(), ramp)[k]) * float(parts[k]) for k in parts), rtol=1e-6)


def test_dispatcher_none_and_unknown(data):
    total, parts = distillation_loss(
        "none", f32(data["teacher"]), f32(data["student"]), data["labels"], data["valid"], KDConstants()
    )
    assert float(total) == 0.0 and parts == {}
    with pytest.raises(ValueError):
        distillation_loss("hinton", data["teacher"], data["student"], data["labels"], data["valid"], KDConstants())
    assert KD_LOSSES == ("none", "kdnet", "pmkl", "protokd", "smunet")


def test_optional_embedding_and_style_keys(data):
    teacher, student = f32(data["teacher"]), f32(data["student"])
    rng = np.random.default_rng(8)
    t_emb, s_emb = rng.normal(size=(N, 6)), rng.normal(size=(N, 6))
    _, parts = distillation_loss(
        "pmkl",
        {**teacher, "embedding": f32(t_emb)},
        {**student, "embedding": f32(s_emb)},
        data["labels"],
        data["valid"],
        KDConstants(),
    )
    close(parts["contrastive"], contrastive_np(t_emb, s_emb, 1.0))
    t_style, s_style = rng.normal(size=(N, *COARSE, 5)), rng.normal(size=(N, *COARSE, 5))
    _, parts = distillation_loss(
        "smunet",
        {**teacher, "style": f32(t_style)},
        {**student, "style": f32(s_style)},
        data["labels"],
        data["valid"],
        KDConstants(),
    )
    close(parts["style_gram"], style_np(t_style, s_style, valid_at_np(data["valid"], COARSE)))


@pytest.mark.parametrize("kind", ["kdnet", "pmkl", "protokd", "smunet"])
def test_padding_changes_nothing(data, kind):
    """Inputs at padding voxels (and at coarse voxels whose whole block is padding) change no term."""
    valid = data["valid"]
    coarse = valid_at_np(valid, COARSE)
    rng = np.random.default_rng(11)

    def scramble(output):
        def one(x):
            mask = valid if x.shape[1:4] == SHAPE else coarse
            return np.where(mask[..., None], x, rng.normal(size=x.shape) * 5)

        return {k: [one(x) for x in v] if isinstance(v, list) else one(v) for k, v in output.items()}

    labels = np.where(valid, data["labels"], rng.integers(0, K, size=valid.shape))
    base = distillation_loss(kind, f32(data["teacher"]), f32(data["student"]), data["labels"], valid, KDConstants())
    moved = distillation_loss(
        kind, f32(scramble(data["teacher"])), f32(scramble(data["student"])), labels, valid, KDConstants()
    )
    close(moved[0], base[0], rtol=1e-6)
    for name in base[1]:
        close(moved[1][name], base[1][name], rtol=1e-6)


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_jit_grad_and_vmap(data, kind):
    teacher, student, labels, valid = f32(data["teacher"]), f32(data["student"]), data["labels"], data["valid"]

    def loss(student, teacher, ramp):
        return distillation_loss(kind, teacher, student, labels, valid, KDConstants(), ramp)[0]

    value, (grad_student, grad_teacher) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(student, teacher, 0.5)
    close(value, distillation_loss(kind, teacher, student, labels, valid, KDConstants(), 0.5)[0], rtol=1e-6)
    leaves = jax.tree.leaves(grad_student)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert (kind == "none") == all(float(jnp.abs(g).max()) == 0.0 for g in leaves)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grad_teacher))  # the teacher is frozen
    # one student at a time, mapped over a stack of students (as the method does)
    stacked = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x]), student)
    mapped = jax.jit(jax.vmap(loss, in_axes=(0, None, None)))(stacked, teacher, 0.5)
    half = jax.tree.map(lambda x: 0.5 * x, student)
    np.testing.assert_allclose(
        np.asarray(mapped), [float(value), float(loss(half, teacher, 0.5))], rtol=1e-5, atol=1e-7
    )


# --- a region teacher read in the students' label convention --------------------------------------


def test_region_logits_become_nested_label_probabilities():
    """numpy: P(bg) = 1 - wt, P(NCR) = wt tc (1 - et), P(ED) = wt (1 - tc), P(ET) = wt tc et, in the
    internal order (bg, NCR, ED, ET); a distribution for any sigmoids, finite for extreme logits."""
    z = np.random.default_rng(5).normal(size=(2, 3, 4, 5, 3)) * 4
    z[0, 0, 0, 0] = [80.0, -80.0, 80.0]  # extreme logits stay finite
    wt, tc, et = (1 / (1 + np.exp(-z[..., i])) for i in range(3))
    expected = np.stack([1 - wt, wt * tc * (1 - et), wt * (1 - tc), wt * tc * et], axis=-1)
    got = np.asarray(label_logits_from_region_logits(jnp.asarray(z, jnp.float32)))
    assert np.isfinite(got).all()
    probs = np.asarray(jax.nn.softmax(got, axis=-1))
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, rtol=1e-5)  # already normalised log-probabilities
    # thresholded nested regions give the label a region network's evaluation gives
    nested = np.array([[9.0, -9.0, -9.0], [9.0, 9.0, -9.0], [9.0, 9.0, 9.0], [-9.0, -9.0, -9.0]])
    assert np.argmax(np.asarray(label_logits_from_region_logits(jnp.asarray(nested))), -1).tolist() == [2, 1, 3, 0]
