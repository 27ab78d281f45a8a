"""Case figures of an evaluation (`jaxbrats eval --figures`) and training curves (`jaxbrats plot`).

No training and no compilation: the evaluation runs with a stand-in for its compiled program.
"""

import json

import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest
from helpers import tensorboard_values

from jaxbrats.cli import main
from jaxbrats.config import EvalConfig
from jaxbrats.data.cache import CacheDataset
from jaxbrats.evaluation import figures, program, reports
from jaxbrats.inference import trained
from jaxbrats.labels import EDEMA, ENHANCING, NECROSIS, regions_of
from jaxbrats.modalities import SUBSET_NAMES, subset_index

N = 24
#: The tumour's centre in RAS+ voxels: the subject's right (x high), posterior (y low), superior (z high).
CENTRE = (16, 7, 16)


def _sphere_case():
    """A 24^3 case: FLAIR a smooth ramp, a three-label sphere tumour at CENTRE (ET inside NCR inside ED)."""
    x, y, z = np.meshgrid(*[np.arange(N)] * 3, indexing="ij")
    r = np.sqrt(sum((a - c) ** 2 for a, c in zip((x, y, z), CENTRE)))
    truth = np.where(r <= 1.5, ENHANCING, np.where(r <= 3, NECROSIS, np.where(r <= 5, EDEMA, 0))).astype(np.uint8)
    image = np.stack([1.0 + x + y + z, 2.0 + x, 1.0 + y, 1.0 + z], axis=-1).astype(np.float32)
    return image, truth


def _colour_masks(pixels):
    """Boolean masks of the pixels that show ED (green), NCR/NET (red), ET (yellow) over grey."""
    rgb = np.asarray(pixels, float)[..., :3]
    rgb = rgb / 255.0 if rgb.max() > 1 else rgb
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return {
        EDEMA: g - np.maximum(r, b) > 0.4,
        NECROSIS: r - np.maximum(g, b) > 0.4,
        ENHANCING: np.minimum(r, g) - b > 0.4,
    }


def _voxel_pixel(row, column, display_rc):
    """The figure pixel (y, x) at the centre of the displayed voxel (row, column) of a panel of a 24^2 slice."""
    left, top, _, _ = figures.panel_box(row, column)
    side = (figures.PANEL - 2 * figures.PAD) / N
    return int(top + figures.PAD + (display_rc[0] + 0.5) * side), int(left + figures.PAD + (display_rc[1] + 0.5) * side)


def test_display_is_radiological():
    """RAS+ slices: anterior / superior up; the subject's right (axial, coronal) and anterior (sagittal) on the left."""
    volume = np.zeros((4, 5, 6), int)
    volume[3, 4, 5] = 1  # right, anterior, superior corner
    volume[0, 0, 0] = 2  # left, posterior, inferior corner
    centre = (3, 4, 5)
    for view, shape in (("axial", (5, 4)), ("coronal", (6, 4)), ("sagittal", (6, 5))):
        shown = figures.cut(volume, view, centre)
        assert shown.shape == shape, view  # rows: y (axial) or z; columns: x or y (sagittal)
        assert shown[0, 0] == 1, view  # top left: anterior (axial) / superior, and right (sagittal: anterior)
    shown = figures.cut(volume, "axial", (0, 0, 0))
    assert shown[-1, -1] == 2  # left and posterior: bottom right


def test_slices_through_the_tumour_box_centre_else_the_volume_centre():
    _, truth = _sphere_case()
    assert figures.slice_centre(truth) == (CENTRE, True)
    truth = np.zeros((10, 12, 7), np.uint8)
    assert figures.slice_centre(truth) == ((5, 6, 3), False)
    truth[2, 3, 1] = truth[6, 9, 1] = EDEMA
    assert figures.slice_centre(truth) == ((4, 6, 1), True)


def test_case_figure_size_colours_and_orientation(tmp_path):
    image, truth = _sphere_case()
    predicted = np.zeros((15, N, N, N), np.uint8)
    predicted[subset_index("flair+t1ce+t1+t2")] = truth
    predicted[subset_index("t1ce")] = np.where(truth == ENHANCING, NECROSIS, truth)  # no ET
    dice = np.full((15, 3), np.nan)
    dice[subset_index("flair+t1ce+t1+t2")] = [1.0, 1.0, 1.0]
    dice[subset_index("t1ce")] = [1.0, 1.0, 0.0]
    allowed = np.ones(15, bool)
    allowed[subset_index("t1")] = False  # neither served nor scored: no column
    path = tmp_path / "figures" / "case-7.png"
    pixels = figures.write_case_figure(path, "case-7", image, truth, predicted, dice, allowed)
    columns = 3 + 4  # FLAIR, T1ce, truth; full, flair, t1ce, t2
    assert figures.figure_size(columns) == (24 + 200 * columns, 700)
    read = matplotlib.image.imread(path)
    assert read.shape[:2] == (700, 24 + 200 * columns) == pixels.shape[:2]
    np.testing.assert_array_equal(
        (read[..., :3] * 255).round().astype(np.uint8), pixels
    )  # the PNG is what TensorBoard gets
    assert [p.name for p in path.parent.iterdir()] == ["case-7.png"]  # no temporary file left
    colours = _colour_masks(pixels)

    def panel(row, column):
        left, top, right, bottom = figures.panel_box(row, column)
        return {label: mask[top:bottom, left:right] for label, mask in colours.items()}

    for row in range(3):
        for column in (0, 1):  # FLAIR and T1ce: grey only
            assert not any(m.any() for m in panel(row, column).values()), (row, column)
        for column in (2, 3):  # truth and the full subset's prediction: all three colours
            assert all(m.sum() > 20 for m in panel(row, column).values()), (row, column)
        assert not panel(row, 4)[EDEMA].any()  # flair alone predicted nothing
        assert panel(row, 5)[NECROSIS].any() and not panel(row, 5)[ENHANCING].any()  # t1ce: no ET
    # Orientation: the tumour's centre voxel (ET) where the radiological view puts it. Axial (x, y):
    # right -> left, posterior -> low; coronal (x, z): right -> left, superior -> up; sagittal (y, z):
    # posterior -> right, superior -> up.
    x, y, z = CENTRE
    for row, display_rc in enumerate([(N - 1 - y, N - 1 - x), (N - 1 - z, N - 1 - x), (N - 1 - z, N - 1 - y)]):
        assert colours[ENHANCING][_voxel_pixel(row, 2, display_rc)], figures.VIEWS[row]
        ys, xs = np.nonzero(panel(row, 2)[EDEMA])
        below, leftwards = ys.mean() > figures.PANEL / 2, xs.mean() < figures.PANEL / 2
        assert (below, leftwards) == [(True, True), (False, True), (False, False)][row], figures.VIEWS[row]


def _events(folder):
    """(tag, step, height, width) of each image summary in the TensorBoard event files of a folder."""
    images = [(e, v) for e, v in tensorboard_values(folder) if v.HasField("image")]
    return [(v.tag, e.step, v.image.height, v.image.width) for e, v in images]


class _Method:
    """Serves every subset but t1 alone."""

    decoding = "threshold"

    def served_subsets(self):
        return tuple(s for s in range(15) if SUBSET_NAMES[s] != "t1")


def _fake_program(*_):
    """Stands in for the compiled 15-subset program: every served subset predicts the truth."""
    served = _Method().served_subsets()

    def program(models_state, image, labels, valid, case=None):
        truth = regions_of(labels)
        counts = np.stack([(truth & truth).sum((0, 1, 2)), truth.sum((0, 1, 2)), truth.sum((0, 1, 2))])
        return np.repeat(counts[None], len(served), 0), np.repeat(np.asarray(labels)[None], len(served), 0)

    return program


def _fake_program_of_varied_dice(*_):
    """Like `_fake_program`, but each served subset's Dice differs by subset, region and case: the
    intersection a case- and subset-dependent fraction of the truth (predicted = truth in size)."""
    served = _Method().served_subsets()

    def program(models_state, image, labels, valid, case=None):
        truth = regions_of(np.asarray(labels)).sum((0, 1, 2))  # (3,) voxels of WT, TC, ET
        k = np.arange(3)
        inter = [truth * ((3 * j + k + int(truth.sum())) % 47 + 1) // 48 for j in range(len(served))]
        counts = np.stack([np.stack([i, truth, truth]) for i in inter])
        return counts, np.repeat(np.asarray(labels)[None], len(served), 0)

    return program


def test_evaluate_writes_figures_of_the_first_cases_and_to_tensorboard(phantom_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(program, "make_case_program", _fake_program_of_varied_dice)
    drawn, draw = {}, figures.case_figure  # each figure, to read its titles back
    monkeypatch.setattr(figures, "case_figure", lambda case_id, *a: drawn.setdefault(case_id, draw(case_id, *a)))
    dataset = CacheDataset(phantom_cache)
    cfg = EvalConfig(window=(16, 16, 16), bucket_multiple=8)
    program.evaluate(_Method(), {}, {}, dataset, cfg, tmp_path, predictions="none", progress=False, figures=2, step=37)
    first = dataset.case_ids[:2]
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(f"{c}.png" for c in first)
    assert len(list((tmp_path / "cases").iterdir())) == len(dataset) > 2  # every case scored, two drawn
    width, height = figures.figure_size(3 + 4)  # t1 is not served: no column
    for case_id in first:
        assert matplotlib.image.imread(tmp_path / "figures" / f"{case_id}.png").shape[:2] == (height, width)
    assert sorted(_events(tmp_path / "tensorboard")) == sorted((f"figures/{c}", 37, height, width) for c in first)
    # "each title gives the case's Dice for that subset": the titles against cases/<case>.json, in percent
    shown = {}
    for case_id in first:
        rows = {row["name"]: row for row in json.loads((tmp_path / "cases" / f"{case_id}.json").read_text())["subsets"]}
        titles = [ax.get_title() for ax in drawn[case_id].axes if ax.get_title()]
        assert titles[:3] == ["FLAIR", "T1ce", "ground truth"] and len(titles) == 3 + 4
        for title in titles[3:]:
            subset, dice = title.split("\n")
            want = " ".join(f"{r} {100 * rows[subset]['dice'][r]:.1f}" for r in ("WT", "TC", "ET"))
            assert dice == want, (case_id, subset)
            shown[case_id, subset] = dice
        assert [t.split("\n")[0] for t in titles[3:]] == ["flair+t1ce+t1+t2", "flair", "t1ce", "t2"]
    assert len(set(shown.values())) == len(shown)  # every column's Dice its own: a swap would show


def test_evaluate_without_figures_writes_none(phantom_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(program, "make_case_program", _fake_program)
    cfg = EvalConfig(window=(16, 16, 16), bucket_multiple=8)
    program.evaluate(_Method(), {}, {}, CacheDataset(phantom_cache), cfg, tmp_path, predictions="none", progress=False)
    assert not (tmp_path / "figures").exists() and not (tmp_path / "tensorboard").exists()


def test_eval_command_passes_figures_and_the_checkpoint_step(phantom_cache, tmp_path, monkeypatch, capsys):
    method = _Method()
    method.served_checkpoint = {"stage": "train", "step": 12, "checkpoint": "latest"}  # what load_trained read
    config = type("Config", (), {"eval": EvalConfig()})()
    seen = {}
    monkeypatch.setattr(trained, "load_trained", lambda *a, **k: seen.update(loaded=k) or (method, {}, {}, config))
    monkeypatch.setattr(program, "evaluate", lambda *a, **k: seen.update(k) or {"stop": True})
    monkeypatch.setattr(reports, "markdown_table", lambda *a: "")
    args = ["eval", "--workdir", tmp_path, "--data", phantom_cache, "--split", "all", "--out", tmp_path / "out"]
    assert main(args + ["--figures", "3", "--checkpoint", "best"]) == 0
    assert seen["figures"] == 3 and seen["step"] == 12 and seen["loaded"]["checkpoint"] == "best"
    assert seen["checkpoint"] == method.served_checkpoint  # recorded in summary.json
    assert "models: stage train, step 12 (latest checkpoint)" in capsys.readouterr().out


# --- jaxbrats plot --------------------------------------------------------------------------


def _write_run(workdir, scale):
    """Two stages as the trainer logs them (`engine.metrics_log`): one update group, then two;
    throughput rows after each flush."""
    rows = []
    for step in range(1, 6):
        rows.append(
            {
                "stage": "pretrain",
                "step": step,
                "loss": scale / step,
                "mse": 0.5 / step,
                "grad_norm": 1.0,
                "lr/model": 1e-3 * step,
            }
        )
    rows.append({"stage": "pretrain", "step": 5, "steps_per_s": 2.0, "voxels_per_s": 1e5})
    for step in range(1, 4):
        rows.append(
            {
                "stage": "finetune",
                "step": step,
                "students/loss": scale * (1 - step / 10),
                "students/dice": 0.3,
                "students/grad_norm": 2.0,
                "discriminators/loss": 0.7 - 0.8 * step / 3 * scale,
                "discriminators/grad_norm": 0.1,
                "lr/students": 1e-4,
                "lr/discriminators": 2e-4,
            }
        )
    rows.append({"stage": "finetune", "step": 3, "steps_per_s": 1.5, "voxels_per_s": 8e4})
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return workdir


def _colour_of_runs(fig, names) -> dict[str, set]:
    """Each legend name's colour (the figure's legend), checked the only one its run's lines have: a
    metric panel's lines are labelled with the run's name; every line has one of the runs' colours."""
    from matplotlib.colors import to_hex

    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == names
    colours = {t.get_text(): to_hex(h.get_color()) for t, h in zip(legend.get_texts(), legend.legend_handles)}
    assert len(set(colours.values())) == len(names)  # one colour per run
    for ax in fig.axes:
        for line in ax.get_lines():
            assert to_hex(line.get_color()) in colours.values(), ax.get_title()
            if line.get_label() in colours:
                assert to_hex(line.get_color()) == colours[line.get_label()], ax.get_title()
    return colours


def test_plot_two_runs_of_two_stages(tmp_path, capsys, monkeypatch):
    from matplotlib.colors import to_hex

    from jaxbrats.evaluation import plots
    from jaxbrats.evaluation.plots import loss_keys, read_metrics

    drawn, save = [], plots.save_figure  # each figure, to read its lines and legend back
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi: drawn.append(fig) or save(fig, path, dpi=dpi))
    a, b = _write_run(tmp_path / "run_a", 1.0), _write_run(tmp_path / "run_b", 2.0)
    rows = read_metrics(a)
    assert loss_keys(rows) == ["loss", "students/loss", "discriminators/loss"]
    out = tmp_path / "plots" / "curves.png"
    assert main(["plot", a, b, "--out", out, "--names", "baseline, m3ae"]) == 0
    assert str(out) in capsys.readouterr().out
    pixels = matplotlib.image.imread(out)
    assert (
        pixels.shape[:2] == (280 * 2 + 40, 400 * 3) and pixels[..., :3].std() > 0
    )  # 2 stages; 2 losses + lr (finetune)
    # one colour per run, the legend the --names given: each run's curves in its colour, in every panel
    colours = _colour_of_runs(drawn[0], ["baseline", "m3ae"])
    panels = {ax.get_title(): ax for ax in drawn[0].axes}
    for title, series in (
        ("pretrain: loss", 1 / np.arange(1, 6)),
        ("finetune: students/loss", 1 - np.arange(1, 4) / 10),
    ):
        for name, scale in (("baseline", 1.0), ("m3ae", 2.0)):  # _write_run's scales
            (line,) = [x for x in panels[title].get_lines() if x.get_label() == name]
            np.testing.assert_allclose(line.get_ydata(), scale * series, err_msg=f"{title} {name}")
    for title in ("pretrain: learning rate", "finetune: learning rate"):  # labelled by group; a line per run each
        lines = panels[title].get_lines()
        assert sorted(to_hex(x.get_color()) for x in lines) == sorted(len(lines) // 2 * list(colours.values()))
    rgb = pixels[..., :3]
    for colour in colours.values():  # and in the PNG written
        near = np.abs(rgb - np.asarray(matplotlib.colors.to_rgb(colour))).max(-1) < 0.02
        assert near.sum() > 200, colour
    for suffix in (".pdf", ".svg"):  # for papers: the format follows the suffix
        assert main(["plot", a, b, "--out", tmp_path / "plots" / f"curves{suffix}", "--keys", "loss,grad_norm"]) == 0
    assert (tmp_path / "plots" / "curves.pdf").read_bytes().startswith(b"%PDF")
    assert "<svg" in (tmp_path / "plots" / "curves.svg").read_text()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "curves.pdf",
        "curves.png",
        "curves.svg",
    ]  # no temporary file
    assert main(["plot", a, "--out", tmp_path / "smooth.png", "--smooth", "0.9"]) == 0
    assert len(drawn) == 4
    _colour_of_runs(drawn[1], ["run_a", "run_b"])  # without --names: the work directories' names
    _colour_of_runs(drawn[3], ["run_a"])  # smoothed: the faint raw curve in the run's colour too


def test_smoothing_is_tensorboards_debiased_moving_average():
    from jaxbrats.evaluation.plots import ema

    values = np.random.default_rng(0).normal(size=50)
    want, biased = [], 0.0
    for i, v in enumerate(values, 1):  # TensorBoard: s_i = w s_(i-1) + (1 - w) x_i, divided by 1 - w^i
        biased = 0.8 * biased + 0.2 * v
        want.append(biased / (1 - 0.8**i))
    np.testing.assert_allclose(ema(values, 0.8), want, rtol=1e-12)
    assert ema([3.0, 3.0, 3.0], 0.99) == pytest.approx([3.0, 3.0, 3.0])  # a constant stays itself from the start


def _error_line(capsys, argv) -> str:
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxbrats: error: "), lines
    return lines[0]


@pytest.mark.parametrize(
    "content,fragment",
    [
        (None, "no metrics.jsonl"),
        ("", "empty"),
        ('{"stage": "train", "step": 1, "loss": 0.5}\n{"stage": "train", "st\n', ":2: not JSON"),
        ('{"stage": "train", "step": 1, "loss": 0.5}\n\n[1, 2]\n', ":3: not a metrics row"),
        ('{"stage": "train", "step": 1, "loss": "high"}\n', ":1: 'loss' is not a number"),
    ],
)
def test_plot_names_a_missing_empty_or_corrupt_metrics_file_and_line(tmp_path, capsys, content, fragment):
    good = _write_run(tmp_path / "good", 1.0)
    bad = tmp_path / "bad"
    bad.mkdir()
    if content is not None:
        (bad / "metrics.jsonl").write_text(content)
    line = _error_line(capsys, ["plot", good, bad, "--out", tmp_path / "curves.png"])
    assert f"{bad / 'metrics.jsonl'}" in line and fragment in line
    assert not (tmp_path / "curves.png").exists()


def test_plot_refuses_an_unknown_format_and_a_wrong_number_of_names(tmp_path, capsys):
    run = _write_run(tmp_path / "run", 1.0)
    assert ".png, .pdf, .svg" in _error_line(capsys, ["plot", run, "--out", tmp_path / "curves.jpg"])
    assert "2 name(s) for 1 work directory" in _error_line(
        capsys, ["plot", run, "--out", tmp_path / "c.png", "--names", "a,b"]
    )


def test_plot_refuses_a_key_no_run_logged_and_notes_one_some_lack(tmp_path, capsys):
    a, b = _write_run(tmp_path / "a", 1.0), _write_run(tmp_path / "b", 2.0)
    line = _error_line(capsys, ["plot", a, b, "--out", tmp_path / "c.png", "--keys", "loss,nosuchkey"])
    assert "--keys 'nosuchkey': no run logged it" in line
    assert "the runs logged: loss, mse, grad_norm, lr/model, steps_per_s" in line and "students/dice" in line
    assert not (tmp_path / "c.png").exists()
    with (b / "metrics.jsonl").open("a") as f:  # only run b logs "extra"
        f.write(json.dumps({"stage": "pretrain", "step": 6, "extra": 0.5}) + "\n")
    assert main(["plot", a, b, "--out", tmp_path / "c.png", "--keys", "loss,extra"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "note: --keys 'extra': not logged by a; drawn for the others\n"
    assert (tmp_path / "c.png").is_file()
    assert matplotlib.image.imread(tmp_path / "c.png").shape[1] == 400 * 3  # loss, extra, learning rate


def test_eval_settings_name_the_checkpoint_scored(phantom_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(program, "make_case_program", _fake_program)
    served = {"stage": "train", "step": 12, "checkpoint": "best"}  # `Method.served_checkpoint`
    cfg = EvalConfig(window=(16, 16, 16), bucket_multiple=8)
    dataset = CacheDataset(phantom_cache, CacheDataset(phantom_cache).case_ids[:1])
    program.evaluate(_Method(), {}, {}, dataset, cfg, tmp_path, predictions="none", progress=False, checkpoint=served)
    assert json.loads((tmp_path / "eval_settings.json").read_text())["checkpoint"] == served
    assert json.loads((tmp_path / "summary.json").read_text())["checkpoint"] == served
