"""The files `jaxbrats compare` writes: one metric's comparison as Markdown, CSV, LaTeX and charts.

The statistics are `compare`'s; this module only renders a `MetricTable`
(see `compare` for what the numbers mean). Every file is written beside its
final name and renamed into place (`files.write_atomic`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from jaxbrats import files
from jaxbrats.labels import REGIONS
from jaxbrats.modalities import MODALITIES, SUBSETS

MARK = "†"  # p < ALPHA against the reference
MISSING = "-"  # a row a run does not serve, or one without a case
MODALITY_TITLES = {"flair": "FLAIR", "t1ce": "T1ce", "t1": "T1", "t2": "T2"}


@dataclasses.dataclass
class MetricTable:
    """One metric of several runs: 15 subset rows + the mean row, 3 regions."""

    metric: str  # "dice" or "hd95"
    names: list[str]
    reference: int  # index into names
    values: np.ndarray  # (runs, 16, 3), in print units (Dice in percent); NaN: not served / no case
    p: np.ndarray  # (runs, 16, 3) against the reference; NaN for the reference and where untestable
    best: np.ndarray  # (runs, 16, 3) bool
    marked: np.ndarray  # (runs, 16, 3) bool: p < ALPHA
    cases: np.ndarray  # (15,) cases each row scores
    mean_rows: np.ndarray  # (15,) bool: the rows the mean row averages (those every run serves)
    higher_is_better: bool
    unit: str
    note: str

    @property
    def title(self) -> str:
        return {"dice": "Dice", "hd95": "HD95"}.get(self.metric, self.metric)

    @property
    def mean_label(self) -> str:
        return f"mean of {int(self.mean_rows.sum())} rows"

    @property
    def others(self) -> list[int]:
        return [i for i in range(len(self.names)) if i != self.reference]


def _value(v: float) -> str:
    return MISSING if math.isnan(v) else f"{v:.2f}"


def _p(v: float) -> str:
    return MISSING if math.isnan(v) else f"{v:.3g}"


def _cell(t: MetricTable, run: int, row: int, region: int, bold=("**", "**"), mark=MARK) -> str:
    text = _value(t.values[run, row, region])
    if text == MISSING:
        return text
    text = f"{bold[0]}{text}{bold[1]}" if t.best[run, row, region] else text
    return text + mark if t.marked[run, row, region] else text


def _marks(row: int, present="●", absent="○") -> list[str]:
    if row == len(SUBSETS):
        return [""] * len(MODALITIES)
    return [present if m in SUBSETS[row] else absent for m in MODALITIES]


def _legend(t: MetricTable) -> str:
    best = "highest" if t.higher_is_better else "lowest"
    return (
        f"Bold: the {best} of the row and region; {MARK}: p < 0.05 against {t.names[t.reference]} (Wilcoxon "
        f"signed-rank over the cases, two-sided); {MISSING}: not served or no case; the mean is over the "
        f"{int(t.mean_rows.sum())} rows every run serves. {t.note}"
    )


def markdown(t: MetricTable) -> str:
    """The papers' layout, then the p-values against the reference."""
    head = [MODALITY_TITLES[m] for m in MODALITIES] + ["cases"] + [f"{n} {r}" for n in t.names for r in REGIONS]
    lines = [f"### {t.title} ({t.unit})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in range(len(SUBSETS) + 1):
        cases = str(int(t.cases[row])) if row < len(SUBSETS) else f"**{t.mean_label}**"
        cells = [_cell(t, i, row, r) for i in range(len(t.names)) for r in range(len(REGIONS))]
        lines.append("| " + " | ".join(_marks(row) + [cases] + cells) + " |")
    lines += ["", _legend(t), "", f"p-values against {t.names[t.reference]}:", ""]
    head = ["subset"] + [f"{t.names[i]} {r}" for i in t.others for r in REGIONS]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in range(len(SUBSETS) + 1):
        label = "+".join(MODALITY_TITLES[m] for m in SUBSETS[row]) if row < len(SUBSETS) else f"**{t.mean_label}**"
        lines.append(
            "| " + " | ".join([label] + [_p(t.p[i, row, r]) for i in t.others for r in range(len(REGIONS))]) + " |"
        )
    return "\n".join(lines) + "\n"


def csv(t: MetricTable) -> str:
    """One line per row: modality flags, cases, each run's values, each other run's p-values."""
    head = [
        "subset",
        *MODALITIES,
        "cases",
        *(f"{n} {r}" for n in t.names for r in REGIONS),
        *(f"p {t.names[i]} {r}" for i in t.others for r in REGIONS),
    ]
    lines = [",".join(head)]
    for row in range(len(SUBSETS) + 1):
        label = "+".join(SUBSETS[row]) if row < len(SUBSETS) else t.mean_label
        flags = [str(int(m in SUBSETS[row])) if row < len(SUBSETS) else "" for m in MODALITIES]
        cases = str(int(t.cases[row])) if row < len(SUBSETS) else ""
        values = [_value(t.values[i, row, r]) for i in range(len(t.names)) for r in range(len(REGIONS))]
        p = [_p(t.p[i, row, r]) for i in t.others for r in range(len(REGIONS))]
        lines.append(",".join([label, *flags, cases, *values, *p]))
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    for char, escaped in (
        ("\\", r"\textbackslash{}"),
        ("_", r"\_"),
        ("%", r"\%"),
        ("&", r"\&"),
        ("#", r"\#"),
        ("$", r"\$"),
    ):
        text = text.replace(char, escaped)
    return text


def latex(t: MetricTable) -> str:
    """A booktabs tabular (\\usepackage{booktabs}), one multicolumn block per run, daggers in math mode."""
    n_mod, n_reg = len(MODALITIES), len(REGIONS)
    spec = "c" * n_mod + "".join("|" + "c" * n_reg for _ in t.names)
    blocks = " & ".join(rf"\multicolumn{{{n_reg}}}{{c}}{{{_latex_escape(n)}}}" for n in t.names)
    rules = "".join(rf"\cmidrule(lr){{{n_mod + 1 + i * n_reg}-{n_mod + (i + 1) * n_reg}}}" for i in range(len(t.names)))
    lines = [
        f"% jaxbrats compare: {t.title} ({t.unit}). " + _legend(t).replace(MARK, "dagger"),
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(MODALITY_TITLES[m] for m in MODALITIES) + f" & {blocks} \\\\",
        rules,
        " & " * (n_mod - 1) + " & " + " & ".join(REGIONS * len(t.names)) + r" \\",
        r"\midrule",
    ]
    for row in range(len(SUBSETS) + 1):
        if row == len(SUBSETS):
            lines.append(r"\midrule")
        marks = (
            _marks(row, r"$\bullet$", r"$\circ$")
            if row < len(SUBSETS)
            else [rf"\multicolumn{{{n_mod}}}{{c}}{{Mean ({int(t.mean_rows.sum())} rows)}}"]
        )
        cells = [
            _cell(t, i, row, r, (r"\textbf{", "}"), r"$^\dagger$") for i in range(len(t.names)) for r in range(n_reg)
        ]
        lines.append(" & ".join(marks + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    files.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
    _pyplot().close(fig)


def mean_bars(t: MetricTable, path: Path) -> None:
    """Grouped bars of the mean row: one group per region, one bar per run, values printed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(REGIONS) * max(1, len(t.names) / 2), 4.0))
    width = 0.8 / len(t.names)
    for i, name in enumerate(t.names):
        x = np.arange(len(REGIONS)) + (i - (len(t.names) - 1) / 2) * width
        bars = ax.bar(x, np.nan_to_num(t.values[i, -1]), width, label=name)
        ax.bar_label(bars, labels=[_value(v) for v in t.values[i, -1]], fontsize=7)
    ax.set_xticks(range(len(REGIONS)), REGIONS)
    ax.set_ylabel(f"{t.title} ({t.unit})")
    ax.set_title(f"{t.title}: {t.mean_label} (those every run serves)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def difference_heatmap(t: MetricTable, path: Path) -> None:
    """Each other run minus the reference, per row and region; blue is better, a dagger where p < 0.05."""
    plt = _pyplot()
    columns = [(i, r) for i in t.others for r in range(len(REGIONS))]
    diff = np.stack([t.values[i, :, r] - t.values[t.reference, :, r] for i, r in columns], axis=1)
    limit = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 1.0
    cmap = "RdBu" if t.higher_is_better else "RdBu_r"
    fig, ax = plt.subplots(figsize=(3.6 + 0.8 * len(columns), 7.2))
    image = ax.imshow(np.ma.masked_invalid(diff), cmap=cmap, vmin=-limit or -1, vmax=limit or 1, aspect="auto")
    rows = ["+".join(MODALITY_TITLES[m] for m in s) for s in SUBSETS] + [t.mean_label]
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(columns)), [f"{t.names[i]}\n{REGIONS[r]}" for i, r in columns], fontsize=8)
    for (row, col), v in np.ndenumerate(diff):
        i, r = columns[col]
        text = MISSING if math.isnan(v) else f"{v:+.1f}" + (MARK if t.marked[i, row, r] else "")
        dark = not math.isnan(v) and abs(v) > 0.6 * limit
        ax.text(col, row, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    unit = "points" if t.unit == "%" else t.unit
    fig.colorbar(image, ax=ax, label=f"{t.title} difference ({unit})")
    ax.set_title(f"{t.title}: run - {t.names[t.reference]}")
    fig.tight_layout()
    _save(fig, path)


def _json_rows(t: MetricTable) -> list[dict]:
    def region_dict(values):
        return {r: None if math.isnan(v) else float(v) for r, v in zip(REGIONS, values)}

    rows = []
    for row in range(len(SUBSETS) + 1):
        rows.append(
            {
                "name": "+".join(SUBSETS[row]) if row < len(SUBSETS) else t.mean_label,
                "cases": int(t.cases[row]) if row < len(SUBSETS) else None,
                "values": {n: region_dict(t.values[i, row]) for i, n in enumerate(t.names)},
                "p": {t.names[i]: region_dict(t.p[i, row]) for i in t.others},
            }
        )
    return rows


def write_report(out_dir: Path, tables: dict[str, MetricTable], settings: dict, sources: list[str]) -> list[Path]:
    """Every file of a comparison; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric, t in tables.items():
        for suffix, render in ((".md", markdown), (".csv", csv), (".tex", latex)):
            written.append(out_dir / f"compare_{metric}{suffix}")
            files.write_text_atomic(written[-1], render(t))
        for name, draw in (("means", mean_bars), ("difference", difference_heatmap)):
            written.append(out_dir / f"{metric}_{name}.png")
            draw(t, written[-1])
    first = next(iter(tables.values()))
    summary = {
        "names": first.names,
        "reference": first.names[first.reference],
        "sources": sources,
        "settings": settings,
        "tables": {m: {"unit": t.unit, "note": t.note, "rows": _json_rows(t)} for m, t in tables.items()},
    }
    written.append(out_dir / "compare.json")
    files.write_text_atomic(written[-1], json.dumps(summary, indent=1) + "\n")
    return written
