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
    # "better" 1 mm and "noisy" 2 mm worse, no ties among the differences: scipy's exact test (equal values
    # would send scipy to its permutation test, seconds per comparison)
    worse = 1 + rng.uniform(0, 0.01, base.shape)
    paths = []
    for name, dice, s in (("ref", base, None), ("better", better, None), ("noisy", noisy, served)):
        paths.append(root / name / "eval")
        write_eval(paths[-1], dice, hd + {"ref": 0, "better": 1, "noisy": 2}[name] * worse, s)
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
    assert np.allclose(t.p[1], 2 / 2**8)  # raw: "better" wins in every case
    # Holm over the 48 tests of "better": the smallest p 2/2^8 times 48 is 0.375; 8 cases can never pass Holm
    assert np.allclose(t.p_adjusted[1], 48 * 2 / 2**8) and not t.marked.any()
    assert np.allclose(t.p_adjusted[2][np.isfinite(t.p[2])], holm_reference(t.p[2][np.isfinite(t.p[2])]))
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
    assert f"**{100 * dice['better'][:, FULL, 0].mean():.2f}** |" in full_row
    assert "Multiple testing: Holm correction" in md and "better 48, noisy 18" in md  # the family, named
    assert "p-values against ref, Holm-adjusted:" in md
    tex = (out / "compare_dice.tex").read_text()
    assert r"\textbf{" in tex and r"\multicolumn{3}{c}{better}" in tex and "Holm correction" in tex
    csv_lines = (out / "compare_dice.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 16 and csv_lines[0].split(",")[6:9] == ["ref WT", "ref TC", "ref ET"]
    hd = result["tables"]["hd95"]
    assert hd.best[0, :15].all()  # lower HD95 is better: "better" is 1 mm worse everywhere
    assert "empty-mask convention 'brats'" in (out / "compare_hd95.md").read_text()
    assert "Multiple testing: Holm correction" in (out / "compare_hd95.md").read_text()
    saved = json.loads((out / "compare.json").read_text())
    assert saved["names"] == ["ref", "better", "noisy"] and saved["statistics"]["correction"] == "holm"
    row = saved["tables"]["dice"]["rows"][0]
    assert row["p"]["better"]["WT"] == pytest.approx(2 / 2**8)  # raw and corrected, both kept
    assert row["p_adjusted"]["better"]["WT"] == pytest.approx(48 * 2 / 2**8)


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


def test_reference_and_names(three_runs, no_charts, tmp_path):
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


def test_cases_missing_a_modality_score_fewer_rows(no_charts, tmp_path):
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


def holm_reference(p: np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values, one hypothesis at a time: the i-th smallest p times the m - i + 1 still untested,
    never below the previous adjusted value, at most 1."""
    out, running = np.empty(len(p)), 0.0
    for rank, i in enumerate(sorted(range(len(p)), key=lambda i: p[i])):
        running = max(running, (len(p) - rank) * p[i])
        out[i] = min(1.0, running)
    return out


def step_down_rejects(p: np.ndarray, alpha: float) -> np.ndarray:
    """Holm's procedure as he states it: test the sorted p-values against alpha / (m - j + 1), stop at the first
    that fails; the ones before it are rejected."""
    rejected = np.zeros(len(p), bool)
    for j, i in enumerate(np.argsort(p, kind="stable")):
        if p[i] > alpha / (len(p) - j):
            break
        rejected[i] = True
    return rejected


def step_up_rejects(p: np.ndarray, alpha: float) -> np.ndarray:
    """Benjamini-Hochberg: the largest k with p_(k) <= k alpha / m; the k smallest are rejected."""
    ranked = np.sort(p)
    passing = np.flatnonzero(ranked <= np.arange(1, len(p) + 1) * alpha / len(p))
    return p <= ranked[passing[-1]] if len(passing) else np.zeros(len(p), bool)


def test_holm_and_bh_follow_their_definitions():
    from jaxbrats.evaluation.compare_stats import adjust, holm

    # by hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    np.testing.assert_allclose(holm(np.array([0.01, 0.04, 0.03, 0.005])), [0.03, 0.06, 0.06, 0.02])
    rng = np.random.default_rng(3)
    for m in (1, 2, 5, 48):
        for _ in range(20):
            p = np.concatenate([rng.uniform(0, 0.02, m // 2), rng.uniform(0, 1, m - m // 2)])
            p[rng.integers(0, m)] = p[0]  # a tie
            np.testing.assert_allclose(adjust(p, "holm"), holm_reference(p), rtol=1e-12)
            for alpha in (0.001, 0.01, 0.05, 0.2):
                assert np.array_equal(adjust(p, "holm") <= alpha, step_down_rejects(p, alpha)), (m, alpha)
                assert np.array_equal(adjust(p, "bh") <= alpha + 1e-15, step_up_rejects(p, alpha)), (m, alpha)
    p = np.array([[0.01, np.nan, 0.02], [np.nan, 0.5, 0.03]])  # NaN: no test, not in the family
    np.testing.assert_allclose(adjust(p, "holm")[np.isfinite(p)], holm_reference(p[np.isfinite(p)]))
    assert np.isnan(adjust(p, "bh")[~np.isfinite(p)]).all()
    np.testing.assert_array_equal(adjust(p, "none"), p)


def test_bootstrap_interval_is_vectorised_deterministic_and_covers():
    from jaxbrats.evaluation.compare_stats import bootstrap_ci, uniforms

    rng = np.random.default_rng(4)
    x, y = rng.normal(1.0, 1.0, 20), rng.normal(0.0, 1.0, 20)
    x[3] = np.nan  # one unpaired case: left out
    u = uniforms(500, 20, seed=7)
    mean, low, high = bootstrap_ci(x, y, u)
    d = (x - y)[np.isfinite(x)]
    loop = [d[(u[b, : len(d)] * len(d)).astype(int)].mean() for b in range(len(u))]  # one resample at a time
    assert mean == pytest.approx(d.mean())
    np.testing.assert_allclose([low, high], np.percentile(loop, [2.5, 97.5]), rtol=1e-12)
    np.testing.assert_array_equal(bootstrap_ci(x, y, uniforms(500, 20, seed=7)), [mean, low, high])  # by seed
    assert bootstrap_ci(x, y, uniforms(500, 20, seed=8))[1] != low
    assert np.isnan(bootstrap_ci(np.full(3, np.nan), np.zeros(3), u)).all()
    # coverage: 200 synthetic paired samples of 30 cases, true difference 0.5
    truth, u = 0.5, uniforms(2000, 30, seed=0)
    samples = rng.normal(0, 1, (200, 30))
    covered = [low <= truth <= high for _, low, high in (bootstrap_ci(s + truth, np.zeros(30), u) for s in samples)]
    assert 0.88 <= np.mean(covered) <= 0.99, np.mean(covered)


def test_compare_intervals_cover_the_true_difference_and_bh_marks(three_runs, compared, tmp_path):
    from jaxbrats.evaluation.compare import compare_metric, load_run
    from jaxbrats.evaluation.compare_stats import Statistics

    _, paths, dice = three_runs
    t, out = compared[0]["tables"]["dice"], compared[1]
    diff = dice["better"] - dice["ref"]  # 0.1 + U(0, 0.01) per case: the true difference is 10.5 points
    np.testing.assert_allclose(t.difference[1, :15, :, 0], 100 * diff.mean(axis=0), rtol=1e-12)
    low, high = t.difference[1, ..., 1], t.difference[1, ..., 2]
    assert (low <= t.difference[1, ..., 0]).all() and (t.difference[1, ..., 0] <= high).all()
    assert (low >= 10).all() and (high <= 11).all() and np.mean((low <= 10.5) & (10.5 <= high)) > 0.75
    assert np.isnan(t.difference[0]).all() and np.isnan(t.difference[2, 5]).all()  # reference; unserved row
    md = (out / "compare_dice.md").read_text()
    cell = f"{t.difference[1, 0, 0, 0]:+.2f} [{low[0, 0]:+.2f}, {high[0, 0]:+.2f}]"
    assert cell in md and "10000 resamples, seed 0" in md
    runs = [load_run(p, n) for p, n in zip(paths, ["ref", "better", "noisy"])]
    again = compare_metric(runs, 0, "dice", "", statistics=Statistics(resamples=10000, seed=0))
    np.testing.assert_array_equal(again.difference, t.difference)  # deterministic by seed
    other = compare_metric(runs, 0, "dice", "", statistics=Statistics(resamples=10000, seed=1))
    assert not np.array_equal(other.difference[1, ..., 1], low)
    bh = compare_metric(runs, 0, "dice", "", statistics=Statistics(correction="bh", resamples=0))
    assert np.allclose(bh.p_adjusted[1], 2 / 2**8) and bh.marked[1].all()  # 48 equal p-values: BH keeps them
    assert np.isnan(bh.difference[1, ..., 1]).all() and not np.isnan(bh.difference[1, ..., 0]).any()
    from jaxbrats.evaluation.compare_report import latex, markdown

    assert "†" in markdown(bh) and r"$^\dagger$" in latex(bh) and "Benjamini-Hochberg correction" in markdown(bh)


class FakeTable:
    """What `evaluation.published.load` returns, with two methods of made-up numbers."""

    name, title, citation = "fake-brats", "A Fake Paper", "Doe et al., arXiv:0000.00000, Table 2"
    dataset, split, default_method = "BraTS 2018", "test split (57 cases)", "Ours"
    sources, notes = {"Ours": "Table 2", "Base": "Table 2"}, {"Ours": "", "Base": "quoted from its paper"}

    def __init__(self):
        dice = np.linspace(0.5, 0.9, 45).reshape(15, 3)
        base = dice - 0.1
        base[4:] = np.nan  # a baseline with the four single-modality rows only
        self.methods = {"Ours": {"dice": dice}, "Base": {"dice": base, "hd95": np.full((15, 3), 9.0)}}  # no HD95
        self.means = {m: {k: np.full(3, np.nan) for k in v} for m, v in self.methods.items()}

    def values(self, method):
        if method not in self.methods:
            raise cli.JaxbratsError(f"published table 'fake-brats' has no method {method!r}; it has: Ours, Base")
        return self.methods[method]


@pytest.fixture
def fake_published(monkeypatch):
    import sys
    import types

    import jaxbrats.evaluation

    def load(name):
        if name != "fake-brats":
            raise cli.JaxbratsError(f"unknown published table {name!r}; available: fake-brats")
        return FakeTable()

    fake = types.SimpleNamespace(available=lambda: ["fake-brats"], load=load)
    monkeypatch.setitem(sys.modules, "jaxbrats.evaluation.published", fake)
    monkeypatch.setattr(jaxbrats.evaluation, "published", fake, raising=False)
    return FakeTable()


@pytest.fixture
def no_charts(monkeypatch):
    """Empty chart files: drawing them is most of a comparison's time, and test_the_charts_show_the_runs
    checks them."""
    from jaxbrats.evaluation import compare_report

    for name in ("mean_bars", "difference_heatmap"):
        monkeypatch.setattr(compare_report, name, lambda t, path: path.write_bytes(b""))


def test_one_run_and_papers(three_runs, fake_published, no_charts, tmp_path, capsys):
    _, paths, dice = three_runs
    code, out = run_cli(capsys, paths[0], "--paper", "fake-brats", "--paper", "fake-brats:Base", "--out", tmp_path)
    assert code == 0, out.err
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["tables"]["dice"]["names"] == ["ref", "Ours (paper)", "Base (fake-brats)"]
    assert saved["tables"]["hd95"]["names"] == ["ref", "Base (fake-brats)"]  # "Ours" has no HD95: left out there
    assert saved["papers"]["Base (fake-brats)"]["table"] == "fake-brats"
    rows = saved["tables"]["dice"]["rows"]
    paper = fake_published.methods["Ours"]["dice"]
    assert rows[2]["values"]["Ours (paper)"]["ET"] == pytest.approx(100 * paper[2, 2])
    # Base has only the four single rows: the mean row of every column is over those 4
    assert rows[15]["name"] == "mean of 4 rows"
    assert rows[15]["values"]["Ours (paper)"]["WT"] == pytest.approx(100 * paper[:4, 0].mean())
    assert rows[15]["values"]["ref"]["WT"] == pytest.approx(100 * dice["ref"][:, :4, 0].mean())
    assert rows[0]["p"] == {} and rows[0]["ci"] == {}  # nothing is tested: one run, papers never
    md = (tmp_path / "compare_dice.md").read_text()
    assert "| ref WT | ref TC | ref ET | Ours (paper) WT |" in md
    assert 'Ours (paper): Table 2 of "A Fake Paper" (Doe et al., arXiv:0000.00000, Table 2); BraTS 2018' in md
    assert "Base (fake-brats): Table 2" in md and "quoted from its paper" in md
    assert "no test, no interval" in md and "Multiple testing: Holm correction" in md
    assert "p-values against" not in md  # no run to test


def test_the_shipped_m3ae_table_beside_one_run(three_runs, no_charts, tmp_path, capsys):
    """The contract: one evaluation and a paper; the correction named under the table."""
    from jaxbrats.evaluation import published

    _, paths, _ = three_runs
    code, out = run_cli(capsys, paths[0], "--paper", "m3ae-brats2018", "--out", tmp_path)
    assert code == 0, out.err
    md = (tmp_path / "compare_dice.md").read_text()
    assert "M3AE (paper) WT" in md and "Multiple testing: Holm correction" in md and "arXiv:2303.05302" in md
    want = 100 * published.load("m3ae-brats2018").values()["dice"]
    saved = json.loads((tmp_path / "compare.json").read_text())["tables"]["dice"]["rows"]
    assert [saved[s]["values"]["M3AE (paper)"]["TC"] for s in (0, 14)] == pytest.approx(want[[0, 14], 1])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reference", "fake-brats"], "--reference 'fake-brats' is a paper"),
        (["--reference", "Ours (paper)"], "--reference 'Ours (paper)' is a paper"),
        (["--paper", "fake-brats:Nope"], "'fake-brats' has no method 'Nope'; it has: Ours, Base"),
        (["--paper", "unknown"], "unknown published table 'unknown'"),
        (["--paper", "fake-brats"], "--paper fake-brats: given twice"),
    ],
)
def test_paper_errors_are_one_line(three_runs, fake_published, tmp_path, capsys, argv, message):
    _, paths, _ = three_runs
    code, out = run_cli(capsys, paths[0], "--paper", "fake-brats", "--out", tmp_path / "out", *argv)
    assert code == 1 and message in out.err and out.err.count("\n") == 1, out.err


def test_one_run_alone_is_refused(three_runs, tmp_path, capsys):
    code, out = run_cli(capsys, three_runs[1][0], "--out", tmp_path / "out")
    assert code == 1 and "one and --paper NAME" in out.err and out.err.count("\n") == 1


def add_lesion_scores(folder, lesion_dice, lesion_hd):
    """Lesion-wise scores (cases, 15, 3) in the case files and summary rows, as eval.lesion_wise writes them."""
    for i, case in enumerate(CASES):
        path = folder / "cases" / f"{case}.json"
        saved = json.loads(path.read_text())
        for s, row in enumerate(saved["subsets"]):
            on = row["applicable"]
            row["lesion_dice"] = {r: float(v) if on else None for r, v in zip(("WT", "TC", "ET"), lesion_dice[i, s])}
            row["lesion_hd95"] = {r: float(v) if on else None for r, v in zip(("WT", "TC", "ET"), lesion_hd[i, s])}
        path.write_text(json.dumps(saved))


def test_lesion_wise_tables_when_every_run_has_them(three_runs, no_charts, tmp_path, capsys):
    _, _, dice = three_runs
    for name, values in (("a", dice["ref"]), ("b", dice["better"]), ("c", dice["noisy"])):
        write_eval(tmp_path / name, values, 10 * values)  # no ties: scipy's exact test, not its slow permutations
    rng = np.random.default_rng(5)
    lesion = {name: rng.uniform(0.3, 0.9, (len(CASES), 15, 3)) for name in "ab"}
    for name in "ab":
        add_lesion_scores(tmp_path / name, lesion[name], 10 * lesion[name])
    t = compare([tmp_path / "a", tmp_path / "b"], tmp_path / "ab", bootstrap=0)["tables"]
    assert set(t) == {"dice", "hd95", "lesion_dice", "lesion_hd95"}
    np.testing.assert_allclose(t["lesion_dice"].values[1, :15], 100 * lesion["b"].mean(axis=0))
    want = stats.wilcoxon(10 * lesion["b"][:, 3, 1], 10 * lesion["a"][:, 3, 1]).pvalue
    assert t["lesion_hd95"].p[1, 3, 1] == pytest.approx(want)
    md = (tmp_path / "ab" / "compare_lesion_dice.md").read_text()
    assert md.startswith("### Lesion-wise Dice (%)") and "Multiple testing: Holm correction" in md
    assert (tmp_path / "ab" / "lesion_hd95_means.png").exists()
    code, out = run_cli(capsys, tmp_path / "a", tmp_path / "c", "--out", tmp_path / "ac", "--bootstrap", "0")
    assert code == 0 and out.out.count("note:") == 2 and "only a of the runs have it" in out.out
    assert not (tmp_path / "ac" / "compare_lesion_dice.md").exists()


def _set(path, change):
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


def _subset_value(data, row, metric, region, value):
    data["subsets"][row][metric][region] = value
    return data


@pytest.mark.parametrize(
    "file, change, fragment",
    [
        ("summary.json", lambda d: [1, 2], "summary.json: holds a JSON array, not the object `jaxbrats eval` writes"),
        ("summary.json", lambda d: {**d, "subsets": "all"}, "summary.json: key 'subsets' is a JSON string"),
        ("eval_settings.json", lambda d: {"eval": [1]}, "eval_settings.json: key 'eval' is a JSON array"),
        ("cases/case_02.json", lambda d: "case", "case_02.json: holds a JSON string, not the object"),
        (
            "cases/case_02.json",
            lambda d: _subset_value(d, 0, "dice", "WT", "high"),
            "case_02.json: subset 'flair': key dice.WT is \"high\" (a JSON string), not a number",
        ),
        (
            "cases/case_02.json",
            lambda d: _subset_value(d, 2, "hd95", "TC", [1, 2]),
            f"case_02.json: subset {SUBSET_NAMES[2]!r}: key hd95.TC is [1, 2] (a JSON array), not a number",
        ),
        (
            "cases/case_02.json",
            lambda d: _subset_value(d, 3, "dice", "ET", True),
            "key dice.ET is true (a JSON boolean)",
        ),
        ("cases/case_02.json", lambda d: {**d, "subsets": d["subsets"][1:]}, "no row named 'flair' in 'subsets'"),
        ("cases/case_02.json", lambda d: {**d, "present": "flair"}, "key 'present' is not a list of modality names"),
    ],
    ids="summary-array summary-rows settings case-string str list bool row-missing present".split(),
)
def test_malformed_eval_files_are_one_line_naming_file_and_key(three_runs, tmp_path, capsys, file, change, fragment):
    import shutil

    _, paths, _ = three_runs
    broken = tmp_path / "broken"
    shutil.copytree(paths[0], broken)
    _set(broken / file, change)
    code, out = run_cli(capsys, paths[0], broken, "--out", tmp_path / "out")
    assert code == 1 and out.err.count("\n") == 1 and "Traceback" not in out.err, out.err
    assert str(broken / file) in out.err and fragment in out.err
    assert not (tmp_path / "out").exists()


def _main_table(md: str) -> list[list[str]]:
    """The run columns' cells of the 16 rows of a compare_<metric>.md's first table (after the flags and cases)."""
    lines = md.splitlines()  # a title, a blank line, the header and its rule, then the rows
    assert lines[2].startswith("| FLAIR | T1ce | T1 | T2 | cases |") and lines[20] == ""
    return [[cell.strip() for cell in line.split("|")[1:-1]][5:] for line in lines[4:20]]


def _number(cell: str) -> float:
    return float(cell.replace("**", "").rstrip("†")) if cell != "-" else np.nan


def test_ties_at_the_printed_precision_are_all_bold(no_charts, tmp_path):
    """Bold is decided on the printed numbers: 86.885 prints 86.89, so it ties with 86.89 and beats 86.88 (a
    decision on np.round, which gives 86.88 for 86.885, got both rows wrong)."""
    rng = np.random.default_rng(6)
    a = rng.uniform(0.5, 0.8, (len(CASES), 15, 3))
    b = a + rng.uniform(0.001, 0.002, a.shape)  # b higher everywhere else: the exact test, no ties
    a[:, :2, 0] = 0.86885  # 86.885 percent in every case: the row means print 86.89
    b[:, 0, 0], b[:, 1, 0] = 0.8688, 0.8689
    for name, values in (("a", a), ("b", b)):
        write_eval(tmp_path / name, values, 10 * values)
    compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out", bootstrap=0)
    md = (tmp_path / "out" / "compare_dice.md").read_text()
    rows = _main_table(md)
    assert (rows[0][0], rows[0][3]) == ("**86.89**", "86.88")
    assert (rows[1][0], rows[1][3]) == ("**86.89**", "**86.89**")  # a tie: both bold
    for metric, best in (("dice", np.max), ("hd95", np.min)):  # every cell: bold exactly where it prints the best
        text = (tmp_path / "out" / f"compare_{metric}.md").read_text()
        cells = np.asarray(_main_table(text)).reshape(16, 2, 3)
        shown = np.vectorize(_number)(cells)
        bold = np.vectorize(lambda c: c.startswith("**"))(cells)
        np.testing.assert_array_equal(bold, shown == best(shown, axis=1, keepdims=True), err_msg=metric)
        tex = (tmp_path / "out" / f"compare_{metric}.tex").read_text()
        assert tex.count(r"\textbf{") == bold.sum()


def test_other_modalities_in_a_case_are_refused(three_runs, tmp_path, capsys):
    _, paths, dice = three_runs
    present = {c: [True, True, c != "case_02", True] for c in CASES}  # case_02 without T1 in this evaluation
    write_eval(tmp_path / "other", dice["ref"], dice["ref"], present=present)
    code, out = run_cli(capsys, paths[0], tmp_path / "other", "--out", tmp_path / "out")
    assert code == 1 and out.err.count("\n") == 1, out.err
    want = f"{tmp_path / 'other'}: case case_02 has modalities ['flair', 't1ce', 't2'] there"
    assert want in out.err and f"but ['flair', 't1ce', 't1', 't2'] in {paths[0]}" in out.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "key, value, what",
    [("et_postprocess", True, "ET post-processing True"), ("et_min_voxels", 200, "ET post-processing threshold 200")],
)
def test_other_et_post_processing_is_refused(three_runs, tmp_path, capsys, key, value, what):
    _, paths, dice = three_runs
    write_eval(tmp_path / "other", dice["ref"], dice["ref"])
    _set(tmp_path / "other" / "eval_settings.json", lambda d: {"eval": {**d["eval"], key: value}})
    code, out = run_cli(capsys, paths[0], tmp_path / "other", "--out", tmp_path / "out")
    assert code == 1 and out.err.count("\n") == 1, out.err
    assert f"{tmp_path / 'other'}: evaluated with {what}, {paths[0]} with " in out.err
    assert f"re-evaluate one with --set eval.{key}=..." in out.err and not (tmp_path / "out").exists()


REGION_NAMES = ("WT", "TC", "ET")
TITLES = {"flair": "FLAIR", "t1ce": "T1ce", "t1": "T1", "t2": "T2"}


def test_p_value_tables_hold_the_corrected_p_values(three_runs, compared):
    """compare_<metric>.md's p-value table (Holm-adjusted) and the CSV's raw and corrected columns, cell by cell
    against compare.json, whose raw p-values are the exact test by hand and whose adjusted ones Holm's by hand."""
    _, _, dice = three_runs
    out = compared[1]
    saved = json.loads((out / "compare.json").read_text())["tables"]
    for metric in ("dice", "hd95"):
        rows, tested = saved[metric]["rows"], ["better", "noisy"]
        for run in tested:  # each run's 48 (better) or 18 (noisy) tests are one family
            raw = np.array([[row["p"][run][r] for r in ("WT", "TC", "ET")] for row in rows], float)
            adjusted = np.array([[row["p_adjusted"][run][r] for r in ("WT", "TC", "ET")] for row in rows], float)
            assert np.isfinite(raw).sum() == {"better": 48, "noisy": 18}[run]
            np.testing.assert_array_equal(np.isfinite(adjusted), np.isfinite(raw))
            np.testing.assert_allclose(adjusted[np.isfinite(raw)], holm_reference(raw[np.isfinite(raw)]), rtol=1e-12)
        if metric == "dice":  # the raw p-value of a cell, by hand
            want = exact_wilcoxon_p(dice["noisy"][:, 2, 1], dice["ref"][:, 2, 1])
            assert rows[2]["p"]["noisy"]["TC"] == pytest.approx(want, rel=1e-9)
        lines = (out / f"compare_{metric}.md").read_text().splitlines()
        at = lines.index("p-values against ref, Holm-adjusted:")
        assert lines[at + 2] == "| subset | " + " | ".join(f"{n} {r}" for n in tested for r in REGION_NAMES) + " |"
        for line, row in zip(lines[at + 4 : at + 20], rows, strict=True):
            named = row["cases"] is not None  # a subset row, else the mean row
            label = "+".join(TITLES[m] for m in row["name"].split("+")) if named else f"**{row['name']}**"
            want = [label] + [
                "-" if row["p_adjusted"][n][r] is None else f"{row['p_adjusted'][n][r]:.3g}"
                for n in tested
                for r in REGION_NAMES
            ]
            assert line.strip("| ").split(" | ") == want, line
        assert lines[at + 20] == ""  # 15 rows and the mean, no more
        csv_lines = (out / f"compare_{metric}.csv").read_text().splitlines()
        head = csv_lines[0].split(",")
        for line, row in zip(csv_lines[1:], rows, strict=True):
            cells = dict(zip(head, line.split(",")))
            assert cells["subset"] == row["name"]
            for n in tested:
                for r in REGION_NAMES:
                    for kind, column in (("p", f"p {n} {r}"), ("p_adjusted", f"p_holm {n} {r}")):
                        value = row[kind][n][r]
                        assert cells[column] == ("-" if value is None else f"{value:.3g}"), (column, row["name"])


def _marked(rows: list[dict], names: list[str]) -> np.ndarray:
    """(runs, 16, 3) bool from compare.json: corrected p < 0.05 (the reference and untested cells: False)."""
    p = [[[row["p_adjusted"].get(n, {}).get(r) for r in REGION_NAMES] for row in rows] for n in names]
    return np.array(p, float) < 0.05  # None -> NaN -> False


def test_daggers_and_colours_of_the_tables_and_charts(three_runs, tmp_path, monkeypatch):
    """Daggers exactly where the corrected p < 0.05, in the Markdown, LaTeX and the difference chart (with
    Benjamini-Hochberg "better"'s 48 p-values of 2/2^8 all pass; Holm would show none); the difference chart blue
    where a run is better; the mean bars in each run's colour, as tall as its mean row, named in the legend."""
    from jaxbrats.evaluation import compare_report

    drawn = {}  # the charts' figures, kept to read their artists instead of their pixels
    monkeypatch.setattr(compare_report, "_save", lambda fig, path: drawn.setdefault(path.name, fig))
    _, paths, _ = three_runs
    result = compare(paths, tmp_path, correction="bh", bootstrap=0)
    saved = json.loads((tmp_path / "compare.json").read_text())["tables"]
    names = ["ref", "better", "noisy"]
    try:
        for metric in ("dice", "hd95"):
            t, marked = result["tables"][metric], _marked(saved[metric]["rows"], names)
            assert marked[1].all() and not marked[0].any()
            if metric == "dice":
                assert not marked[2].all()  # daggers and their absence both checked
            cells = np.asarray(_main_table((tmp_path / f"compare_{metric}.md").read_text())).reshape(16, 3, 3)
            np.testing.assert_array_equal(np.vectorize(lambda c: c.endswith("†"))(cells).transpose(1, 0, 2), marked)
            tex = (tmp_path / f"compare_{metric}.tex").read_text().splitlines()
            body = [
                line[:-3].split(" & ")[-9:] for line in tex if line.startswith(("$\\bullet$", "$\\circ$", "\\multi"))
            ]
            daggers = np.vectorize(lambda c: c.endswith(r"$^\dagger$"))(np.asarray(body[-16:]).reshape(16, 3, 3))
            np.testing.assert_array_equal(daggers.transpose(1, 0, 2), marked)
            ax = drawn[f"{metric}_difference.png"].axes[0]
            columns = [(i, r) for i in (1, 2) for r in range(3)]  # every other run's WT, TC, ET
            assert len(ax.texts) == 16 * len(columns)
            for text in ax.texts:
                column, row = map(int, text.get_position())
                i, r = columns[column]
                assert text.get_text().endswith("†") == marked[i, row, r], (metric, row, column)
            image = ax.images[0]
            diff = np.asarray(image.get_array())
            np.testing.assert_allclose(diff[:, :3], t.values[1] - t.values[0], rtol=1e-12)
            rgba = image.to_rgba(diff)[:, :3]  # the colours of "better": 10 points higher Dice, 1 mm higher HD95
            better = (rgba[..., 2] > rgba[..., 0] + 0.1).all(), (rgba[..., 0] > rgba[..., 2] + 0.1).all()  # blue, red
            assert better == ((True, False) if metric == "dice" else (False, True)), metric
            ax = drawn[f"{metric}_means.png"].axes[0]
            assert len(ax.containers) == 3 and [x.get_text() for x in ax.get_legend().get_texts()] == names
            for i, bars in enumerate(ax.containers):
                assert {p.get_facecolor() for p in bars.patches} == {matplotlib.colors.to_rgba(f"C{i}")}
                np.testing.assert_allclose([p.get_height() for p in bars.patches], t.values[i, -1], rtol=1e-12)
    finally:
        for fig in drawn.values():
            compare_report._pyplot().close(fig)
