"""`jaxbrats compare`: three synthetic evaluations written in `jaxbrats eval`'s own format."""

from __future__ import annotations

import json

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest
from scipy import stats

from jaxbrats import cli
from jaxbrats.config import EvalConfig
from jaxbrats.evaluation.compare import compare, load_run
from jaxbrats.evaluation.program import _write_case
from jaxbrats.evaluation.reports import summarize, write_reports
from jaxbrats.modalities import MODALITIES, SUBSET_NAMES, SUBSETS

CASES = [f"case_{i:02d}" for i in range(8)]
FULL = len(SUBSETS) - 1


def write_eval(out, dice, hd, served=None, present=None, hd95_empty="brats"):
    """An evaluation folder as `evaluation.evaluate` writes it, from per-case values (cases, 15, 3)."""
    out.mkdir(parents=True)
    (out / "cases").mkdir()
    present = present or {c: [True] * 4 for c in CASES}
    served = np.ones(15, bool) if served is None else served
    allowed = np.asarray([[all(present[c][MODALITIES.index(m)] for m in s) for s in SUBSETS] for c in CASES]) & served
    dice, hd = np.where(allowed[..., None], dice, np.nan), np.where(allowed[..., None], hd, np.nan)
    for i, case in enumerate(CASES):
        _write_case(out, case, dice[i], hd[i], allowed[i], {"present": present[case]})
    summary = summarize(dice, hd, allowed)
    for row, s in zip(summary["subsets"], served):
        row["served"] = bool(s)
    cfg = EvalConfig(hd95_empty=hd95_empty)
    write_reports(summary, out, cfg)
    (out / "eval_settings.json").write_text(
        json.dumps({"eval": {"hd95_empty": hd95_empty, "et_postprocess": False, "et_min_voxels": 500}})
    )
    return summary


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evals")
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.8, (len(CASES), 15, 3))
    better = base + 0.1 + rng.uniform(0, 0.01, base.shape)  # better in every case: p = 2/2^8 everywhere
    noisy = base + rng.normal(0, 0.05, base.shape)
    served = np.zeros(15, bool)
    served[[0, 1, 2, 3, FULL]] = True  # a dedicated method with students for the singles and the full set only
    hd = rng.uniform(2, 20, base.shape)
    paths = []
    for name, dice, s in (("ref", base, None), ("better", better, None), ("noisy", noisy, served)):
        paths.append(root / name / "eval")
        write_eval(paths[-1], dice, hd + (name == "better"), s)
    return root, paths, {"ref": base, "better": better, "noisy": noisy}


@pytest.fixture(scope="module")
def compared(three_runs, tmp_path_factory):
    """(compare's result, its folder) of the three runs, "ref" the reference."""
    out = tmp_path_factory.mktemp("compared")
    return compare(three_runs[1], out), out


def test_tables_bold_the_best_and_mark_p_from_scipy(three_runs, compared):
    _, paths, dice = three_runs
    result, out = compared
    assert result["names"] == ["ref", "better", "noisy"]  # <run>/eval folders take the run's name
    t = result["tables"]["dice"]
    for i, name in enumerate(t.names):  # the means are each run's own summary.json
        summary = json.loads((paths[i] / "summary.json").read_text())
        for s, row in enumerate(summary["subsets"]):
            want = [
                np.nan if row["dice"][r] is None or not row["served"] else 100 * row["dice"][r]
                for r in ("WT", "TC", "ET")
            ]
            np.testing.assert_allclose(t.values[i, s], want, rtol=1e-12)
    assert t.best[1, :15].all() and not t.best[0].any()  # "better" wins every row it is compared on
    for s, r in [(0, 0), (3, 2), (FULL, 1)]:
        want = stats.wilcoxon(dice["noisy"][:, s, r], dice["ref"][:, s, r]).pvalue
        assert t.p[2, s, r] == pytest.approx(want, rel=1e-12)
        assert t.marked[2, s, r] == (want < 0.05)
    assert np.allclose(t.p[1, :15], 2 / 2**8) and t.marked[1, :15].all()
    assert np.isnan(t.p[2, 5]).all() and np.isnan(t.values[2, 5]).all()  # a row "noisy" does not serve: a dash
    shared = [0, 1, 2, 3, FULL]  # the rows every run serves: the mean row's, for every run
    assert t.mean_rows.sum() == 5 and t.mean_rows[shared].all()
    for i, name in enumerate(t.names):
        assert t.values[i, 15] == pytest.approx(100 * dice[name][:, shared].mean(axis=(0, 1)))
    mean_ref, mean_noisy = dice["ref"][:, shared].mean(axis=1), dice["noisy"][:, shared].mean(axis=1)  # per case
    assert t.p[2, 15, 0] == pytest.approx(stats.wilcoxon(mean_noisy[:, 0], mean_ref[:, 0]).pvalue)
    assert "**mean of 5 rows**" in (out / "compare_dice.md").read_text()
    md = (out / "compare_dice.md").read_text()
    full_row = next(line for line in md.splitlines() if line.startswith("| ● | ● | ● | ● |"))
    assert f"**{100 * dice['better'][:, FULL, 0].mean():.2f}**†" in full_row
    tex = (out / "compare_dice.tex").read_text()
    assert r"\textbf{" in tex and r"$^\dagger$" in tex and r"\multicolumn{3}{c}{better}" in tex
    csv_lines = (out / "compare_dice.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 16 and csv_lines[0].split(",")[6:9] == ["ref WT", "ref TC", "ref ET"]
    hd = result["tables"]["hd95"]
    assert hd.best[0, :15].all()  # lower HD95 is better: "better" is 1 mm worse everywhere
    assert "empty-mask convention 'brats'" in (out / "compare_hd95.md").read_text()
    assert json.loads((out / "compare.json").read_text())["names"] == ["ref", "better", "noisy"]


def exact_wilcoxon_p(x: np.ndarray, y: np.ndarray) -> float:
    """The two-sided exact signed-rank p-value, by hand: rank |x - y| (no ties, no zeros), then count
    the 2^n equally likely sign assignments whose positive rank sum is at least as far from n(n+1)/4."""
    d = x - y
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    observed = ranks[d > 0].sum()
    signs = (np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1  # every assignment, one per row
    sums = signs @ ranks
    centre = len(d) * (len(d) + 1) / 4
    return float(np.mean(np.abs(sums - centre) >= abs(observed - centre)))


def test_p_values_are_the_exact_signed_rank_test(three_runs, compared):
    dice, t = three_runs[2], compared[0]["tables"]["dice"]
    tested = set()
    for s, r in [(0, 0), (1, 1), (3, 2), (FULL, 1)]:  # rows all three runs serve
        want = exact_wilcoxon_p(dice["noisy"][:, s, r], dice["ref"][:, s, r])
        assert t.p[2, s, r] == pytest.approx(want, rel=1e-9), (s, r)
        tested.add(round(want, 3))
        assert exact_wilcoxon_p(dice["better"][:, s, r], dice["ref"][:, s, r]) == pytest.approx(2 / 2**8)
    assert len(tested) > 1 and max(tested) > 0.05  # not only the extreme case


def _png(path) -> np.ndarray:
    """The RGB pixels of a chart, read back; its size is the figure's at 100 dpi."""
    return matplotlib.image.imread(path)[..., :3]


def _pixels_near(rgb: np.ndarray, colour: str, tolerance: float = 0.02) -> int:
    return int((np.abs(rgb - np.asarray(matplotlib.colors.to_rgb(colour))).max(-1) < tolerance).sum())


def test_the_charts_show_the_runs(compared):
    """Bars in each run's colour, taller for the higher means; difference maps blue where a run is
    better than the reference and red where worse (Dice higher is better, HD95 lower)."""
    out = compared[1]
    for metric in ("dice", "hd95"):
        bars = _png(out / f"{metric}_means.png")
        assert bars.shape == (400, 700, 3)  # 7 x 4 inches: three regions of three runs
        ref, better, noisy = (_pixels_near(bars, f"C{i}") for i in range(3))  # matplotlib's colour cycle
        assert min(ref, better, noisy) > 1000
        assert better > ref  # bars from 0: "better" is 10 points higher in Dice and 1 mm higher in HD95
        heatmap = _png(out / f"{metric}_difference.png")
        assert heatmap.shape == (720, 840, 3)  # 8.4 x 7.2 inches: 16 rows, two runs x three regions
        red, blue = heatmap[..., 0], heatmap[..., 2]
        blueish, reddish = int((blue - red > 0.3).sum()), int((red - blue > 0.3).sum())
        # "better" is 10 points better in Dice (blue) and 1 mm worse in HD95 (red) in every row
        assert (blueish > reddish) == (metric == "dice"), (blueish, reddish)


def test_reference_and_names(three_runs, tmp_path):
    _, paths, dice = three_runs
    result = compare(paths[:2], tmp_path / "out", names=["A", "B"], reference="B")
    t = result["tables"]["dice"]
    summary = json.loads((paths[0] / "summary.json").read_text())  # catch-all runs: the mean of all 15 rows
    assert t.mean_rows.all() and t.values[0, 15, 0] == pytest.approx(100 * summary["mean"]["dice"]["WT"])
    assert t.names == ["A", "B"] and t.reference == 1 and np.isnan(t.p[1]).all()
    want = stats.wilcoxon(dice["ref"][:, 0, 0], dice["better"][:, 0, 0]).pvalue
    assert t.p[0, 0, 0] == pytest.approx(want)


def run_cli(capsys, *argv):
    code = cli.main(["compare", *map(str, argv)])
    return code, capsys.readouterr()


def test_different_cases_are_refused_naming_them(three_runs, tmp_path, capsys):
    root, paths, dice = three_runs
    other = tmp_path / "other"
    write_eval(other, dice["ref"], dice["ref"])
    (other / "cases" / "case_03.json").rename(other / "cases" / "case_99.json")
    case = json.loads((other / "cases" / "case_99.json").read_text())
    (other / "cases" / "case_99.json").write_text(json.dumps({**case, "case": "case_99"}))
    code, out = run_cli(capsys, paths[0], other, "--out", tmp_path / "out")
    assert code == 1 and out.err.count("\n") == 1
    assert "missing case_03" in out.err and "extra case_99" in out.err and str(other) in out.err
    assert not (tmp_path / "out").exists()


def test_mixed_hd95_conventions_are_refused(three_runs, tmp_path, capsys):
    _, paths, dice = three_runs
    zero = tmp_path / "zero"
    write_eval(zero, dice["ref"], dice["ref"], hd95_empty="zero")
    code, out = run_cli(capsys, paths[0], zero, "--out", tmp_path / "out")
    assert code == 1 and out.err.count("\n") == 1
    assert "HD95 empty-mask convention 'zero'" in out.err and "'brats'" in out.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--names", "a"], "--names has 1 names for 2"),
        (["--reference", "nope"], "--reference 'nope' is none of the runs"),
        (["--names", "a,a"], "two runs have one name"),
    ],
)
def test_bad_arguments_are_one_line(three_runs, tmp_path, capsys, argv, message):
    _, paths, _ = three_runs
    code, out = run_cli(capsys, paths[0], paths[1], "--out", tmp_path / "out", *argv)
    assert code == 1 and message in out.err and out.err.count("\n") == 1


def test_not_an_evaluation_is_one_line(three_runs, tmp_path, capsys):
    _, paths, _ = three_runs
    (tmp_path / "empty").mkdir()
    code, out = run_cli(capsys, paths[0], tmp_path / "empty", "--out", tmp_path / "out")
    assert code == 1 and "summary.json: missing" in out.err and out.err.count("\n") == 1


def test_cases_missing_a_modality_score_fewer_rows(tmp_path):
    rng = np.random.default_rng(1)
    present = {c: [True, True, True, i % 2 == 0] for i, c in enumerate(CASES)}  # half the cases lack T2
    a, b = rng.uniform(0.4, 0.9, (2, len(CASES), 15, 3))
    for name, dice in (("a", a), ("b", b)):
        write_eval(tmp_path / name, dice, dice, present=present)
    t = compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out")["tables"]["dice"]
    t2 = SUBSET_NAMES.index("t2")
    assert t.cases[t2] == 4 and t.cases[0] == 8
    keep = [i for i, c in enumerate(CASES) if present[c][3]]
    assert t.values[0, t2, 0] == pytest.approx(100 * a[keep, t2, 0].mean())
    assert t.p[1, t2, 0] == pytest.approx(stats.wilcoxon(b[keep, t2, 0], a[keep, t2, 0]).pvalue)
    assert load_run(tmp_path / "a", "a").applicable.sum() < 8 * 15
