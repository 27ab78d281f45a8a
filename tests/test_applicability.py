"""Cases that really lack a modality: a subset row scores only the cases that have all its modalities."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import write_case

from jaxbrats.config import EvalConfig
from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.preprocess import prepare_dataset
from jaxbrats.evaluation.program import applicability, evaluate
from jaxbrats.evaluation.reports import csv_table, heatmap, markdown_table, summarize
from jaxbrats.inference.trained import load_trained
from jaxbrats.modalities import SUBSET_NAMES, SUBSETS

REGIONS = ("WT", "TC", "ET")
NO_T2 = "BraTS20_Training_003"
WITH_T2 = [s for s in range(15) if "t2" in SUBSETS[s]]  # 8 rows


@pytest.fixture(scope="module")
def no_t2_cache(tmp_path_factory) -> Path:
    """Three small cases; the third has no T2 file."""
    root = tmp_path_factory.mktemp("no_t2")
    for seed, case_id in enumerate(["BraTS20_Training_001", "BraTS20_Training_002", NO_T2]):
        write_case(root / "raw" / case_id, shape=(18, 20, 16), seed=seed + 21, skip=("t2",) if case_id == NO_T2 else ())
    report = prepare_dataset(root / "raw", root / "cache", workers=1, progress=False)
    assert not report["errors"]
    return root / "cache"


def _case_rows(out: Path, case_id: str) -> list[dict]:
    return json.loads((out / "cases" / f"{case_id}.json").read_text())["subsets"]


def test_t2_rows_leave_out_the_case_without_t2(trained_run, no_t2_cache, tmp_path):
    method, graphdefs, models, config = load_trained(trained_run)
    dataset = CacheDataset(no_t2_cache)
    assert [m["present"] for m in dataset.manifests][2] == [True, True, True, False]
    summary = evaluate(method, graphdefs, models, dataset, config.eval, tmp_path, progress=False)
    settings = json.loads((tmp_path / "eval_settings.json").read_text())
    assert settings["compilations"] + settings["loaded_from_cache"] == 1  # compiled, or loaded from the cache
    assert summary["cases"] == 3 and summary["mean"]["rows"] == 15
    for s, row in enumerate(summary["subsets"]):
        applicable = [m["case_id"] for m in dataset.manifests if s not in WITH_T2 or m["case_id"] != NO_T2]
        assert row["cases"] == len(applicable) == (2 if s in WITH_T2 else 3), row["name"]
        for key in ("dice", "hd95"):
            for r in REGIONS:
                values = [_case_rows(tmp_path, c)[s][key][r] for c in applicable]
                assert row[key][r] == pytest.approx(np.mean(values), rel=1e-12), (row["name"], key, r)
    rows = _case_rows(tmp_path, NO_T2)
    assert json.loads((tmp_path / "cases" / f"{NO_T2}.json").read_text())["present"] == ["flair", "t1ce", "t1"]
    for s, row in enumerate(rows):
        assert row["applicable"] == (s not in WITH_T2), row["name"]
        if s in WITH_T2:
            assert set(row["dice"].values()) == set(row["hd95"].values()) == {None}
        else:
            assert None not in row["dice"].values() and None not in row["hd95"].values()
    assert all(r["applicable"] for r in _case_rows(tmp_path, "BraTS20_Training_001"))
    # the mean row: over the 15 rows' means
    for r in REGIONS:
        assert summary["mean"]["dice"][r] == pytest.approx(
            np.mean([row["dice"][r] for row in summary["subsets"]]), rel=1e-12
        )
    md = (tmp_path / "summary.md").read_text().splitlines()
    t2_row = next(line for line in md if line.startswith("| ○ | ○ | ○ | ● |"))
    assert t2_row.split(" | ")[4] == "2" and md[2].split(" | ")[4] == "3"  # the cases column
    csv = (tmp_path / "summary.csv").read_text().splitlines()
    assert csv[0].split(",")[5] == "cases" and csv[1 + SUBSET_NAMES.index("t2")].split(",")[5] == "2"
    assert csv[-1].startswith("mean of 15/15 rows,")
    assert (tmp_path / "dice_heatmap.png").stat().st_size > 0
    # "full" predictions: the case without T2 segmented with the three it has
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == sorted(
        f"{m['case_id']}.nii.gz" for m in dataset.manifests
    )


def test_rows_without_an_applicable_case_are_null_and_dashes(trained_run, no_t2_cache, tmp_path):
    method, graphdefs, models, config = load_trained(trained_run)
    summary = evaluate(
        method, graphdefs, models, CacheDataset(no_t2_cache, [NO_T2]), config.eval, tmp_path, progress=False
    )
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert stored == json.loads(json.dumps(summary))
    for s, row in enumerate(stored["subsets"]):
        if s in WITH_T2:
            assert row["cases"] == 0 and set(row["dice"].values()) == set(row["hd95"].values()) == {None}, row["name"]
        else:
            assert row["cases"] == 1 and None not in row["dice"].values(), row["name"]
    assert stored["mean"]["rows"] == 7
    for r in REGIONS:
        assert stored["mean"]["dice"][r] == pytest.approx(
            np.mean([stored["subsets"][s]["dice"][r] for s in range(15) if s not in WITH_T2])
        )
    md = (tmp_path / "summary.md").read_text()
    t2_line = next(line for line in md.splitlines() if line.startswith("| ○ | ○ | ○ | ● |"))
    assert t2_line == "| ○ | ○ | ○ | ● | 0 | - | - | - | - | - | - |"
    assert "| **mean** | | | | 7/15 rows |" in md
    csv = (tmp_path / "summary.csv").read_text().splitlines()
    assert csv[1 + SUBSET_NAMES.index("t2")] == "t2,0,0,0,1,0,-,-,-,-,-,-"
    assert csv[-1].startswith("mean of 7/15 rows,")
    assert (tmp_path / "dice_heatmap.png").stat().st_size > 0


def test_a_general_mask_narrows_the_rows():
    """`applicable` beyond the modalities present (a later use: subsets a method cannot segment)."""
    manifests = [{"present": [True] * 4}, {"present": [True, False, True, True]}]
    mask = applicability(manifests, applicable=[s != 0 for s in range(15)])  # no case for the flair row
    assert mask.shape == (2, 15) and not mask[:, 0].any()
    assert [bool(mask[1, s]) for s in range(15)] == [s != 0 and "t1ce" not in SUBSETS[s] for s in range(15)]
    rng = np.random.default_rng(0)
    dice, hd = rng.random((2, 15, 3)), rng.random((2, 15, 3)) * 10
    hd[0, 3, 1] = np.nan  # an HD95 of the "nan" convention is left out of its mean
    summary = summarize(dice, hd, mask)
    rows = summary["subsets"]
    assert rows[0]["cases"] == 0 and rows[0]["dice"] == {r: None for r in REGIONS}
    for s in range(1, 15):
        keep = mask[:, s]
        assert rows[s]["cases"] == keep.sum()
        np.testing.assert_allclose([rows[s]["dice"][r] for r in REGIONS], dice[keep, s].mean(0), rtol=1e-12)
    assert SUBSET_NAMES[3] == "t2" and mask[:, 3].all() and rows[3]["hd95"]["TC"] == pytest.approx(hd[1, 3, 1])
    assert summary["mean"]["rows"] == 14
    np.testing.assert_allclose(
        [summary["mean"]["dice"][r] for r in REGIONS],
        np.mean([[rows[s]["dice"][r] for r in REGIONS] for s in range(1, 15)], axis=0),
        rtol=1e-12,
    )
    assert "| ● | ○ | ○ | ○ | 0 | - | - | - |" in markdown_table(summary, EvalConfig())
    assert csv_table(summary).splitlines()[1] == "flair,1,0,0,0,0,-,-,-,-,-,-"


def test_heatmap_of_a_summary_with_empty_rows(tmp_path):
    dice = np.full((1, 15, 3), 0.5)
    summary = summarize(dice, dice, np.asarray([[s % 2 == 0 for s in range(15)]]))
    heatmap(summary, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 0
    empty = summarize(dice, dice, np.zeros((1, 15), bool))  # no row has a case: the mean is null too
    assert empty["mean"]["rows"] == 0 and empty["mean"]["dice"] == {r: None for r in REGIONS}
    heatmap(empty, tmp_path / "e.png")
