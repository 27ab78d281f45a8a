"""The summary of an evaluation and its reports: summary.json, summary.md, summary.csv, the heatmap.

`summarize` turns the per-case values of an evaluation (`evaluation.program.evaluate`) into
means per subset row and over the rows; `write_reports` writes, each atomically
(`files.write_atomic`):

- ``summary.json``::

    {"regions": ["WT", "TC", "ET"],
     "subsets": [{"name": "flair", "modalities": ["flair"], "cases": n, "served": true,
                  "dice": {"WT": .., "TC": .., "ET": ..}, "hd95": {...}}, ... 15 rows],
     "mean": {"rows": k, "dice": {...}, "hd95": {...}}, "cases": N}

  ``cases``: the cases a row scores (those with all its modalities; 0: its
  values are null); ``served``: false where the method has no model for the
  subset (null values); ``mean``: over the ``k`` rows with at least one case;
  ``cases`` at the top: all cases evaluated.
- ``summary.md`` and ``summary.csv``: the papers' layout (one row per subset,
  a mark per modality present) plus the number of cases of each row, Dice in
  percent, HD95 in mm, ``-`` for a row without an applicable case
  (`markdown_table`, `csv_table`);
- ``dice_heatmap.png``: Dice per row and region, rows named with their case
  count, such a row grey with dashes (`heatmap`).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np

from jaxbrats import files
from jaxbrats.config import EvalConfig
from jaxbrats.evaluation.figures import save_figure
from jaxbrats.labels import REGIONS
from jaxbrats.modalities import MODALITIES, SUBSET_NAMES, SUBSETS


def region_row(values) -> dict:
    """{region: value}, null where NaN: a row of summary.json and cases/*.json."""
    return {r: (None if math.isnan(v) else float(v)) for r, v in zip(REGIONS, values)}


def summarize(dice: np.ndarray, hd: np.ndarray, applicable=None) -> dict:
    """Means over the applicable cases of each subset (`applicable` (cases, 15) bool, default all),
    then over the rows that have at least one case; HD95 NaNs (convention "nan") are left out.
    A row without an applicable case has ``"cases": 0`` and null values."""
    dice, hd = np.asarray(dice, float), np.asarray(hd, float)
    allowed = np.ones(dice.shape[:2], bool) if applicable is None else np.asarray(applicable, bool)
    counts = allowed.sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN columns, rows without cases
        dice_mean = np.stack(
            [
                dice[allowed[:, s], s].mean(axis=0) if counts[s] else np.full(len(REGIONS), np.nan)
                for s in range(len(SUBSETS))
            ]
        )
        hd_mean = np.stack(
            [
                np.nanmean(hd[allowed[:, s], s], axis=0) if counts[s] else np.full(len(REGIONS), np.nan)
                for s in range(len(SUBSETS))
            ]
        )
        subsets = [
            {
                "name": SUBSET_NAMES[s],
                "modalities": list(SUBSETS[s]),
                "cases": int(counts[s]),
                "dice": region_row(dice_mean[s]),
                "hd95": region_row(hd_mean[s]),
            }
            for s in range(len(SUBSETS))
        ]
        rows = counts > 0
        mean = {
            "rows": int(rows.sum()),
            "dice": region_row(dice_mean[rows].mean(axis=0) if rows.any() else np.full(len(REGIONS), np.nan)),
            "hd95": region_row(np.nanmean(hd_mean[rows], axis=0) if rows.any() else np.full(len(REGIONS), np.nan)),
        }
    return {
        "regions": list(REGIONS),
        "subsets": subsets,
        "mean": mean,
        "cases": int(dice.shape[0]),
    }


NOT_APPLICABLE = "-"  # a table cell of a row without an applicable case


def _fmt(value, scale=1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.2f}"


def _cells(row: dict, key: str, scale=1.0) -> list[str]:
    if row.get("cases", 1) == 0:
        return [NOT_APPLICABLE] * len(REGIONS)
    return [_fmt(row[key][r], scale) for r in REGIONS]


def _mean_label(summary: dict) -> str:
    return f"mean of {summary['mean'].get('rows', len(SUBSETS))}/{len(SUBSETS)} rows"


def markdown_table(summary: dict, cfg: EvalConfig) -> str:
    """The papers' layout: one row per subset, a mark per modality present, the number of cases the
    row scores, Dice in percent; a row without an applicable case shows dashes."""
    head = (
        "| "
        + " | ".join(m for m in MODALITIES)
        + " | cases | "
        + " | ".join(f"Dice {r}" for r in REGIONS)
        + " | "
        + " | ".join(f"HD95 {r}" for r in REGIONS)
        + " |"
    )
    lines = [head, "|" + "---|" * (len(MODALITIES) + 1 + 2 * len(REGIONS))]
    for row in summary["subsets"]:
        marks = ["●" if m in row["modalities"] else "○" for m in MODALITIES]
        n = str(row.get("cases", summary["cases"]))
        lines.append(
            "| "
            + " | ".join(marks)
            + f" | {n} | "
            + " | ".join(_cells(row, "dice", 100))
            + " | "
            + " | ".join(_cells(row, "hd95"))
            + " |"
        )
    mean = summary["mean"]
    rows = mean.get("rows", len(SUBSETS))
    lines.append(
        f"| **mean** | | | | {rows}/{len(SUBSETS)} rows | "
        + " | ".join(_fmt(mean["dice"][r], 100) for r in REGIONS)
        + " | "
        + " | ".join(_fmt(mean["hd95"][r]) for r in REGIONS)
        + " |"
    )
    note = (
        f"\n{summary['cases']} case(s); a row scores the cases that have all its modalities"
        f" ({NOT_APPLICABLE}: none), the mean is over the {rows} of {len(SUBSETS)} rows that have a case."
        f" Dice in percent; HD95 in mm, empty-mask convention '{cfg.hd95_empty}'"
        + ("" if cfg.hd95 else " (HD95 not computed)")
        + f"; ET post-processing {'on' if cfg.et_postprocess else 'off'}.\n"
    )
    return "\n".join(lines) + "\n" + note


def csv_table(summary: dict) -> str:
    """One line per subset (`cases`: how many it scores; dashes when none) and a last line,
    ``mean of K/15 rows``, over the rows that have a case."""
    head = ["subset", *MODALITIES, "cases", *(f"dice_{r}_percent" for r in REGIONS), *(f"hd95_{r}_mm" for r in REGIONS)]
    lines = [",".join(head)]
    for row in summary["subsets"]:
        present = [str(int(m in row["modalities"])) for m in MODALITIES]
        n = str(row.get("cases", summary["cases"]))
        lines.append(",".join([row["name"], *present, n, *_cells(row, "dice", 100), *_cells(row, "hd95")]))
    mean = summary["mean"]
    lines.append(
        ",".join(
            [
                _mean_label(summary),
                *[""] * len(MODALITIES),
                "",
                *(_fmt(mean["dice"][r], 100) for r in REGIONS),
                *(_fmt(mean["hd95"][r]) for r in REGIONS),
            ]
        )
    )
    return "\n".join(lines) + "\n"


def heatmap(summary: dict, path: Path) -> None:
    """The Dice of each row and region as a PNG at `path` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Each row named with the number of cases it scores; a row without one is grey with dashes.
    names = [f"{row['name']} (n={row.get('cases', summary['cases'])})" for row in summary["subsets"]] + [
        _mean_label(summary)
    ]
    rows = [[row["dice"][r] for r in REGIONS] for row in summary["subsets"]] + [
        [summary["mean"]["dice"][r] for r in REGIONS]
    ]
    values = np.asarray([[np.nan if v is None else v for v in row] for row in rows], float)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    fig, ax = plt.subplots(figsize=(5.2, 7.2))
    ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(REGIONS)), REGIONS)
    ax.set_yticks(range(len(names)), names)
    for (i, j), v in np.ndenumerate(values):
        text = NOT_APPLICABLE if np.isnan(v) else f"{100 * v:.1f}"
        ax.text(j, i, text, ha="center", va="center", color="black" if np.isnan(v) or v >= 0.6 else "white", fontsize=8)
    ax.set_title(f"Dice (%), {summary['cases']} case(s)")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def write_reports(summary: dict, out_dir: Path, cfg: EvalConfig) -> None:
    """summary.json, summary.md, summary.csv and dice_heatmap.png in `out_dir` (module docstring)."""
    files.write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    files.write_text_atomic(out_dir / "summary.md", markdown_table(summary, cfg))
    files.write_text_atomic(out_dir / "summary.csv", csv_table(summary))
    heatmap(summary, out_dir / "dice_heatmap.png")
