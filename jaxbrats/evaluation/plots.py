"""Training curves of one or more runs from their ``metrics.jsonl`` (`jaxbrats plot`).

A run's ``metrics.jsonl`` (`runtime.rundir.RunDir.metrics`, written by
`engine.metrics_log.MetricsLog`) holds one JSON object per line. A
step's row: ``{"stage", "step", <metrics>, "lr/<group>": ...}``: the metrics
are ``loss`` (one update group) or ``<group>/loss`` (several), the loss's parts
(``<group>/<part>``) and ``grad_norm``, the learning rate of each optimiser
group as ``lr/<group>``; after each flush a throughput row ``{"stage", "step",
"steps_per_s", "voxels_per_s"}``. Steps count from 1 within each stage.

The figure: one row per stage (in the order the runs first log them), columns
the stage's loss keys (``loss`` / ``<group>/loss``, or the keys asked for),
then the learning rates of its optimiser groups (one line per run and group,
the group told by the line style), optionally smoothed (``smooth``, the
raw values faint behind); one colour per run, named by ``names`` or
the work directory's name. A panel's y axis is logarithmic when all its
values are positive. The format follows the output's suffix: ``.png``
(`DPI` 100), ``.pdf``, ``.svg``; a panel is `PANEL_INCHES` (4 x 2.8 in: a PNG
is 400 px per column wide, 280 px per stage + 40 px high). Written atomically
(`evaluation.figures.save_figure`).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from jaxbrats.errors import JaxbratsError
from jaxbrats.evaluation.figures import save_figure
from jaxbrats.runtime.rundir import RunDir

FORMATS = (".png", ".pdf", ".svg")
DPI = 100
PANEL_INCHES = (4.0, 2.8)
LR_PREFIX = "lr/"
THROUGHPUT = ("steps_per_s", "voxels_per_s")
_STYLES = ("-", "--", ":", "-.")


def read_metrics(workdir) -> list[dict]:
    """The rows of a run's metrics.jsonl; a missing, empty or corrupt file is one line naming it (and the line)."""
    path = RunDir(workdir).metrics
    if not path.is_file():
        what = "not a directory" if not Path(workdir).is_dir() else "no metrics.jsonl (has this run logged a step?)"
        raise JaxbratsError(f"{path}: {what}")
    rows = []
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise JaxbratsError(f"{path}: not a text file ({e.reason})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise JaxbratsError(f"{path}:{number}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("stage"), str) or not isinstance(row.get("step"), int):
            raise JaxbratsError(
                f"{path}:{number}: not a metrics row (a JSON object with a 'stage' and an integer 'step')"
            )
        bad = [k for k, v in row.items() if k not in ("stage", "step") and not isinstance(v, (int, float))]
        if bad:
            raise JaxbratsError(f"{path}:{number}: {bad[0]!r} is not a number ({row[bad[0]]!r})")
        rows.append(row)
    if not rows:
        raise JaxbratsError(f"{path}: empty (no step logged yet)")
    return rows


def loss_keys(rows) -> list[str]:
    """The loss keys the rows hold (``loss``, ``<group>/loss``), in the order first seen."""
    return _keys(rows, lambda k: k == "loss" or k.endswith("/loss"))


def lr_keys(rows) -> list[str]:
    return _keys(rows, lambda k: k.startswith(LR_PREFIX))


def _keys(rows, keep) -> list[str]:
    seen = {}
    for row in rows:
        for key in row:
            if key not in ("stage", "step") and keep(key):
                seen.setdefault(key)
    return list(seen)


def check_keys(keys, runs, names, limit: int = 30) -> None:
    """A key no run logged is one line listing the keys the runs have (a typo must not draw
    nothing silently); a key only some runs logged is a note, and the others' lines are drawn."""
    logged = [set(_keys(rows, lambda k: True)) for rows in runs]
    for key in keys:
        without = [name for name, have in zip(names, logged) if key not in have]
        if len(without) == len(runs):
            have = _keys([r for rows in runs for r in rows], lambda k: True)
            listed = ", ".join(have[:limit]) + (f" and {len(have) - limit} more" if len(have) > limit else "")
            raise JaxbratsError(f"--keys {key!r}: no run logged it; the runs logged: {listed}")
        if without:
            print(f"note: --keys {key!r}: not logged by {', '.join(without)}; drawn for the others", file=sys.stderr)


def _series(rows, stage: str, key: str):
    points = sorted((r["step"], float(r[key])) for r in rows if r["stage"] == stage and key in r)
    return [s for s, _ in points], [v for _, v in points]


def _log_scale_if_positive(ax, values) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0:
        ax.set_yscale("log")


def ema(values, weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so it starts at the first value."""
    out, average = [], 0.0
    for i, v in enumerate(values, 1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight**i))
    return out


def _draw(ax, steps, ys, colour, style, label, smooth: float) -> None:
    """A series; smoothed (`ema`) over its raw values drawn faint when `smooth` > 0."""
    if smooth > 0:
        ax.plot(steps, ys, color=colour, linestyle=style, linewidth=0.8, alpha=0.25)
        ys = ema(ys, smooth)
    ax.plot(steps, ys, color=colour, linestyle=style, linewidth=1.2, label=label)


def plot_runs(workdirs, out, names=None, keys=None, smooth: float = 0.0) -> Path:
    """Draw the training curves of the runs in `workdirs` (module docstring) to `out` (.png, .pdf, .svg).
    `names`: a label per run (default: each work directory's name); `keys`: the metrics per stage
    (default: its loss keys; one no run logged is an error, `check_keys`); a stage without one of
    them leaves its panel out. `smooth` in [0, 1): the metrics (not the learning rates) also drawn
    as an exponential moving average of that weight."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    out = Path(out)
    if not 0 <= smooth < 1:
        raise JaxbratsError(f"--smooth must be in [0, 1) (TensorBoard's smoothing weight), got {smooth}")
    if out.suffix.lower() not in FORMATS:
        raise JaxbratsError(f"--out {out}: the format follows the suffix, one of {', '.join(FORMATS)}")
    workdirs = [Path(w) for w in workdirs]
    if not workdirs:
        raise JaxbratsError("plot: give at least one work directory")
    names = list(names) if names else [w.resolve().name for w in workdirs]
    if len(names) != len(workdirs):
        raise JaxbratsError(
            f"--names: {len(names)} name(s) for {len(workdirs)} work director{'y' if len(workdirs) == 1 else 'ies'}"
        )
    runs = [read_metrics(w) for w in workdirs]
    if keys is not None:
        check_keys(keys, runs, names)
    stages = list(dict.fromkeys(r["stage"] for rows in runs for r in rows))
    panels = {}  # stage -> [metric keys..., "lr"]
    for stage in stages:
        in_stage = [r for rows in runs for r in rows if r["stage"] == stage]
        wanted = loss_keys(in_stage) if keys is None else [k for k in keys if any(k in r for r in in_stage)]
        panels[stage] = wanted + (["lr"] if lr_keys(in_stage) else [])
    columns = max(1, max(len(p) for p in panels.values()))
    fig = Figure(
        figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * len(stages) + 0.4), dpi=DPI, layout="constrained"
    )
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(stages), columns)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for row, stage in enumerate(stages):
        for column, key in enumerate(panels[stage]):
            ax = fig.add_subplot(grid[row, column])
            values = []
            for rows, name, colour in zip(runs, names, colours):
                groups = lr_keys([r for r in rows if r["stage"] == stage]) if key == "lr" else [key]
                for g, metric in enumerate(groups):
                    steps, ys = _series(rows, stage, metric)
                    if steps:
                        _draw(
                            ax,
                            steps,
                            ys,
                            colour,
                            _STYLES[g % len(_STYLES)],
                            metric[len(LR_PREFIX) :] if key == "lr" else name,
                            0.0 if key == "lr" else smooth,
                        )
                        values += ys
            _log_scale_if_positive(ax, values)
            ax.set_title(f"{stage}: {'learning rate' if key == 'lr' else key}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            if key == "lr":  # which line style is which optimiser group
                groups = lr_keys([r for rows in runs for r in rows if r["stage"] == stage])
                if len(groups) > 1:
                    ax.legend(
                        handles=[
                            Line2D([], [], color="grey", linestyle=_STYLES[g % len(_STYLES)], label=k[len(LR_PREFIX) :])
                            for g, k in enumerate(groups)
                        ],
                        fontsize=7,
                        title="group",
                        title_fontsize=7,
                    )
    handles = [Line2D([], [], color=c, linewidth=2, label=n) for n, c in zip(names, colours)]
    fig.legend(handles=handles, loc="outside upper center", ncol=min(len(names), 6), frameon=False, fontsize=9)
    return save_figure(fig, out, dpi=DPI)
