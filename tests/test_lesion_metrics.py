"""BraTS 2023 lesion-wise Dice and HD95 (`evaluation.lesion`), `eval.lesion_wise` and the "brats2023" HD95.

(a) Each rule on hand-made masks, and a plain numpy reference written from the challenge's definition
(whole-volume operations, brute-force surface distances). (b) Agreement with the challenge's own
scoring code on perturbations of the real fixture's segmentation: opt-in, it needs a checkout of the
BraTS 2023 lesion-wise metrics repository (its ``metrics.py`` and ``surface_distance/``) named by
JAXBRATS_BRATS2023_METRICS, with connected-components-3d and pandas installed (``-m slow``); skipped
otherwise.
"""

import importlib.util
import itertools
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from jaxbrats.config import EvalConfig
from jaxbrats.data.cache import CacheDataset
from jaxbrats.evaluation import lesion, program
from jaxbrats.evaluation.lesion import PENALTY, lesion_scores, lesion_table, surface_hd95, surfel_areas
from jaxbrats.evaluation.metrics import hd95
from jaxbrats.evaluation.reports import csv_table, markdown_table
from jaxbrats.labels import EDEMA, ENHANCING, NECROSIS, REGIONS, regions_of
from jaxbrats.modalities import SUBSET_NAMES

SHAPE = (24, 24, 24)


def _cube(lo, size, shape=SHAPE):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, a + s) for a, s in zip(lo, np.broadcast_to(size, 3)))] = True
    return mask


def _scores(pred, truth, spacing=(1.0, 1.0, 1.0)):
    s = lesion_scores(pred, truth, spacing)
    return s.dice, s.hd95, s.tp, s.fn, s.fp


# ----------------------------------------------------------------------------- (a) surface areas and HD95


def test_surfel_areas_of_known_neighbourhoods():
    areas = surfel_areas()
    assert areas[0] == areas[255] == 0
    assert areas[1] == pytest.approx(math.sqrt(3) / 8)  # one corner: a triangle through three edge midpoints
    assert areas[1 + 2] == pytest.approx(math.sqrt(2) / 2)  # two corners along an edge: a slanted rectangle
    assert areas[1 + 2 + 4 + 8] == pytest.approx(1.0)  # a face: a unit square across the cube
    assert areas[1 + 2 + 4] == pytest.approx(0.5 + 3 * math.sqrt(3) / 8)  # an L: its pentagon's largest triangulation
    assert np.allclose(areas, areas[::-1])  # a neighbourhood and its complement share their surface
    assert surfel_areas((2.0, 3.0, 5.0))[1 + 2 + 4 + 8] == pytest.approx(15.0)  # the face x0 = 1: 3 x 5 mm


def test_surfel_areas_do_not_depend_on_the_cube_orientation():
    areas, bits = surfel_areas(), lesion._CORNER_BITS
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            moved = bits.transpose(perm)[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
            codes = [sum(int(moved[c]) for c in np.ndindex(2, 2, 2) if code & int(bits[c])) for code in range(256)]
            assert np.allclose(areas[codes], areas)


def _reference_hd95(a, b, spacing):
    """BraTS 2023's HD95 by brute force: every border corner of each mask against every one of the other."""

    def border(mask):
        padded = np.pad(mask, 1)
        codes = sum(
            int(lesion._CORNER_BITS[o]) * padded[tuple(slice(x, x + n + 1) for x, n in zip(o, mask.shape))]
            for o in np.ndindex(2, 2, 2)
        )
        keep = (codes != 0) & (codes != 255)
        return np.argwhere(keep) * np.asarray(spacing), surfel_areas(tuple(spacing))[codes[keep]]

    (pa, wa), (pb, wb) = border(a), border(b)
    distances = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))

    def directed(d, w):  # the smallest distance whose area share, in distance order, reaches 95 %
        order = np.lexsort((w, d))
        share = np.cumsum(w[order]) / w.sum()
        return d[order][min(int(np.searchsorted(share, 0.95)), len(d) - 1)]

    return max(directed(distances.min(1), wa), directed(distances.min(0), wb))


def test_surface_hd95_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(12):
        shape = tuple(rng.integers(4, 11, 3))
        a = ndimage.binary_opening(rng.random(shape) < 0.6) if trial % 2 else rng.random(shape) < 0.2
        b = rng.random(shape) < 0.3
        spacing = (1.0, 1.0, 1.0) if trial % 3 else tuple(rng.uniform(0.5, 2.0, 3))
        if a.any() and b.any():
            assert surface_hd95(a, b, spacing) == pytest.approx(_reference_hd95(a, b, spacing), abs=1e-9)


def test_surface_hd95_known_values_and_empty_masks():
    a, b = _cube((1, 1, 1), 1), _cube((4, 5, 1), 1)
    assert surface_hd95(a, a) == 0.0
    assert surface_hd95(a, b) == pytest.approx(5.0)  # the far corners of two unit cubes, (3, 4, 0) apart
    assert math.isinf(surface_hd95(a, np.zeros_like(a))) and math.isinf(surface_hd95(a * 0, a * 0))


def test_surface_hd95_is_the_larger_directed_percentile_not_the_pooled_one():
    truth = _cube((2, 2, 2), 10)
    pred = truth | _cube((16, 16, 16), 3)  # a far blob: ~8 % of pred's surface, ~3 % of both surfaces
    assert surface_hd95(pred, truth) == pytest.approx(_reference_hd95(pred, truth, (1.0, 1.0, 1.0)))
    assert surface_hd95(pred, truth) > 8 and hd95(pred, truth) == 0  # medpy pools the two directions


def test_brats2023_empty_convention():
    empty, full = np.zeros((5, 5, 5), bool), _cube((1, 1, 1), 3, (5, 5, 5))
    assert hd95(empty, empty, empty="brats2023") == 0.0
    assert hd95(full, empty, empty="brats2023") == hd95(empty, full, empty="brats2023") == 374.0


# ----------------------------------------------------------------------------- (a) the lesion rules


def test_one_lesion_found_missed_or_absent():
    truth = _cube((5, 5, 5), 4)  # 64 voxels > 50
    assert _scores(truth, truth) == (1.0, 0.0, 1, 0, 0)
    assert _scores(truth * 0, truth) == (0.0, PENALTY, 0, 1, 0)
    assert _scores(truth * 0, truth * 0) == (1.0, 0.0, 0, 0, 0)  # no lesion, no false positive


def test_false_positives_each_score_zero_and_374_and_are_26_connected():
    truth = _cube((3, 3, 3), 4)
    one, far = _cube((15, 15, 15), 2), _cube((15, 3, 15), 1)
    assert _scores(one, truth * 0) == (0.0, PENALTY, 0, 0, 1)
    dice, hd, tp, fn, fp = _scores(truth | one | far, truth)  # the lesion found, two false positives
    assert (dice, hd, tp, fn, fp) == (pytest.approx(1 / 3), pytest.approx(2 * PENALTY / 3), 1, 0, 2)
    assert _scores(one | far, truth) == (0.0, PENALTY, 0, 1, 2)
    corners = _cube((15, 15, 15), 1) | _cube((16, 16, 16), 1)  # touching at a corner only: one component
    assert _scores(corners, truth * 0)[4] == 1


def test_small_lesions_leave_the_score_at_50_mm3():
    at, over = _cube((2, 2, 2), (5, 5, 2)), _cube((2, 2, 2), (3, 17, 1))  # 50 and 51 voxels
    assert at.sum() == 50 and over.sum() == 51
    assert _scores(at * 0, at) == (1.0, 0.0, 0, 0, 0)  # missed but small: not counted
    assert _scores(at, at) == (1.0, 0.0, 0, 0, 0)  # found but small: not counted, and not a false positive
    assert _scores(over * 0, over) == (0.0, PENALTY, 0, 1, 0)
    small = _cube((2, 2, 2), 3)  # 27 voxels: 27 mm^3 at 1 mm, 54 mm^3 at 2 x 1 x 1 mm
    assert _scores(small * 0, small)[:2] == (1.0, 0.0)
    assert _scores(small * 0, small, (2.0, 1.0, 1.0))[:2] == (0.0, PENALTY)


@pytest.mark.parametrize(
    "offset,matched",
    [
        ((2, 0, 0), True),
        ((3, 0, 0), True),
        ((4, 0, 0), False),
        ((2, 2, 2), True),
        ((3, 3, 0), True),
        ((3, 3, 1), False),
    ],
)
def test_a_component_matches_within_three_18_connected_dilations(offset, matched):
    """Three dilations by the 18-neighbourhood reach offsets with every |d| <= 3 and |d|_1 <= 6."""
    truth = _cube((4, 4, 4), 4)
    pred = _cube(np.asarray((7, 7, 7)) + offset, 1)  # a voxel `offset` beyond truth's far corner (7, 7, 7)
    dice, hd, tp, fn, fp = _scores(pred, truth)
    assert (tp, fn, fp) == ((1, 0, 0) if matched else (0, 1, 1))
    assert dice == 0.0  # matched without overlap still scores Dice 0, with a finite HD95
    assert (hd < 10) if matched else hd == PENALTY


def test_truth_pieces_within_the_dilation_are_one_lesion():
    first = _cube((2, 2, 2), 4)
    for gap, lesions in ((6, 1), (7, 2)):  # three dilations from each side close a gap of 6 voxels
        truth = first | _cube((2, 6 + gap, 2), 4)
        dice, hd, tp, fn, fp = _scores(first, truth)
        assert (tp, fn, fp) == ((1, 0, 0) if lesions == 1 else (1, 1, 0))
        assert dice == pytest.approx(2 * 64 / (64 + 128) if lesions == 1 else 0.5)
        if lesions == 2:
            assert hd == pytest.approx(PENALTY / 2)


def test_one_component_may_match_two_lesions():
    truth = _cube((2, 2, 2), 4) | _cube((2, 16, 2), 4)  # 10 apart: two lesions
    bar = _cube((2, 2, 2), (4, 18, 4))  # one component over both
    dice, _, tp, fn, fp = _scores(bar, truth)
    assert (tp, fn, fp) == (2, 0, 0) and dice == pytest.approx(2 * 64 / (bar.sum() + 64))


def test_scores_do_not_depend_on_the_axis_order_or_direction():
    rng = np.random.default_rng(1)
    truth = ndimage.binary_opening(rng.random(SHAPE) < 0.55, iterations=1) & _cube((2, 2, 2), 20)
    pred = ndimage.binary_erosion(truth) | (rng.random(SHAPE) < 0.002)
    want = _scores(pred, truth, (1.0, 1.5, 2.0))
    moved = _scores(pred.transpose(2, 0, 1)[::-1], truth.transpose(2, 0, 1)[::-1], (2.0, 1.0, 1.5))
    np.testing.assert_allclose(moved, want, rtol=1e-12)


def _reference_scores(pred, truth, spacing, dilation=3, threshold=50.0):
    """The challenge's definition, step by step on the whole volume (no crops, no boxes)."""
    cc26, cc18 = np.ones((3, 3, 3), bool), ndimage.generate_binary_structure(3, 2)
    pred_cc, _ = ndimage.label(pred, cc26)
    grown, _ = ndimage.label(ndimage.binary_dilation(truth, cc18, iterations=dilation), cc26)
    lesions = [truth & (grown == i) for i in range(1, grown.max() + 1)]
    kept_dice, kept_hd, matched = [], [], set()
    for one in lesions:
        reach = ndimage.binary_dilation(one, cc18, iterations=dilation)
        ids = set(np.unique(pred_cc[reach])) - {0}
        matched |= ids
        mine = np.isin(pred_cc, list(ids))
        d = 2 * (mine & one).sum() / (mine.sum() + one.sum())
        h = _reference_hd95(mine, one, spacing) if ids else PENALTY
        if one.sum() * np.prod(spacing) > threshold:
            kept_dice.append(d)
            kept_hd.append(h)
    fp = len(set(np.unique(pred_cc)) - {0} - matched)
    n = len(kept_dice) + fp
    return (1.0, 0.0) if n == 0 else (sum(kept_dice) / n, (sum(kept_hd) + PENALTY * fp) / n)


def _boxes(rng, shape, count):
    """Random boxes of 2-5 voxels a side: lesions near and far, small and large."""
    boxes = []
    for _ in range(count):
        size = rng.integers(2, 6, 3)
        boxes.append((tuple(rng.integers(0, np.asarray(shape) - size)), tuple(size)))
    return boxes


def test_against_the_numpy_reference_on_random_lesions():
    rng = np.random.default_rng(2)
    shape = (22, 22, 22)
    for trial in range(10):
        truth, pred = np.zeros(shape, bool), np.zeros(shape, bool)
        for lo, size in _boxes(rng, shape, 6):
            truth |= _cube(lo, size, shape)
            fate = rng.integers(4)  # found, shifted, grown or missed
            moved = np.asarray(lo) + (rng.integers(-2, 3, 3) if fate == 1 else 0) - (fate == 2)
            pred |= _cube(np.clip(moved, 0, None), np.asarray(size) + 2 * (fate == 2), shape) if fate < 3 else False
        for lo, size in _boxes(rng, shape, 2):  # false positives, or matches of a nearby lesion
            pred |= _cube(lo, size, shape)
        spacing = (1.0, 1.0, 1.0) if trial % 4 else (1.0, 0.8, 1.2)
        got = lesion_scores(pred, truth, spacing)
        np.testing.assert_allclose((got.dice, got.hd95), _reference_scores(pred, truth, spacing), rtol=1e-12)


def test_lesion_table_scores_each_applicable_subset_and_region():
    labels = np.zeros(SHAPE, np.uint8)
    labels[_cube((4, 4, 4), 8)] = EDEMA
    labels[_cube((6, 6, 6), 5)] = NECROSIS
    labels[_cube((7, 7, 7), 4)] = ENHANCING
    predicted = np.stack([labels, np.where(labels == ENHANCING, NECROSIS, labels), labels * 0] + [labels] * 12)
    applicable = np.arange(15) != 4
    dice, hd = lesion_table(predicted, labels, (1.0, 1.0, 1.0), applicable)
    assert np.isnan(dice[4]).all() and np.isnan(hd[4]).all()
    assert (dice[0] == 1).all() and (hd[0] == 0).all()
    assert list(dice[1]) == [1.0, 1.0, 0.0] and hd[1, 2] == PENALTY  # ET (64 voxels) missed
    truth = regions_of(labels)
    for r in range(len(REGIONS)):
        assert dice[2, r] == lesion_scores(regions_of(predicted[2])[..., r], truth[..., r]).dice


# ----------------------------------------------------------------------------- (a) evaluate and the reports


class _Method:
    decoding = "threshold"

    def served_subsets(self):
        return tuple(range(15))


def _fake_program(*_):
    """Stands in for the compiled program: subset s predicts the truth, nothing (s % 3 == 1), or the
    truth plus a voxel far from it (s % 3 == 2)."""

    def run(models_state, image, labels, valid, case=None):
        labels = np.asarray(labels)
        extra = labels.copy()
        extra[0, 0, 0] = ENHANCING if labels[0, 0, 0] == 0 else extra[0, 0, 0]
        maps = np.stack([(labels, labels * 0, extra)[s % 3] for s in range(15)])
        truth = regions_of(labels)
        counts = np.stack(
            [
                np.stack([(regions_of(m) & truth).sum((0, 1, 2)), regions_of(m).sum((0, 1, 2)), truth.sum((0, 1, 2))])
                for m in maps
            ]
        )
        return counts, maps

    return run


def test_evaluate_writes_lesion_scores_beside_the_global_ones(phantom_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(program, "make_case_program", _fake_program)
    dataset = CacheDataset(phantom_cache)
    cfg = EvalConfig(window=(16, 16, 16), bucket_multiple=8, lesion_wise=True)
    summary = program.evaluate(_Method(), {}, {}, dataset, cfg, tmp_path, predictions="none", progress=False)
    case_id = dataset.case_ids[0]
    case = json.loads((tmp_path / "cases" / f"{case_id}.json").read_text())
    labels = np.asarray(dataset.arrays(0)["label"])
    predicted = np.stack([(labels, labels * 0, labels)[s % 3] for s in range(15)])
    predicted[2::3, 0, 0, 0] = np.where(labels[0, 0, 0] == 0, ENHANCING, labels[0, 0, 0])
    want_dice, want_hd = lesion_table(predicted, labels, (1.0, 1.0, 1.0))
    for s, row in enumerate(case["subsets"]):
        assert [row["lesion_dice"][r] for r in REGIONS] == pytest.approx(want_dice[s])
        assert [row["lesion_hd95"][r] for r in REGIONS] == pytest.approx(want_hd[s])
    assert case["subsets"][2]["lesion_dice"]["WT"] < case["subsets"][2]["dice"]["WT"]  # a false positive costs more
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == summary and set(saved["mean"]) == {"rows", "dice", "hd95", "lesion_dice", "lesion_hd95"}
    assert saved["subsets"][1]["lesion_hd95"]["WT"] == PENALTY  # nothing predicted: every lesion missed
    assert "lesion Dice WT" in (tmp_path / "summary.md").read_text()
    assert "lesion_hd95_ET_mm" in (tmp_path / "summary.csv").read_text().splitlines()[0]


def test_without_lesion_wise_the_reports_are_unchanged(phantom_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(program, "make_case_program", _fake_program)
    cfg = EvalConfig(window=(16, 16, 16), bucket_multiple=8)
    summary = program.evaluate(_Method(), {}, {}, CacheDataset(phantom_cache), cfg, tmp_path, "none", progress=False)
    assert not any("lesion" in key for key in summary["mean"])
    case = json.loads(next((tmp_path / "cases").iterdir()).read_text())
    assert not any("lesion" in key for key in case["subsets"][0])
    assert "lesion" not in markdown_table(summary, cfg) and "lesion" not in csv_table(summary)
    assert csv_table(summary).splitlines()[0].endswith("dice_ET_percent,hd95_WT_mm,hd95_TC_mm,hd95_ET_mm")
    assert SUBSET_NAMES[0] in csv_table(summary)


# ----------------------------------------------------------------------------- (b) the official code

OFFICIAL = os.environ.get("JAXBRATS_BRATS2023_METRICS", "")


@pytest.fixture(scope="module")
def official():
    """The challenge's metrics module, run under today's numpy and pandas with the three shims it needs."""
    if not OFFICIAL or not (Path(OFFICIAL) / "metrics.py").is_file():
        pytest.skip("JAXBRATS_BRATS2023_METRICS does not name a checkout of the BraTS 2023 metrics code")
    pytest.importorskip("cc3d")
    pd = pytest.importorskip("pandas")
    patch = pytest.MonkeyPatch()
    patch.setattr(np, "Inf", np.inf, raising=False)  # removed in numpy 2
    patch.setattr(pd.DataFrame, "append", lambda self, other: pd.concat([self, other]), raising=False)

    def replace(self, to_replace=None, value=None, inplace=False):
        # pandas 1.3's DataFrame.replace(inf, 374): scalars only (later pandas compare the arrays of
        # matched component numbers that the code keeps in one column, and fail)
        done = self.apply(lambda col: col.map(lambda v: value if np.isscalar(v) and v == to_replace else v))
        if not inplace:
            return done
        for column in self.columns:
            self[column] = done[column]

    patch.setattr(pd.DataFrame, "replace", replace)
    patch.syspath_prepend(OFFICIAL)  # its surface_distance package
    spec = importlib.util.spec_from_file_location("brats2023_metrics", Path(OFFICIAL) / "metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    patch.undo()
    sys.modules.pop("brats2023_metrics", None)


def _perturbations(labels, seed=0):
    """(name, prediction, truth) pairs: the fixture's labels eroded, dilated, shifted, split, with
    components removed or added, emptied, and swapped with the truth."""
    rng = np.random.default_rng(seed)
    eroded = np.zeros_like(labels)
    for value in (1, 2, 3):
        eroded[ndimage.binary_erosion(labels == value)] = value
    et, n = ndimage.label(labels == 3, np.ones((3, 3, 3)))
    sizes = ndimage.sum(np.ones_like(et), et, range(1, n + 1))
    no_largest = np.where(et == 1 + int(np.argmax(sizes)), 1, labels)
    small_to_ed = np.where(np.isin(et, 1 + np.flatnonzero(sizes <= 60)), 2, labels)
    added = labels.copy()
    far = np.argwhere(ndimage.distance_transform_edt(labels == 0) > 9)
    for radius, value in [(1, 3), (2, 3), (3, 3), (3, 1), (2, 2), (1, 1)]:
        centre = far[rng.integers(len(far))]
        ball = sum((g - c) ** 2 for g, c in zip(np.indices(labels.shape), centre)) <= radius**2
        added[ball] = value
    added[tuple(np.argwhere(labels == 3)[0] - [3, 0, 0])] = 3  # near the ET: matched, not a false positive
    split = labels.copy()
    middle = labels.shape[0] // 2
    split[middle - 2 : middle + 2] = 0
    salt = labels.copy()
    spots = rng.random(labels.shape) < 1e-4
    salt[spots] = rng.integers(1, 4, spots.sum())
    empty = np.zeros_like(labels)
    maps = {
        "identity": labels,
        "eroded": eroded,
        "dilated": ndimage.grey_dilation(labels, size=(3, 3, 3)),
        "shifted": np.roll(labels, (2, -1, 1), axis=(0, 1, 2)),
        "largest_et_removed": no_largest,
        "small_et_removed": small_to_ed,
        "components_added": added,
        "split": split,
        "salt": salt,
        "empty": empty,
    }
    pairs = [(name, pred, labels) for name, pred in maps.items()]
    return pairs + [("truth_empty", labels, empty), ("both_empty", empty, empty), ("truth_added", labels, added)]


@pytest.mark.slow  # ~45 s: the official code dilates every lesion over the whole crop
def test_agreement_with_the_official_code_on_the_real_fixture(official, fixture_case, tmp_path):
    nib = pytest.importorskip("nibabel")
    seg = fixture_case / "BraTS-GLI-00000-000-seg.nii.gz"
    image = nib.load(seg)
    full = np.asarray(image.dataobj).astype(np.uint8)
    # The tumour's box and 12 voxels around it: the scores do not change (every dilation and
    # component lies inside), the official code runs ~10x faster.
    box = tuple(slice(max(a - 12, 0), b + 13) for a, b in zip(np.argwhere(full).min(0), np.argwhere(full).max(0)))
    labels = full[box]
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    areas = official.surface_distance.lookup_tables.neighbour_code_to_normals
    for sp in ((1.0, 1.0, 1.0), (0.7, 1.3, 2.9)):
        table = [
            sum(np.linalg.norm([n[0] * sp[1] * sp[2], n[1] * sp[0] * sp[2], n[2] * sp[0] * sp[1]]) for n in c)
            for c in areas
        ]
        np.testing.assert_allclose(surfel_areas(sp), table, rtol=0, atol=1e-12)
    worst = {"dice": 0.0, "hd95": 0.0, "legacy_hd95": 0.0}
    for name, pred, truth in _perturbations(labels):
        paths = []
        for what, array in (("pred", pred), ("truth", truth)):
            paths.append(tmp_path / f"{name}_{what}.nii.gz")
            nib.save(nib.Nifti1Image(array.astype(np.float32), image.affine, image.header), paths[-1])
        theirs = official.get_LesionWiseResults(str(paths[0]), str(paths[1]), "BraTS-GLI").set_index("Labels")
        p, t = regions_of(pred), regions_of(truth)
        for r, region in enumerate(REGIONS):
            ours, row = lesion_scores(p[..., r], t[..., r], spacing), theirs.loc[region]
            legacy = hd95(p[..., r], t[..., r], spacing, "brats2023")  # the empty-mask convention ...
            legacy = (
                legacy if not (p[..., r].any() and t[..., r].any()) else surface_hd95(p[..., r], t[..., r], spacing)
            )
            worst["dice"] = max(worst["dice"], abs(ours.dice - row["LesionWise_Score_Dice"]))
            worst["hd95"] = max(worst["hd95"], abs(ours.hd95 - row["LesionWise_Score_HD95"]))
            worst["legacy_hd95"] = max(worst["legacy_hd95"], abs(legacy - row["Legacy_HD95"]))
            counts = (row["Num_TP"], row["Num_FN"], row["Num_FP"])
            assert (ours.tp, ours.fn, ours.fp) == counts, (name, region)
            assert ours.dice == pytest.approx(row["LesionWise_Score_Dice"], abs=1e-6), (name, region)
            assert ours.hd95 == pytest.approx(row["LesionWise_Score_HD95"], abs=1e-6), (name, region)
            assert legacy == pytest.approx(row["Legacy_HD95"], abs=1e-6), (name, region)
    print(f"\nlargest differences over {len(_perturbations(labels))} pairs x 3 regions: {worst}")
