"""RIRN's relation (CRR, CAR) and adversarial losses against numpy references from the paper's equations.

The references are plain float64 numpy, written from eqs. 2-8 of the paper
(loops over samples and region pairs), and call nothing of jaxbrats. The
data are tiny: N = 2 samples of 4^3 voxels, C = 5 channels, R = 3 regions
(WT, TC, ET), so the whole file runs in seconds on a CPU.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbrats.losses.adversarial import discriminator_loss, student_adversarial_loss
from jaxbrats.losses.relation import (
    car_loss,
    car_matrix,
    car_memory_bytes,
    crr_loss,
    region_centres,
    region_masks,
    resize_to_features,
)

N, S, C, R, C_EMBED = 2, 4, 5, 3, 3
RTOL, ATOL = 1e-5, 1e-7


# --- data ------------------------------------------------------------------------------


def gt_regions_of(labels):
    """WT = {1, 2, 3}, TC = {1, 3}, ET = {3}, stacked last; float64."""
    return np.stack([labels > 0, (labels == 1) | (labels == 3), labels == 3], axis=-1).astype(np.float64)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(N, S, S, S))
    return {
        "labels": labels,
        "gt": gt_regions_of(labels),
        "probs": rng.uniform(size=(N, S, S, S, R)),
        "teacher": rng.normal(size=(N, S, S, S, C)),
        "student": rng.normal(size=(N, S, S, S, C)),
        "theta": {"kernel": rng.normal(size=(C, C_EMBED)) * 0.5, "bias": rng.normal(size=C_EMBED) * 0.1},
        "phi": {"kernel": rng.normal(size=(C, C_EMBED)) * 0.5, "bias": rng.normal(size=C_EMBED) * 0.1},
    }


def f32(x):
    return jnp.asarray(x, jnp.float32)


def params32(p):
    return {k: f32(v) for k, v in p.items()}


# --- numpy references (float64, from the equations) ------------------------------------


def masks_reference(probs, gt, filtered, lam=0.5):
    """Eq. 3: M = 1(P > lambda) AND GT; without manual filtering M = GT."""
    inside = gt > 0.5
    return (inside & (probs > lam) if filtered else inside).astype(np.float64)


def crr_reference(teacher, student, masks):
    """Eqs. 2, 4, 5 per sample, summed over ordered pairs i != j of present regions, then averaged."""
    losses = []
    for n in range(teacher.shape[0]):
        graphs = []
        for f in (teacher[n], student[n]):
            centres = {}
            for r in range(masks.shape[-1]):
                m = masks[n, ..., r]
                if m.sum() > 0:  # an empty region has no centre
                    centres[r] = (f * m[..., None]).sum(axis=(0, 1, 2)) / m.sum()
            graphs.append(
                {
                    (i, j): centres[i] @ centres[j] / (np.linalg.norm(centres[i]) * np.linalg.norm(centres[j]))
                    for i, j in itertools.permutations(centres, 2)
                }
            )
        losses.append(sum(abs(graphs[0][pair] - graphs[1][pair]) for pair in graphs[0]))
    return float(np.mean(losses))


def softmax_reference(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def car_reference_matrix(f, theta, phi, axis):
    """Eq. 6 for one sample: softmax over j (keys) or i (queries) of theta(f_i) . phi(f_j)."""
    flat = f.reshape(-1, f.shape[-1])
    logits = (flat @ theta["kernel"] + theta["bias"]) @ (flat @ phi["kernel"] + phi["bias"]).T
    return softmax_reference(logits, axis=1 if axis == "keys" else 0)


def car_reference(teacher, student, theta, phi, axis):
    """Eq. 7: ||A_T - A_S||^2 / (C H W D) per sample, averaged; C of the feature map."""
    losses = []
    for n in range(teacher.shape[0]):
        a_t = car_reference_matrix(teacher[n], theta, phi, axis)
        a_s = car_reference_matrix(student[n], theta, phi, axis)
        losses.append(np.sum((a_t - a_s) ** 2) / (teacher.shape[-1] * np.prod(teacher.shape[1:4])))
    return float(np.mean(losses))


def log_sigmoid_reference(z):
    """log(1 / (1 + e^-z)) = -log(1 + e^-z), with logaddexp so |z| = 50 stays exact."""
    return -np.logaddexp(0.0, -np.asarray(z, np.float64))


def eq8_reference(z_teacher, z_student):
    """Eq. 8 with the paper's D as "from the student", D_p = 1 - sigmoid(z): log(1 - D_p(T)) + log D_p(S)."""
    log_d_teacher = log_sigmoid_reference(z_teacher)  # log(1 - D_p(T)) = log sigmoid(z_T)
    log_d_student = log_sigmoid_reference(-np.asarray(z_student, np.float64))  # log D_p(S) = log sigmoid(-z_S)
    return float(np.mean(log_d_teacher) + np.mean(log_d_student))


# --- masks and resizing ----------------------------------------------------------------


def test_region_masks_with_and_without_filtering(data):
    for filtered in (True, False):
        got = region_masks(f32(data["probs"]), f32(data["gt"]), filtered=filtered)
        assert got.dtype == jnp.float32 and got.shape == (N, S, S, S, R)
        np.testing.assert_array_equal(np.asarray(got), masks_reference(data["probs"], data["gt"], filtered))
    # Filtering removes the ground-truth voxels the teacher misses.
    assert masks_reference(data["probs"], data["gt"], True).sum() < data["gt"].sum()


def test_resize_to_features_samples_a_coarser_grid():
    fine = np.random.default_rng(1).integers(0, 2, size=(N, 8, 8, 8, R)).astype(np.float32)
    target, strides = (4, 2, 8), (2, 4, 1)
    expected = np.zeros((N, *target, R), np.float32)
    for i, j, k in itertools.product(*(range(t) for t in target)):
        expected[:, i, j, k] = fine[:, i * strides[0], j * strides[1], k * strides[2]]
    got = np.asarray(resize_to_features(jnp.asarray(fine), target))
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, fine[:, 1::2, 2::4, ::1])  # another sampling phase differs
    assert resize_to_features(fine, (8, 8, 8)) is fine
    with pytest.raises(ValueError):
        resize_to_features(fine, (3, 8, 8))
    with pytest.raises(ValueError):
        resize_to_features(fine, (16, 8, 8))


# --- CRR --------------------------------------------------------------------------------


@pytest.mark.parametrize("filtered", [True, False])
def test_crr_loss_matches_reference(data, filtered):
    masks = masks_reference(data["probs"], data["gt"], filtered)
    loss, parts = crr_loss(f32(data["teacher"]), f32(data["student"]), f32(masks))
    np.testing.assert_allclose(float(loss), crr_reference(data["teacher"], data["student"], masks), rtol=RTOL)
    assert float(parts["crr"]) == float(loss) and float(parts["crr_pairs"]) == 6.0
    other = masks_reference(data["probs"], data["gt"], not filtered)
    assert abs(crr_reference(data["teacher"], data["student"], other) - float(loss)) > 1e-3


def test_region_centres_mark_absent_regions(data):
    masks = masks_reference(data["probs"], data["gt"], True)
    masks[1, ..., 2] = 0
    centres, present = region_centres(f32(data["teacher"]), f32(masks))
    np.testing.assert_array_equal(np.asarray(present), [[True] * 3, [True, True, False]])
    np.testing.assert_array_equal(np.asarray(centres[1, 2]), 0.0)
    m = masks[0, ..., 1]
    expected = (data["teacher"][0] * m[..., None]).sum(axis=(0, 1, 2)) / m.sum()
    np.testing.assert_allclose(np.asarray(centres[0, 1]), expected, rtol=RTOL, atol=1e-6)


def test_crr_loss_skips_pairs_with_an_empty_region(data):
    labels = data["labels"].copy()
    labels[1][labels[1] == 3] = 1  # sample 1 has no enhancing tumour: ET empty
    masks = masks_reference(data["probs"], gt_regions_of(labels), True)
    assert masks[1, ..., 2].sum() == 0 and masks[0, ..., 2].sum() > 0

    def loss_of(student):
        return crr_loss(f32(data["teacher"]), student, f32(masks))[0]

    loss, parts = crr_loss(f32(data["teacher"]), f32(data["student"]), f32(masks))
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), crr_reference(data["teacher"], data["student"], masks), rtol=RTOL)
    assert float(parts["crr_pairs"]) == (6 + 2) / 2  # sample 1 keeps only WT-TC and TC-WT
    grad = np.asarray(jax.grad(loss_of)(f32(data["student"])))
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_crr_loss_is_zero_without_regions(data):
    masks = jnp.zeros((N, S, S, S, R), jnp.float32)
    loss, parts = crr_loss(f32(data["teacher"]), f32(data["student"]), masks)
    assert float(loss) == 0.0 and float(parts["crr_pairs"]) == 0.0
    grad = jax.grad(lambda s: crr_loss(f32(data["teacher"]), s, masks)[0])(f32(data["student"]))
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


# --- CAR --------------------------------------------------------------------------------


def test_car_matrix_is_normalised_along_the_chosen_axis(data):
    theta, phi = params32(data["theta"]), params32(data["phi"])
    keys = np.asarray(car_matrix(f32(data["teacher"]), theta, phi, axis="keys"))
    queries = np.asarray(car_matrix(f32(data["teacher"]), theta, phi, axis="queries"))
    assert keys.shape == (N, S**3, S**3) and keys.dtype == np.float32
    np.testing.assert_allclose(keys.sum(axis=2), 1.0, rtol=1e-5)
    np.testing.assert_allclose(queries.sum(axis=1), 1.0, rtol=1e-5)
    assert np.max(np.abs(keys.sum(axis=1) - 1.0)) > 1e-2  # the other axis is not normalised
    np.testing.assert_allclose(
        keys[0], car_reference_matrix(data["teacher"][0], data["theta"], data["phi"], "keys"), rtol=1e-4, atol=1e-7
    )


@pytest.mark.parametrize("axis", ["keys", "queries"])
def test_car_loss_matches_reference(data, axis):
    theta, phi = params32(data["theta"]), params32(data["phi"])
    loss, parts = car_loss(f32(data["teacher"]), f32(data["student"]), theta, phi, axis=axis)
    expected = car_reference(data["teacher"], data["student"], data["theta"], data["phi"], axis)
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL)
    assert float(parts["car"]) == float(loss)
    other = car_reference(
        data["teacher"], data["student"], data["theta"], data["phi"], "queries" if axis == "keys" else "keys"
    )
    assert abs(other - expected) > 1e-3 * expected


def test_car_loss_of_identical_features_is_zero(data):
    theta, phi = params32(data["theta"]), params32(data["phi"])
    loss, _ = car_loss(f32(data["teacher"]), f32(data["teacher"]), theta, phi)
    assert float(loss) == 0.0
    assert float(car_loss(f32(data["teacher"]), f32(data["student"]), theta, phi)[0]) > 0.0


def test_car_memory_bytes():
    assert car_memory_bytes((20, 24, 16)) == (20 * 24 * 16) ** 2 * 4
    assert car_memory_bytes((4, 4, 4), batch=2, dtype_bytes=2) == 64 * 64 * 2 * 2


# --- the teacher learns from Dice only --------------------------------------------------


def test_teacher_gets_no_gradient(data):
    teacher, student = f32(data["teacher"]), f32(data["student"])
    masks = f32(masks_reference(data["probs"], data["gt"], True))
    theta, phi = params32(data["theta"]), params32(data["phi"])
    losses = {
        "crr": lambda t, s: crr_loss(t, s, masks)[0],
        "car": lambda t, s: car_loss(t, s, theta, phi)[0],
    }
    for name, fn in losses.items():
        grad_teacher, grad_student = jax.grad(fn, argnums=(0, 1))(teacher, student)
        np.testing.assert_array_equal(np.asarray(grad_teacher), 0.0, err_msg=name)
        assert np.any(np.asarray(grad_student) != 0), name


# --- adversarial ------------------------------------------------------------------------


def test_discriminator_loss_matches_reference():
    rng = np.random.default_rng(2)
    z_teacher, z_student = rng.normal(size=(N, 2, 3, 2, 1)) * 2, rng.normal(size=(N, 2, 3, 2, 1)) * 2
    loss, parts = discriminator_loss(f32(z_teacher), f32(z_student))
    # BCE with teacher label 1 and student label 0, written with sigmoid and log.
    d_teacher, d_student = 1 / (1 + np.exp(-z_teacher)), 1 / (1 + np.exp(-z_student))
    bce = -np.mean(np.log(d_teacher)) - np.mean(np.log(1 - d_student))
    np.testing.assert_allclose(float(loss), bce, rtol=RTOL)
    np.testing.assert_allclose(float(loss), -eq8_reference(z_teacher, z_student), rtol=RTOL)  # = -(eq. 8)
    np.testing.assert_allclose(float(parts["d_teacher"]), d_teacher.mean(), rtol=RTOL)
    np.testing.assert_allclose(float(parts["d_student"]), d_student.mean(), rtol=RTOL)
    assert float(parts["adv_d"]) == float(loss)
    # Eq. 8 minimised as written is another, unbounded value.
    literal = np.mean(np.log(1 - d_teacher)) + np.mean(np.log(d_student))
    assert abs(literal - float(loss)) > 1e-2
    # Minimising drives D(T) up and D(S) down.
    grad_fn = jax.grad(lambda t, s: discriminator_loss(t, s)[0], argnums=(0, 1))
    g_teacher, g_student = grad_fn(f32(z_teacher), f32(z_student))
    assert np.all(np.asarray(g_teacher) < 0) and np.all(np.asarray(g_student) > 0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_adversarial_losses_stay_finite_at_large_logits(sign):
    z_teacher = np.full((N, 2, 2, 2, 1), 50.0 * sign)
    z_student = -z_teacher
    loss, parts = discriminator_loss(f32(z_teacher), f32(z_student))
    expected = -np.mean(log_sigmoid_reference(z_teacher)) - np.mean(log_sigmoid_reference(-z_student))
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL, atol=1e-20)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in parts.values())
    s_loss, _ = student_adversarial_loss(f32(z_student))
    np.testing.assert_allclose(float(s_loss), -np.mean(log_sigmoid_reference(z_student)), rtol=RTOL, atol=1e-20)
    grads = jax.grad(lambda t, s: discriminator_loss(t, s)[0] + student_adversarial_loss(s)[0], argnums=(0, 1))(
        f32(z_teacher), f32(z_student)
    )
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_student_adversarial_loss_is_non_saturating():
    rng = np.random.default_rng(3)
    z_student = rng.normal(size=(N, 2, 3, 2, 1)) * 2
    loss, parts = student_adversarial_loss(f32(z_student))
    np.testing.assert_allclose(float(loss), -np.mean(np.log(1 / (1 + np.exp(-z_student)))), rtol=RTOL)
    assert float(parts["adv_s"]) == float(loss)
    # While D firmly rejects the student's output (z_S = -50), the gradient stays at about -1 per position,
    # where the saturating log(1 - D(S)) would give about -e^-50.
    z = f32(np.full((4,), -50.0))
    np.testing.assert_allclose(np.asarray(jax.grad(lambda s: student_adversarial_loss(s)[0])(z)), -0.25, rtol=1e-6)
