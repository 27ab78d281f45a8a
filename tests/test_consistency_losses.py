"""ACDIS's feature losses (`losses.consistency`) against numpy written from the paper's equations.

The references are float64 numpy with explicit loops over the windows and
call nothing of jaxbrats: sigmoid first, then per window the means, the
unbiased (1/(n-1), eq. 2) variances and covariance, eqs. 1 and 3 with
eps = 1e-6 and |cov|. Windows start every `stride` voxels along an axis, and
one more ends at the far edge where those leave voxels out. Data are tiny:
M = 2 modalities, N = 2 samples of 8 x 8 x 6 voxels, C = 3 channels (6 is not
a multiple of 4, so the last axis needs the edge window; with a window of 8 it
shrinks to the axis).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbrats.losses.consistency import (
    DISTILLATION_LOSSES,
    SYNTHESIS_NORMS,
    acct_loss,
    consistency_distillation,
    feature_kl,
    feature_mse,
    synthesis_loss,
    window_moments,
)

M, N, SHAPE, C = 2, 2, (8, 8, 6), 3
EPS = 1e-6
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture
def pair():
    """Features (M, N, D, H, W, C) and a target (N, D, H, W, C) of another scale (no leading axis)."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(M, N, *SHAPE, C)).astype(np.float32)
    target = (rng.normal(size=(N, *SHAPE, C)) * 2.5 + 0.5).astype(np.float32)
    return features, target


# --- numpy references (float64) --------------------------------------------------------


def sigmoid_np(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def moments_np(x, y, window, stride, pooled):
    """(var_x, var_y, cov) per window, (..., N, d, h, w, C or 1), by explicit loops (eq. 2)."""
    x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
    sizes = [min(window, s) for s in x.shape[-4:-1]]
    starts = []
    for s, w in zip(x.shape[-4:-1], sizes):
        axis = list(range(0, s - w + 1, stride))
        if axis[-1] + w < s:  # the voxels past the last window: one more window ends at the edge
            axis.append(s - w)
        starts.append(axis)
    channels = [slice(None)] if pooled else [slice(c, c + 1) for c in range(x.shape[-1])]
    out = np.zeros((3, *x.shape[:-4], *(len(r) for r in starts), len(channels)))
    for lead in np.ndindex(*x.shape[:-4]):
        for (a, i), (b, j), (c, k) in itertools.product(*(enumerate(r) for r in starts)):
            box = (*lead, slice(i, i + sizes[0]), slice(j, j + sizes[1]), slice(k, k + sizes[2]))
            for ch, sl in enumerate(channels):
                u, v = x[(*box, sl)].ravel(), y[(*box, sl)].ravel()
                n = u.size
                du, dv = u - u.mean(), v - v.mean()
                out[(slice(None), *lead, a, b, c, ch)] = [
                    (du * du).sum() / (n - 1),
                    (dv * dv).sum() / (n - 1),
                    (du * dv).sum() / (n - 1),
                ]
    return out


def acct_np(features, target, window, stride, pooled, normalise=True):
    """Eqs. 1 and 3 per window (and channel), mean over samples, windows and channels."""
    if normalise:
        features, target = sigmoid_np(features), sigmoid_np(target)
    var_m, var_aux, cov = moments_np(features, target, window, stride, pooled)
    s_m, s_aux = np.sqrt(var_m), np.sqrt(var_aux)
    l_var = 1 - (2 * s_m * s_aux + EPS) / (s_m**2 + s_aux**2 + EPS)
    l_covar = 1 - (np.abs(cov) + EPS) / (s_m * s_aux + EPS)
    axes = (-5, -4, -3, -2, -1)
    return l_var.mean(axis=axes), l_covar.mean(axis=axes)


def close(got, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got), expected, rtol=rtol, atol=atol)


# --- window moments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "window, stride, pooled",
    [
        (4, 4, False),  # tiling along D, H; the last axis: windows at 0 and 2 (voxels 4-5 covered)
        (4, 4, True),
        (4, 2, False),  # overlapping windows
        (3, 2, True),  # 8 voxels: starts 0, 2, 4 and the edge window at 5
        (3, 3, False),  # 8 voxels: starts 0, 3 and the edge window at 5; 6 voxels: 0, 3 (tiled)
        (8, 8, False),  # shrinks to 6 along the last axis: one window per sample
    ],
)
def test_window_moments_against_numpy(pair, window, stride, pooled):
    features, target = pair
    x, y = sigmoid_np(features).astype(np.float32), sigmoid_np(target).astype(np.float32)
    got = window_moments(x, y, window, stride, pooled)
    expected = moments_np(x, y, window, stride, pooled)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == jnp.float32
        close(g, e, atol=1e-7)


def test_a_spatial_axis_shorter_than_the_window_keeps_one_window():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2, 2, 3, 5, C)), rng.normal(size=(2, 2, 3, 5, C))
    var_x, _, cov = window_moments(x.astype(np.float32), y.astype(np.float32), 4, 1, False)
    assert var_x.shape == (2, 1, 1, 2, C)  # 2 x 3 x 4 windows, two of them along the last axis
    expected = moments_np(x, y, 4, 1, False)
    close(var_x, expected[0])
    close(cov, expected[2], atol=1e-6)
    # the first window by hand: all of D and H, voxels 0-3 along W, unbiased over 2*3*4 = 24 voxels
    u = x[0, :, :, 0:4, 1].ravel()
    close(var_x[0, 0, 0, 0, 1], u.var(ddof=1))


def test_every_voxel_is_in_a_window():
    """The bottleneck of an 80^3 crop is 10^3: windows of 4 at 0 and 4 leave voxels 8-9 out unless
    a window ends at the edge. ACCT's gradient must reach the last voxel, and every voxel."""
    rng = np.random.default_rng(4)
    features = rng.normal(size=(1, 10, 10, 10, 2)).astype(np.float32)
    target = rng.normal(size=(1, 10, 10, 10, 2)).astype(np.float32)
    for window, stride, pooled in ((4, 4, False), (3, 2, True)):  # windows at 0, 4, 6; at 0, 2, 4, 6, 7

        def total(f):
            return sum(jnp.sum(v) for v in acct_loss(f, target, window, stride, pooled).values())

        grad = jax.jit(jax.grad(total))(jnp.asarray(features))
        assert float(jnp.abs(grad[0, 9, 9, 9]).min()) > 0.0  # the last voxel, every channel
        assert float(jnp.abs(grad).sum(axis=-1).min()) > 0.0  # every voxel
        l_var, l_covar = acct_np(features, target, window, stride, pooled)
        parts = acct_loss(features, target, window, stride, pooled)
        close(parts["var"], l_var)
        close(parts["covar"], l_covar)
    var_x, _, _ = window_moments(features, target, 4, 4, False)
    assert var_x.shape == (1, 3, 3, 3, 2)
    with pytest.raises(ValueError, match="every voxel is in a window"):
        window_moments(features, target, 2, 3, False)  # gaps between windows


# --- ACCT --------------------------------------------------------------------------------


@pytest.mark.parametrize("window, stride, pooled", [(4, None, False), (4, None, True), (4, 2, False), (3, 2, True)])
def test_acct_against_numpy(pair, window, stride, pooled):
    features, target = pair
    got = acct_loss(features, target, window, stride, pooled)
    l_var, l_covar = acct_np(features, target, window, window if stride is None else stride, pooled)
    assert got["var"].shape == got["covar"].shape == (M,)
    close(got["var"], l_var)
    close(got["covar"], l_covar)
    assert (np.asarray(got["var"]) > 0.01).all() and (np.asarray(got["covar"]) > 0.01).all()  # not trivially 0


def test_acct_per_channel_and_pooled_differ(pair):
    features, target = pair
    per_channel = acct_loss(features, target, 4, pooled=False)
    pooled = acct_loss(features, target, 4, pooled=True)
    assert np.abs(np.asarray(per_channel["covar"]) - np.asarray(pooled["covar"])).min() > 1e-3


def test_acct_without_the_sigmoid(pair):
    features, target = pair
    got = acct_loss(features, target, 4, normalise=False)
    l_var, l_covar = acct_np(features, target, 4, 4, False, normalise=False)
    close(got["var"], l_var)
    close(got["covar"], l_covar)


def test_acct_is_zero_for_the_target_itself_and_for_its_reversal(pair):
    _, target = pair
    same = acct_loss(target, target, 4)
    close(same["var"], 0.0, atol=1e-6)
    close(same["covar"], 0.0, atol=1e-6)
    # sigmoid(-t) = 1 - sigmoid(t): the same variances and the covariance's sign flipped.
    # |cov| = s_m s_aux, so the reversed trend (FLAIR against T1ce) costs nothing.
    reversed_ = acct_loss(-target, target, 4)
    close(reversed_["var"], 0.0, atol=1e-6)
    close(reversed_["covar"], 0.0, atol=1e-6)
    _, _, cov = window_moments(
        sigmoid_np(-target).astype(np.float32), sigmoid_np(target).astype(np.float32), 4, 4, False
    )
    assert (np.asarray(cov) < 0).all()


def test_the_target_is_fixed(pair):
    features, target = jnp.asarray(pair[0]), jnp.asarray(pair[1])
    losses = {
        "var": lambda f, t: jnp.sum(acct_loss(f, t, 4)["var"]),
        "covar": lambda f, t: jnp.sum(acct_loss(f, t, 4)["covar"]),
        "mse": lambda f, t: jnp.sum(feature_mse(f, t)),
        "kl": lambda f, t: jnp.sum(feature_kl(f, t)),
    }
    for loss in losses.values():
        d_features, d_target = jax.grad(loss, argnums=(0, 1))(features, target)
        assert float(jnp.abs(d_target).max()) == 0.0
        assert float(jnp.abs(d_features).max()) > 0


def test_a_constant_window_has_finite_losses_and_gradients(pair):
    features, target = pair
    features, target = features.copy(), np.broadcast_to(target, features.shape).copy()
    features[:, 0, :4, :4, :4] = 0.3  # one window per modality constant (crop padding)
    target[:, 0, :4, :4, :4] = -1.0  # ... in the target too
    features[:, 1, :4, :4, :4] = 0.3  # and one constant in the features only

    def total(f, pooled):
        return sum(jnp.sum(v) for v in acct_loss(f, target, 4, pooled=pooled).values())

    for pooled in (False, True):
        parts = acct_loss(jnp.asarray(features), target, 4, pooled=pooled)
        assert all(np.isfinite(np.asarray(v)).all() for v in parts.values())
        grad = jax.grad(total)(jnp.asarray(features), pooled)
        assert np.isfinite(np.asarray(grad)).all()
        assert float(jnp.abs(grad).max()) > 0
    # everything constant: no variance anywhere, both terms 0 and a zero gradient
    flat = jnp.full((M, N, *SHAPE, C), 0.3)
    parts = acct_loss(flat, jnp.full((N, *SHAPE, C), -1.0), 4)
    close(parts["var"], 0.0, atol=1e-6)
    close(parts["covar"], 0.0, atol=1e-6)
    grad = jax.grad(lambda f: sum(jnp.sum(v) for v in acct_loss(f, -jnp.ones_like(f), 4).values()))(flat)
    assert float(jnp.abs(grad).max()) == 0.0


# --- Table 2's alternatives ------------------------------------------------------------


def test_feature_mse_against_numpy(pair):
    features, target = pair
    expected = ((sigmoid_np(features) - sigmoid_np(target)) ** 2).reshape(M, -1).mean(axis=1)
    close(feature_mse(features, target), expected)
    raw = ((features.astype(np.float64) - target) ** 2).reshape(M, -1).mean(axis=1)
    close(feature_mse(features, target, normalise=False), raw)


def test_feature_kl_against_numpy(pair):
    features, target = pair
    expected = np.zeros(M)
    for m in range(M):
        total = 0.0
        for voxel in np.ndindex(N, *SHAPE):
            t, f = target[voxel].astype(np.float64), features[m][voxel].astype(np.float64)
            p, q = np.exp(t) / np.exp(t).sum(), np.exp(f) / np.exp(f).sum()
            total += (p * np.log(p / q)).sum()
        expected[m] = total / (N * np.prod(SHAPE))
    close(feature_kl(features, target), expected)
    close(feature_kl(target, target), 0.0, atol=1e-6)


# --- synthesis (eq. 10) ---------------------------------------------------------------------


@pytest.fixture
def synthesis():
    rng = np.random.default_rng(2)
    synthesised = rng.normal(size=(M + 1, N, *SHAPE, C)).astype(np.float32)
    target = rng.normal(size=(M + 1, N, *SHAPE, C)).astype(np.float32)
    weight = np.array([[True, False], [False, False], [True, True]])  # the missing (modality, sample) pairs
    return synthesised, target, weight


def synthesis_np(synthesised, target, weight, norm):
    per_pair, counted = [], 0
    for m, n in np.ndindex(*weight.shape):
        if weight[m, n]:
            err = (synthesised[m, n].astype(np.float64) - target[m, n]).ravel()
            per_pair.append((err**2).sum() if norm == "mse" else np.sqrt((err**2).sum()))
            counted += err.size if norm == "mse" else 1
    return sum(per_pair) / max(counted, 1)


@pytest.mark.parametrize("norm", SYNTHESIS_NORMS)
def test_synthesis_loss_against_numpy(synthesis, norm):
    synthesised, target, weight = synthesis
    expected = synthesis_np(synthesised, target, weight, norm)
    close(synthesis_loss(synthesised, target, weight, norm), expected)
    close(synthesis_loss(synthesised, target, weight.astype(np.float32), norm), expected)
    # an available (not counted) pair's synthesis does not matter
    changed = synthesised.copy()
    changed[1] += 10.0
    close(synthesis_loss(changed, target, weight, norm), expected)


@pytest.mark.parametrize("norm", SYNTHESIS_NORMS)
def test_synthesis_loss_without_missing_pairs_or_errors(synthesis, norm):
    synthesised, target, weight = synthesis
    none = np.zeros_like(weight)
    assert float(synthesis_loss(synthesised, target, none, norm)) == 0.0
    grad = jax.grad(lambda s: synthesis_loss(s, target, none, norm))(jnp.asarray(synthesised))
    assert float(jnp.abs(grad).max()) == 0.0
    # a perfect synthesis: 0, with a finite (zero) gradient through the L2 norm's sqrt
    grad = jax.grad(lambda s: synthesis_loss(s, target, weight, norm))(jnp.asarray(target))
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) == 0.0
    with pytest.raises(ValueError):
        synthesis_loss(synthesised, target, weight, "l1")


@pytest.mark.parametrize("norm", SYNTHESIS_NORMS)
def test_synthesis_target_gets_a_gradient_unless_stopped(synthesis, norm):
    """Eq. 12 is a plain sum: the full-modality feature gets L_syn's gradient (the opposite of the
    synthesis's: the loss reads their difference); `stop_target` makes it a fixed label."""
    synthesised, target, weight = synthesis
    s, t = jnp.asarray(synthesised), jnp.asarray(target)
    d_synth, d_target = jax.grad(lambda s, t: synthesis_loss(s, t, weight, norm), argnums=(0, 1))(s, t)
    assert float(jnp.abs(d_target).max()) > 0.0
    close(d_target, -np.asarray(d_synth), atol=1e-8)
    # the gradient in numpy: d/ds of the counted squared errors (mse) or of each pair's norm (l2)
    err = synthesised.astype(np.float64) - target
    pairs = weight[..., None, None, None, None]
    if norm == "mse":
        expected = 2 * err * pairs / (weight.sum() * err[0, 0].size)
    else:
        expected = err * pairs / np.sqrt((err**2).sum(axis=(2, 3, 4, 5), keepdims=True)) / weight.sum()
    close(d_synth, expected, atol=1e-7)
    stopped = jax.grad(lambda t: synthesis_loss(s, t, weight, norm, stop_target=True))(t)
    assert float(jnp.abs(stopped).max()) == 0.0
    close(synthesis_loss(s, t, weight, norm, stop_target=True), synthesis_np(synthesised, target, weight, norm))


def test_acct_target_can_learn_for_the_synthesis_terms(pair):
    features, target = jnp.asarray(pair[0]), jnp.asarray(pair[1])
    fixed = jax.grad(lambda t: jnp.sum(acct_loss(features, t, 4)["covar"]))(target)
    free = jax.grad(lambda t: jnp.sum(acct_loss(features, t, 4, stop_target=False)["covar"]))(target)
    assert float(jnp.abs(fixed).max()) == 0.0 and float(jnp.abs(free).max()) > 0.0
    close(acct_loss(features, target, 4, stop_target=False)["covar"], acct_np(pair[0], pair[1], 4, 4, False)[1])


# --- the dispatcher --------------------------------------------------------------------


def test_the_dispatcher(pair):
    features, target = pair
    assert DISTILLATION_LOSSES == ("none", "mse", "kl", "var", "covar", "acct")
    both = acct_loss(features, target, 4, 2, True)
    expected = {
        "none": ({}, np.zeros(M)),
        "mse": ({"mse": feature_mse(features, target)}, None),
        "kl": ({"kl": feature_kl(features, target)}, None),
        "var": ({"var": both["var"]}, None),
        "covar": ({"covar": both["covar"]}, None),
        "acct": (both, np.asarray(both["var"]) + np.asarray(both["covar"])),  # eq. 4
    }
    run = jax.jit(consistency_distillation, static_argnames=("name", "window", "stride", "pooled"))
    for name in DISTILLATION_LOSSES:
        loss, parts = run(name, features, target, window=4, stride=2, pooled=True)
        want_parts, want_loss = expected[name]
        assert set(parts) == set(want_parts) and loss.shape == (M,)
        for key in parts:
            close(parts[key], want_parts[key])
        close(loss, sum(np.asarray(v) for v in want_parts.values()) if want_loss is None else want_loss)
    with pytest.raises(ValueError):
        consistency_distillation("ssim", features, target, 4, None, False)
