"""One case segmented through a modality mask: the one segmentation evaluation and prediction share.

`segment` serves the evaluation (`evaluation.program.evaluate`, for each of the
15 subsets) and `jaxbrats predict` (`inference.predict.predict_case`, for the
subset of the modalities a case has): the case padded at the end,
`Method.fill` on the whole padded image, sliding windows
(`inference.windows.sliding_window`), decoding (`decode`), optional ET
post-processing (`postprocess_et`). `segment_subsets` is the same for several
subsets at once, for a method whose windows' features are shared by every
subset (`Method.window_features`): each window is encoded once. The window grid is that of the case's own
extent (data: the ``extent`` of `inference.windows.sliding_window`), not of the
padded shape, so a case's labels do not depend on the other cases of an
evaluation (whose largest sets its bucket), and predict of a case (padded by
`pad_shape`, a program of its own) equals its evaluation's labels for the
subset of the modalities it has, still with one compilation per evaluation.
With ``eval.tta = "flips"`` every window's scores are the mean over its 8 mirror
images (`mirrored`), before the blend; `fill` has already run on the whole case.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbrats.config import EvalConfig
from jaxbrats.inference.windows import SlidingWindowConfig, sliding_window, sliding_window_stack
from jaxbrats.labels import ENHANCING, NECROSIS, REGIONS, labels_by_argmax, labels_from_regions
from jaxbrats.methods.base import Method
from jaxbrats.modalities import FULL_SUBSET_INDEX
from jaxbrats.runtime.sharding import split_windows


def sliding_config(cfg: EvalConfig) -> SlidingWindowConfig:
    return SlidingWindowConfig(window=cfg.window, overlap=cfg.overlap, blend=cfg.blend, batch=cfg.window_batch)


def postprocess_et(labels, min_voxels: int, xp=jnp):
    """Relabel ET to necrosis when the predicted ET has fewer than `min_voxels` voxels (nnU-Net)."""
    small = xp.sum(labels == ENHANCING) < min_voxels
    return xp.where(small & (labels == ENHANCING), NECROSIS, labels).astype(labels.dtype)


def case_locator(shape, box_start) -> dict:
    """Where a (padded) case is, as data for `Method.fill`: its extent, and its corner in the source grid."""
    return {"shape": np.asarray(shape, np.int32), "box_start": np.asarray(box_start, np.int32)}


def segment(method, models, image, modality_mask, cfg: EvalConfig, valid=None, case=None, subset=None):
    """Internal labels (D, H, W) of one case (D, H, W, 4) seen through `modality_mask`: the one
    segmentation both `evaluation.program.evaluate` (each subset) and `inference.predict.predict_case`
    run. `subset` is the index of the subset served (data; default: the full set), passed to
    `Method.predict`.

    `image` holds the case at its start, padded at the end with zeros to any
    shape (the evaluation's bucket; `pad_shape` for one case); `case` locates
    it (data, `case_locator`): ``{"shape": its extent in image, "box_start":
    its corner in the source grid}`` (default: all of `image`, at 0). Steps: pad
    to at least the window, `Method.fill` on the whole padded image (the one
    call of it: M3AE reads x_sub into the padding too), sliding windows
    tiling [0, max(case_shape, window)) only (the ``extent`` of
    `inference.windows.sliding_window`), `decode`, labels zero outside the case (and outside
    `valid`, if given), optional ET post-processing. The labels inside the
    case do not depend on how far `image` was padded, so a case scores the
    same whatever bucket the other cases of an evaluation need.
    """
    shape = image.shape[:3]
    case = case_locator(shape, (0, 0, 0)) if case is None else case
    subset = jnp.int32(FULL_SUBSET_INDEX) if subset is None else subset
    image = method.fill(models, pad_to_window(image, cfg), modality_mask, case)
    scores = sliding_window(
        window_scorer(method, models, cfg, modality_mask, subset),
        image,
        sliding_config(cfg),
        len(REGIONS),
        extent=jnp.asarray(case["shape"], jnp.int32),
    )
    return labels_from_scores(method, scores, shape, case, cfg, valid)


def segment_subsets(method, models, image, masks, indices, cfg: EvalConfig, valid=None, case=None):
    """Labels (S, D, H, W) of one case for S subsets (`masks` (S, 4), `indices` (S,)), each equal to
    `segment`'s, for a method with `window_features`: each window batch is encoded once
    (`Method.window_features`), then every subset's `Method.predict_from_features` runs on it (a
    `lax.map`: the memory of one subset's decoder), their scores blended together
    (`windows.sliding_window_stack`). Such a method keeps the default `fill` (the image is the same
    for every subset)."""
    check_shares_window_features(method)
    shape = image.shape[:3]
    case = case_locator(shape, (0, 0, 0)) if case is None else case
    scores = sliding_window_stack(
        subsets_window_scorer(method, models, cfg, masks, indices),
        pad_to_window(image, cfg),
        sliding_config(cfg),
        len(REGIONS),
        len(indices),
        extent=jnp.asarray(case["shape"], jnp.int32),
    )
    return lax.map(lambda s: labels_from_scores(method, s, shape, case, cfg, valid), scores)


def shares_window_features(method, models, cfg: EvalConfig, image) -> bool:
    """Whether `method` returns window features for these models (decided at trace time, no work traced)."""
    window = jax.ShapeDtypeStruct((cfg.window_batch, *cfg.window, image.shape[-1]), image.dtype)
    return jax.eval_shape(lambda w: method.window_features(models, w), window) is not None


def check_shares_window_features(method) -> None:
    if type(method).fill is not Method.fill:
        raise TypeError(
            f"{type(method).__name__} overrides both `fill` and `window_features`: window features are shared "
            "by every subset, so they must be computed from an image that is the same for every subset"
        )


def pad_to_window(image, cfg: EvalConfig):
    """`image` padded at the end to at least the window on each axis (`fill` sees the padding the windows read)."""
    shape = image.shape[:3]
    padded = tuple(max(s, w) for s, w in zip(shape, cfg.window))
    if padded == shape:
        return image
    return jnp.pad(image, [(0, p - s) for p, s in zip(padded, shape)] + [(0, 0)])


def window_scorer(method, models, cfg: EvalConfig, modality_mask, subset):
    """Scores of a window batch for one subset: `Method.predict`, as logits for `eval.average = "logits"`,
    averaged over `eval.tta`'s mirror images (`mirrored`)."""
    return mirrored(plain_window_scorer(method, models, cfg, modality_mask, subset), cfg)


def plain_window_scorer(method, models, cfg: EvalConfig, modality_mask, subset):
    """`window_scorer` without test-time mirroring: one `Method.predict` of the window batch."""

    def scores(x):
        probs = method.predict(models, split_windows(x), modality_mask, subset)
        return to_logits(probs) if cfg.average == "logits" else probs

    return scores


def subsets_window_scorer(method, models, cfg: EvalConfig, masks, indices, unroll: bool = False):
    """Scores (S, B, *window, 3) of a window batch for S subsets: the window features once, then each
    subset's `predict_from_features` (`lax.map`; a Python loop with `unroll`, for XLA's cost analysis,
    which counts a loop's body once). Without window features: each subset's `plain_window_scorer`.
    With `eval.tta`, all of it per mirror image of the batch (`mirrored`: features of each flip)."""

    def scores(x):
        x = split_windows(x)
        features = method.window_features(models, x)

        def one(mask, subset):
            if features is None:
                return plain_window_scorer(method, models, cfg, mask, subset)(x)
            probs = method.predict_from_features(models, features, x, mask, subset)
            return to_logits(probs) if cfg.average == "logits" else probs

        if unroll:
            return jnp.stack([one(masks[i], indices[i]) for i in range(len(indices))])
        return lax.map(lambda m: one(m[0], m[1]), (masks, indices))

    return mirrored(scores, cfg, unroll)


#: Which spatial axes (depth, height, width) each of `eval.tta = "flips"`'s 8 passes flips; identity first.
MIRRORS = np.asarray(list(itertools.product((False, True), repeat=3)))


def mirrors(cfg: EvalConfig) -> np.ndarray:
    """(passes, 3) bool: the flips of a window that `eval.tta` averages (the identity alone for "none")."""
    return MIRRORS if cfg.tta == "flips" else MIRRORS[:1]


def mirrored(scores, cfg: EvalConfig, unroll: bool = False):
    """`scores` (a window batch (B, *window, C) -> (..., B, *window, K)) averaged in float32 over the
    flips of `mirrors(cfg)`: each pass scores the batch flipped along its axes and flips its output
    back (nnU-Net's mirroring), at the level `eval.average` blends. The passes are a `lax.scan` whose
    flips are data, so the network is traced and compiled once and holds one pass's activations
    (`unroll`: a Python loop of static flips, for XLA's cost analysis). "none": `scores` itself.

    Under a mesh that splits depth ("space") a flip is an ordinary array op on the sharded window:
    XLA's partitioner moves the slabs between devices, and the network sees an ordinary window."""
    table = mirrors(cfg)
    if len(table) == 1:
        return scores

    def flip(a, axes, first: int):
        if unroll:  # static flips
            return jnp.flip(a, tuple(first + int(k) for k in np.flatnonzero(axes))) if axes.any() else a
        for k in range(3):  # the flag is data: one trace serves every pass
            a = lax.cond(axes[k], lambda t, ax=first + k: jnp.flip(t, ax), lambda t: t, a)
        return a

    def one(x, axes):
        y = scores(flip(x, axes, 1)).astype(jnp.float32)
        return flip(y, axes, y.ndim - 4)  # y: (..., B, D, H, W, K)

    def averaged(x):
        if unroll:
            return sum(one(x, axes) for axes in table) / len(table)
        out = jax.eval_shape(scores, x)

        def step(total, axes):
            return total + one(x, axes), None

        total, _ = lax.scan(step, jnp.zeros(out.shape, jnp.float32), jnp.asarray(table))
        return total / len(table)

    return averaged


def labels_from_scores(method, scores, shape, case, cfg: EvalConfig, valid=None):
    """Labels (D, H, W) from a case's blended window scores: decoded, zero outside the case (and
    outside `valid`), optional ET post-processing."""
    case_shape = jnp.asarray(case["shape"], jnp.int32)
    scores = scores[: shape[0], : shape[1], : shape[2]]
    probs = jax.nn.sigmoid(scores) if cfg.average == "logits" else scores
    inside = jnp.ones(shape, bool)
    for axis in range(3):
        inside = inside & (lax.broadcasted_iota(jnp.int32, shape, axis) < case_shape[axis])
    if valid is not None:
        inside = inside & valid
    labels = decode(probs, decoding_of(method, cfg), cfg.threshold)
    labels = jnp.where(inside, labels, 0).astype(jnp.uint8)
    return postprocess_et(labels, cfg.et_min_voxels) if cfg.et_postprocess else labels


LOGIT_CLIP = 1e-6  # probabilities are clipped this far from 0 and 1 before their logit (+-13.8)


def to_logits(probs):
    """The logit of each region probability (`eval.average = "logits"`)."""
    p = jnp.clip(probs.astype(jnp.float32), LOGIT_CLIP, 1.0 - LOGIT_CLIP)
    return jnp.log(p) - jnp.log1p(-p)


def decoding_of(method, cfg: EvalConfig) -> str:
    """The decoding an evaluation uses: `eval.decoding`, or the method's own for "auto"."""
    return method.decoding if cfg.decoding == "auto" else cfg.decoding


def decode(probs, decoding: str, threshold: float = 0.5):
    """Internal labels from region probabilities (..., 3): each region thresholded and nested
    (`labels.labels_from_regions`), or the argmax of the label probabilities they imply."""
    if decoding == "argmax":
        return labels_by_argmax(probs, xp=jnp)
    return labels_from_regions(probs > threshold, xp=jnp)


def pad_shape(shape, cfg: EvalConfig) -> tuple[int, int, int]:
    """Each axis rounded up to `eval.bucket_multiple`, at least the window (predict pads one case so)."""
    m = cfg.bucket_multiple
    return tuple(int(max(-(-int(s) // m) * m, w)) for s, w in zip(shape, cfg.window))


def pad_to(array, shape):
    """`array` padded with zeros at the end of its first three axes to `shape`."""
    pad = [(0, t - s) for s, t in zip(array.shape[:3], shape)] + [(0, 0)] * (array.ndim - 3)
    return np.pad(array, pad)
