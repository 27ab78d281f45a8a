"""BraTS 2023 lesion-wise Dice and HD95, the ranking metrics of the BraTS 2023 challenges.

The rules are those of the challenge's official scoring code (the BraTS 2023 lesion-wise metrics
repository, run by the Synapse evaluation of 2023), re-implemented here with scipy:

1. Each region (WT, TC, ET) is scored on its own binary masks. Components are 26-connected.
2. Ground-truth lesions: the truth mask is dilated (`DILATION_STRUCTURE`, 18-connected, ``dilation``
   iterations) and its dilation split into 26-connected components; the truth voxels inside one
   such component form one lesion, so nearby pieces of truth count as one lesion.
3. A predicted component matches a lesion when it meets the lesion's own dilation (same
   structure and iterations). A lesion's Dice and HD95 are those of the lesion against the union
   of its matched components (whole components; one component may match several lesions).
   An unmatched lesion (a false negative) scores Dice 0 and HD95 `PENALTY` (374 mm).
4. A predicted component that matches no lesion (small ones included) is a false positive:
   Dice 0 and HD95 374 each.
5. Lesions of at most ``threshold`` mm^3 leave the score (matched or not): the challenge's
   small-lesion rule.
6. The case's score is the sum over the lesions kept plus the false positives' penalties, divided
   by their number; with no lesion kept and no false positive, Dice 1 and HD95 0.

The dilation and threshold of each 2023 challenge are in `CHALLENGES`; the evaluation uses
glioma's ("BraTS-GLI": 3 iterations, 50 mm^3).

HD95 here is the challenge's: that of DeepMind's surface-distance code (`surface_hd95`), not the
pooled medpy definition of `metrics.hd95`. Surface points lie on the voxel-corner grid (every
corner whose 2x2x2 neighbourhood is neither all in nor all out), each weighted by the area of
its marching-cubes surface element; the directed 95th percentiles are area-weighted, and the
larger of the two is taken. The areas (`surfel_areas`) come from the classic marching-cubes
polygons (one per edge-connected group of the at most four corners on the minority side,
through the midpoints of the cut edges), each triangulated to its largest total area: the
official table's values for all 256 neighbourhoods (tests/test_lesion_metrics.py compares them).
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from jaxbrats.labels import REGIONS, regions_of
from jaxbrats.modalities import SUBSETS

#: (dilation iterations, small-lesion threshold in mm^3) of each BraTS 2023 challenge.
CHALLENGES: dict[str, tuple[int, float]] = {
    "BraTS-GLI": (3, 50.0),
    "BraTS-SSA": (3, 50.0),
    "BraTS-MEN": (1, 50.0),
    "BraTS-PED": (3, 50.0),
    "BraTS-MET": (1, 2.0),
}
CHALLENGE = "BraTS-GLI"  # the gliomas jaxbrats' datasets hold
PENALTY = 374.0  # HD95 of a missed or false lesion, mm
PERCENT = 95.0
COMPONENTS = ndimage.generate_binary_structure(3, 3)  # 26-connectivity
DILATION_STRUCTURE = ndimage.generate_binary_structure(3, 2)  # 18-connectivity

# Bit of each corner of a 2x2x2 neighbourhood (index = offset), as the official code numbers them.
_CORNER_BITS = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]])


class LesionScores(NamedTuple):
    """One region's lesion-wise scores, with the counts behind them (lesions above the threshold)."""

    dice: float
    hd95: float
    tp: int  # lesions kept that a component matches
    fn: int  # lesions kept that none matches
    fp: int  # predicted components that match no lesion


# ----------------------------------------------------------------------------- surface HD95


def _corner_groups(code: int) -> list[set]:
    """Edge-connected groups of the set corners of `code` (of its complement when more than 4 are set)."""
    if bin(code).count("1") > 4:
        code = 255 - code
    left = {c for c in itertools.product((0, 1), repeat=3) if code & int(_CORNER_BITS[c])}
    groups = []
    while left:
        group, todo = set(), [left.pop()]
        while todo:
            corner = todo.pop()
            group.add(corner)
            near = {c for c in left if sum(a != b for a, b in zip(c, corner)) == 1}
            left -= near
            todo.extend(near)
        groups.append(group)
    return groups


def _polygon(group: set) -> np.ndarray:
    """(k, 3) midpoints of the cube edges that leave `group`, in order around it."""
    corners = list(itertools.product((0, 1), repeat=3))
    cut = [
        (a, b)
        for a, b in itertools.combinations(corners, 2)
        if sum(x != y for x, y in zip(a, b)) == 1 and (a in group) != (b in group)
    ]
    # Two cut edges are neighbours when they lie on one face (a face holds 0 or 2 of a group's cut edges).
    faces = [[e for e in cut if e[0][axis] == e[1][axis] == side] for axis in range(3) for side in (0, 1)]
    near = {e: [f for face in faces if e in face for f in face if f != e] for e in cut}
    ring, previous = [cut[0]], None
    while len(ring) < len(cut):
        step = next(e for e in near[ring[-1]] if e != previous and e not in ring)
        previous = ring[-1]
        ring.append(step)
    return np.asarray([(np.asarray(a) + np.asarray(b)) / 2 for a, b in ring], float)


def _triangulations(ring: tuple) -> list[list[tuple]]:
    """Every triangulation of a convex-indexed polygon `ring` (vertex indices)."""
    if len(ring) < 3:
        return [[]]
    first, last = ring[0], ring[-1]
    return [
        left + right + [(first, ring[k], last)]
        for k in range(1, len(ring) - 1)
        for left in _triangulations(ring[: k + 1])
        for right in _triangulations(ring[k:])
    ]


@functools.cache
def _surfel_triangles() -> tuple[np.ndarray, ...]:
    """Per code, (t, 3, 3) triangles of its surface element in unit cube coordinates."""
    out = []
    for code in range(256):
        triangles = []
        for group in _corner_groups(code):
            points = _polygon(group)
            options = _triangulations(tuple(range(len(points))))
            areas = [
                sum(np.linalg.norm(np.cross(points[j] - points[i], points[k] - points[i])) for i, j, k in t)
                for t in options
            ]
            triangles += [points[list(tri)] for tri in options[int(np.argmax(areas))]]
        out.append(np.asarray(triangles, float).reshape(-1, 3, 3))
    return tuple(out)


@functools.lru_cache(maxsize=16)
def surfel_areas(spacing: tuple[float, ...] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """(256,) area in mm^2 of the surface element of each 2x2x2 neighbourhood code at `spacing`."""
    scale = np.asarray(spacing, float)
    areas = np.zeros(256)
    for code, triangles in enumerate(_surfel_triangles()):
        if len(triangles):
            t = triangles * scale
            areas[code] = np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=-1).sum() / 2
    return areas


def _corner_codes(mask: np.ndarray) -> np.ndarray:
    """Neighbourhood code of every voxel corner: (n + 1) per axis, voxels outside the mask count as out."""
    padded = np.pad(mask.astype(np.uint8), 1)
    n = mask.shape
    codes = np.zeros(tuple(s + 1 for s in n), np.int64)
    for offset in itertools.product((0, 1), repeat=3):
        view = padded[tuple(slice(o, o + s + 1) for o, s in zip(offset, n))]
        codes += int(_CORNER_BITS[offset]) * view
    return codes


def _directed(distances: np.ndarray, areas: np.ndarray) -> float:
    """Area-weighted `PERCENT` percentile of `distances`, as the official code picks it; inf when empty."""
    if distances.size == 0:
        return float("inf")
    order = np.lexsort((areas, distances))  # by distance, then area: the official sort of (distance, area) pairs
    distances, areas = distances[order], areas[order]
    cumulative = np.cumsum(areas) / np.sum(areas)
    index = int(np.searchsorted(cumulative, PERCENT / 100.0))
    return float(distances[min(index, distances.size - 1)])


def surface_hd95(pred: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> float:
    """BraTS 2023's HD95 of two boolean masks (module docstring), in the units of `spacing`; inf when
    either mask is empty (the challenge then scores 374, or 0 when both are)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() or not truth.any():
        return float("inf")
    box = _box(pred | truth, 0)
    pred, truth = pred[box], truth[box]
    spacing = tuple(float(s) for s in spacing)
    table = surfel_areas(spacing)
    code_p, code_t = _corner_codes(pred), _corner_codes(truth)
    edge_p, edge_t = (code_p != 0) & (code_p != 255), (code_t != 0) & (code_t != 255)
    to_pred = ndimage.distance_transform_edt(~edge_p, sampling=spacing)
    to_truth = ndimage.distance_transform_edt(~edge_t, sampling=spacing)
    return max(
        _directed(to_pred[edge_t], table[code_t[edge_t]]),
        _directed(to_truth[edge_p], table[code_p[edge_p]]),
    )


# ----------------------------------------------------------------------------- lesions


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices around the True voxels of `mask`, grown by `margin` (clipped to the volume)."""
    coords = np.argwhere(mask)
    lo = np.maximum(coords.min(0) - margin, 0)
    hi = np.minimum(coords.max(0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _shift(box: tuple[slice, ...], by: tuple[slice, ...]) -> tuple[slice, ...]:
    """`box`, given inside the box `by`, in the coordinates `by` is given in."""
    return tuple(slice(s.start + b.start, s.stop + b.start) for s, b in zip(box, by))


def _within(box: tuple[slice, ...], frame: tuple[slice, ...]) -> tuple[slice, ...]:
    """`box` in the coordinates of `frame` (both in one grid)."""
    return tuple(slice(s.start - f.start, s.stop - f.start) for s, f in zip(box, frame))


def _common(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    """The intersection of two boxes (possibly empty)."""
    return tuple(slice(max(x.start, y.start), max(min(x.stop, y.stop), max(x.start, y.start))) for x, y in zip(a, b))


def _paste(values: np.ndarray, at: tuple[slice, ...], box: tuple[slice, ...]) -> np.ndarray:
    """`values`, laid out over `at`, on the grid of `box` (zero outside `at`)."""
    out = np.zeros(tuple(s.stop - s.start for s in box), values.dtype)
    common = _common(at, box)
    if all(c.start < c.stop for c in common):
        out[_within(common, box)] = values[_within(common, at)]
    return out


class _Lesion(NamedTuple):
    box: tuple[slice, ...]  # the lesion's box grown by the dilation (clipped to the volume)
    mask: np.ndarray  # the lesion in `box`
    reach: np.ndarray  # its dilation in `box`: where a predicted component matches it
    volume: float  # mm^3


def truth_lesions(truth: np.ndarray, spacing=(1.0, 1.0, 1.0), dilation: int = 3) -> list[_Lesion]:
    """The ground-truth lesions of one region's mask, merged by the dilation rule (rule 2)."""
    truth = np.asarray(truth, bool)
    if not truth.any():
        return []
    frame = _box(truth, dilation)  # holds the whole dilation, so the crop changes nothing
    crop = truth[frame]
    grown = ndimage.binary_dilation(crop, DILATION_STRUCTURE, iterations=dilation) if dilation else crop
    merged, _ = ndimage.label(grown, COMPONENTS)
    merged = np.where(crop, merged, 0)
    voxel = float(np.prod(np.asarray(spacing, float)))
    lesions = []
    for index, tight in enumerate(ndimage.find_objects(merged), start=1):
        if tight is None:
            continue
        box = tuple(slice(max(s.start - dilation, 0), min(s.stop + dilation, n)) for s, n in zip(tight, crop.shape))
        mask = merged[box] == index
        reach = ndimage.binary_dilation(mask, DILATION_STRUCTURE, iterations=dilation) if dilation else mask
        lesions.append(_Lesion(_shift(box, frame), mask, reach, float(mask.sum()) * voxel))
    return lesions


def _union_box(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _lesion_pair(lesion: _Lesion, components, frame, boxes, ids, spacing) -> tuple[float, float]:
    """Dice and HD95 of a lesion against the union of its matched components `ids` (labels of `components`,
    laid out over `frame`; `boxes`: each component's box in volume coordinates)."""
    if not ids.size:
        return 0.0, PENALTY
    box = lesion.box
    for i in ids:
        box = _union_box(box, boxes[i - 1])
    truth = _paste(lesion.mask, lesion.box, box)
    inner = _common(box, frame)  # the matched components lie inside both
    mine = _paste(np.isin(components[_within(inner, frame)], ids), inner, box)
    return 2.0 * np.count_nonzero(mine & truth) / (mine.sum() + truth.sum()), surface_hd95(mine, truth, spacing)


def lesion_scores_of(
    pred: np.ndarray, lesions: list[_Lesion], spacing=(1.0, 1.0, 1.0), threshold: float = 50.0
) -> LesionScores:
    """Lesion-wise Dice and HD95 of one region's predicted mask against `truth_lesions` (rules 3-6)."""
    pred = np.asarray(pred, bool)
    frame = _box(pred, 0) if pred.any() else tuple(slice(0, 0) for _ in pred.shape)
    components, count = ndimage.label(pred[frame], COMPONENTS)
    boxes = [_shift(b, frame) for b in ndimage.find_objects(components)] if count else []
    matched: set[int] = set()
    dice, hd, tp, fn = [], [], 0, 0
    for lesion in lesions:
        ids = np.unique(_paste(components, frame, lesion.box)[lesion.reach])
        ids = ids[ids != 0]
        matched.update(int(i) for i in ids)
        scores = _lesion_pair(lesion, components, frame, boxes, ids, spacing)
        if lesion.volume > threshold:  # small lesions leave the score, matched or not
            dice.append(scores[0])
            hd.append(scores[1])  # finite: both masks hold voxels, or the penalty
            tp, fn = tp + bool(ids.size), fn + (not ids.size)
    fp = count - len(matched)
    total = len(dice) + fp
    if total == 0:
        return LesionScores(1.0, 0.0, tp, fn, fp)
    return LesionScores(float(sum(dice) / total), float((sum(hd) + PENALTY * fp) / total), tp, fn, fp)


def lesion_scores(pred, truth, spacing=(1.0, 1.0, 1.0), challenge: str = CHALLENGE) -> LesionScores:
    """Lesion-wise Dice and HD95 of one region's predicted and true boolean masks (module docstring)."""
    dilation, threshold = CHALLENGES[challenge]
    return lesion_scores_of(pred, truth_lesions(truth, spacing, dilation), spacing, threshold)


def lesion_table(
    predicted, truth, spacing, applicable=None, challenge: str = CHALLENGE
) -> tuple[np.ndarray, np.ndarray]:
    """(15, 3) lesion-wise Dice and (15, 3) HD95 of each subset's label map (`predicted` (15, D, H, W))
    against the truth's internal labels; NaN where not `applicable` (15,). The truth's lesions are
    found once per region and shared by the subsets."""
    dilation, threshold = CHALLENGES[challenge]
    dice = np.full((len(SUBSETS), len(REGIONS)), np.nan)
    hd = np.full_like(dice, np.nan)
    truth_regions = regions_of(np.asarray(truth))
    lesions = [truth_lesions(truth_regions[..., r], spacing, dilation) for r in range(len(REGIONS))]
    for s in range(len(SUBSETS)):
        if applicable is not None and not applicable[s]:
            continue
        pred_regions = regions_of(np.asarray(predicted[s]))
        for r in range(len(REGIONS)):
            scores = lesion_scores_of(pred_regions[..., r], lesions[r], spacing, threshold)
            dice[s, r], hd[s, r] = scores.dice, scores.hd95
    return dice, hd
