"""The files `jaxbrats compare` writes: one metric's comparison as Markdown, CSV, LaTeX and charts.

The statistics are `compare`'s (and `compare_stats`'); this module only
renders a `MetricTable` (see `compare` for what the numbers mean). Every file is written beside its
final name and renamed into place (`files.write_atomic`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from jaxbrats import files
from jaxbrats.evaluation.compare_stats import ALPHA, Statistics
from jaxbrats.labels import REGIONS
from jaxbrats.modalities import MODALITIES, SUBSETS

MARK = "†"  # corrected p < ALPHA against the reference
MISSING = "-"  # a row a run does not serve, or one without a case
PRINTED = "{:.2f}"  # a value in the tables; bold compares values as printed (`compare._best`)
MODALITY_TITLES = {"flair": "FLAIR", "t1ce": "T1ce", "t1": "T1", "t2": "T2"}


@dataclasses.dataclass
class MetricTable:
    """One metric of several runs: 15 subset rows + the mean row, 3 regions."""

    metric: str  # "dice", "hd95", "lesion_dice" or "lesion_hd95"
    names: list[str]  # the runs, then the papers' columns
    reference: int  # index into names
    values: np.ndarray  # (runs, 16, 3), in print units (Dice in percent); NaN: not served / no case
    p: np.ndarray  # (runs, 16, 3) raw, against the reference; NaN for the reference, papers, untestable cells
    best: np.ndarray  # (runs, 16, 3) bool
    marked: np.ndarray  # (runs, 16, 3) bool: corrected p < ALPHA
    cases: np.ndarray  # (15,) cases each row scores
    mean_rows: np.ndarray  # (15,) bool: the rows the mean row averages (those every run serves)
    higher_is_better: bool
    unit: str
    note: str
    p_adjusted: np.ndarray | None = None  # (runs, 16, 3): `p` corrected, one family per run; None: = p
    difference: np.ndarray | None = None  # (runs, 16, 3, 3): paired mean difference, CI low, high (print units)
    papers: list[str] = dataclasses.field(default_factory=list)  # the papers' columns' sources (the last columns)
    statistics: Statistics = dataclasses.field(default_factory=Statistics)

    def __post_init__(self):
        self.p_adjusted = self.p if self.p_adjusted is None else self.p_adjusted
        if self.difference is None:
            self.difference = np.full((*self.p.shape, 3), np.nan)

    @property
    def title(self) -> str:
        titles = {"dice": "Dice", "hd95": "HD95", "lesion_dice": "Lesion-wise Dice", "lesion_hd95": "Lesion-wise HD95"}
        return titles.get(self.metric, self.metric)

    @property
    def mean_label(self) -> str:
        return f"mean of {int(self.mean_rows.sum())} rows"

    @property
    def others(self) -> list[int]:
        return [i for i in range(len(self.names)) if i != self.reference]

    @property
    def tested(self) -> list[int]:
        """The runs tested against the reference (not the reference, not the papers)."""
        return [i for i in self.others if i < len(self.names) - len(self.papers)]


def _value(v: float) -> str:
    return MISSING if math.isnan(v) else PRINTED.format(v)


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


def correction_note(t: MetricTable) -> str:
    """Which correction, over which family of tests."""
    stats, ref = t.statistics, t.names[t.reference]
    sizes = {t.names[i]: int(np.isfinite(t.p[i]).sum()) for i in t.tested}
    counts = ", ".join(f"{n} {k}" for n, k in sizes.items())
    if not sizes:
        return (
            f"Multiple testing: {stats.correction_name} correction of each run's tests against {ref}; no run is "
            "tested here (papers' columns never are)."
        )
    if stats.correction == "none":
        return f"Multiple testing: no correction; raw p-values ({counts} tests against {ref})."
    kind = "family-wise error rate" if stats.correction == "holm" else "false discovery rate"
    return (
        f"Multiple testing: {stats.correction_name} correction ({kind} {ALPHA:g}); each run's tests against {ref} "
        f"in this table (15 rows + mean, x 3 regions: {counts}) are one family; raw p-values in compare.json."
    )


def paper_note(t: MetricTable) -> str:
    if not t.papers:
        return ""
    return (
        " Papers' columns are their published means (not these cases): no test, no interval; their mean row is "
        "computed here over the same rows. " + " ".join(f"{source}." for source in t.papers)
    )


def _legend(t: MetricTable) -> str:
    best = "highest" if t.higher_is_better else "lowest"
    none = t.statistics.correction == "none"
    corrected = "uncorrected" if none else f"after {t.statistics.correction_name}'s correction"
    return (
        f"Bold: the {best} of the row and region; {MARK}: p < {ALPHA:g} against {t.names[t.reference]} "
        f"{corrected} (Wilcoxon signed-rank over the cases, two-sided); {MISSING}: not "
        f"served, no case or not tested; the mean is over the {int(t.mean_rows.sum())} rows every column serves. "
        f"{t.note} {correction_note(t)}{paper_note(t)}"
    )


def _difference(v: np.ndarray) -> str:
    """ "+1.20 [-0.30, 2.80]": the mean difference and its interval; the mean alone without a bootstrap."""
    if math.isnan(v[0]):
        return MISSING
    return f"{v[0]:+.2f}" + ("" if math.isnan(v[1]) else f" [{v[1]:+.2f}, {v[2]:+.2f}]")


def _row_label(t: MetricTable, row: int) -> str:
    return "+".join(MODALITY_TITLES[m] for m in SUBSETS[row]) if row < len(SUBSETS) else f"**{t.mean_label}**"


def markdown(t: MetricTable) -> str:
    """The papers' layout, then the p-values against the reference."""
    head = [MODALITY_TITLES[m] for m in MODALITIES] + ["cases"] + [f"{n} {r}" for n in t.names for r in REGIONS]
    lines = [f"### {t.title} ({t.unit})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in range(len(SUBSETS) + 1):
        cases = str(int(t.cases[row])) if row < len(SUBSETS) else f"**{t.mean_label}**"
        cells = [_cell(t, i, row, r) for i in range(len(t.names)) for r in range(len(REGIONS))]
        lines.append("| " + " | ".join(_marks(row) + [cases] + cells) + " |")
    lines += ["", _legend(t)]
    if not t.tested:
        return "\n".join(lines) + "\n"
    stats, ref = t.statistics, t.names[t.reference]
    adjusted = "raw" if stats.correction == "none" else f"{stats.correction_name}-adjusted"
    lines += ["", f"p-values against {ref}, {adjusted}:", ""]
    head = ["subset"] + [f"{t.names[i]} {r}" for i in t.tested for r in REGIONS]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in range(len(SUBSETS) + 1):
        cells = [_p(t.p_adjusted[i, row, r]) for i in t.tested for r in range(len(REGIONS))]
        lines.append("| " + " | ".join([_row_label(t, row)] + cells) + " |")
    lines += ["", correction_note(t)]
    interval = f" [{stats.confidence:.0%} CI]" if stats.resamples else ""
    unit = "points" if t.unit == "%" else t.unit
    lines += ["", f"Mean difference from {ref} ({unit}){interval}, paired over the cases:", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in range(len(SUBSETS) + 1):
        cells = [_difference(t.difference[i, row, r]) for i in t.tested for r in range(len(REGIONS))]
        lines.append("| " + " | ".join([_row_label(t, row)] + cells) + " |")
    lines += ["", bootstrap_note(t)]
    return "\n".join(lines) + "\n"


def bootstrap_note(t: MetricTable) -> str:
    stats = t.statistics
    how = "the run's values minus the reference's over the cases both scored (the mean row: each case's mean "
    how += "over its rows)"
    if not stats.resamples:
        return f"Differences: {how}; no confidence intervals (--bootstrap 0)."
    return (
        f"Differences: {how}; intervals: percentile bootstrap of the cases, {stats.resamples} resamples, seed "
        f"{stats.seed}, {stats.confidence:.0%}, not corrected for multiple testing."
    )


def csv(t: MetricTable) -> str:
    """One line per row: modality flags, cases, each column's values, each tested run's raw p-values, corrected
    p-values (named by the correction, e.g. "p_holm"), mean differences and interval bounds."""
    kinds = [("p", "p"), (f"p_{t.statistics.correction}", "p_adjusted"), ("diff", 0), ("ci_low", 1), ("ci_high", 2)]
    head = [
        "subset",
        *MODALITIES,
        "cases",
        *(f"{n} {r}" for n in t.names for r in REGIONS),
        *(f"{k} {t.names[i]} {r}" for k, _ in kinds for i in t.tested for r in REGIONS),
    ]
    lines = [",".join(head)]
    for row in range(len(SUBSETS) + 1):
        label = "+".join(SUBSETS[row]) if row < len(SUBSETS) else t.mean_label
        flags = [str(int(m in SUBSETS[row])) if row < len(SUBSETS) else "" for m in MODALITIES]
        cases = str(int(t.cases[row])) if row < len(SUBSETS) else ""
        values = [_value(t.values[i, row, r]) for i in range(len(t.names)) for r in range(len(REGIONS))]
        stats = [
            _p(getattr(t, what)[i, row, r]) if isinstance(what, str) else _value(t.difference[i, row, r, what])
            for _, what in kinds
            for i in t.tested
            for r in range(len(REGIONS))
        ]
        lines.append(",".join([label, *flags, cases, *values, *stats]))
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
                "p": {t.names[i]: region_dict(t.p[i, row]) for i in t.tested},
                "p_adjusted": {t.names[i]: region_dict(t.p_adjusted[i, row]) for i in t.tested},
                "difference": {t.names[i]: region_dict(t.difference[i, row, :, 0]) for i in t.tested},
                "ci": {
                    t.names[i]: {
                        r: None if math.isnan(lo) else [float(lo), float(hi)]
                        for r, (lo, hi) in zip(REGIONS, t.difference[i, row, :, 1:])
                    }
                    for i in t.tested
                },
            }
        )
    return rows


def write_report(
    out_dir: Path, tables: dict[str, MetricTable], settings: dict, sources: list[str], papers: dict | None = None
) -> list[Path]:
    """Every file of a comparison (`papers`: each paper column's source, for compare.json); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric, t in tables.items():
        for suffix, render in ((".md", markdown), (".csv", csv), (".tex", latex)):
            written.append(out_dir / f"compare_{metric}{suffix}")
            files.write_text_atomic(written[-1], render(t))
        for name, draw in (("means", mean_bars), ("difference", difference_heatmap)):
            if name == "difference" and not t.others:
                continue  # one run alone (a paper without this metric): nothing to subtract
            written.append(out_dir / f"{metric}_{name}.png")
            draw(t, written[-1])
    first = next(iter(tables.values()))
    stats = first.statistics
    summary = {
        "names": first.names,
        "reference": first.names[first.reference],
        "sources": sources,
        "settings": settings,
        "papers": papers or {},
        "statistics": {
            "test": "Wilcoxon signed-rank, two-sided (scipy.stats.wilcoxon defaults)",
            "alpha": ALPHA,
            "correction": stats.correction,
            "family": "each run's tests against the reference in one table (15 rows + mean, x 3 regions)",
            "bootstrap_resamples": stats.resamples,
            "seed": stats.seed,
            "confidence": stats.confidence,
        },
        "tables": {
            m: {
                "names": t.names,
                "unit": t.unit,
                "note": t.note,
                "correction": correction_note(t),
                "rows": _json_rows(t),
            }
            for m, t in tables.items()
        },
    }
    written.append(out_dir / "compare.json")
    files.write_text_atomic(written[-1], json.dumps(summary, indent=1) + "\n")
    return written
