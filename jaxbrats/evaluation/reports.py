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
  ``cases`` at the top: all cases evaluated. With ``eval.lesion_wise`` each row and the mean
  also hold ``"lesion_dice"`` and ``"lesion_hd95"`` (BraTS 2023's lesion-wise scores,
  `evaluation.lesion`), and the tables show them after the global scores.
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
from jaxbrats.evaluation.lesion import CHALLENGE, CHALLENGES, PENALTY
from jaxbrats.labels import REGIONS
from jaxbrats.modalities import MODALITIES, SUBSET_NAMES, SUBSETS


def region_row(values) -> dict:
    """{region: value}, null where NaN: a row of summary.json and cases/*.json."""
    return {r: (None if math.isnan(v) else float(v)) for r, v in zip(REGIONS, values)}


def summarize(dice: np.ndarray, hd: np.ndarray, applicable=None, lesions=None) -> dict:
    """Means over the applicable cases of each subset (`applicable` (cases, 15) bool, default all),
    then over the rows that have at least one case; HD95 NaNs (convention "nan") are left out.
    A row without an applicable case has ``"cases": 0`` and null values. `lesions` (cases, 2, 15, 3):
    BraTS 2023's lesion-wise Dice and HD95 (`evaluation.lesion`), summarised as "lesion_dice" and
    "lesion_hd95" beside the global scores."""
    dice, hd = np.asarray(dice, float), np.asarray(hd, float)
    allowed = np.ones(dice.shape[:2], bool) if applicable is None else np.asarray(applicable, bool)
    counts = allowed.sum(axis=0)
    rows = counts > 0
    scores = {"dice": dice, "hd95": hd}
    if lesions is not None:
        lesions = np.asarray(lesions, float)
        scores.update(lesion_dice=lesions[:, 0], lesion_hd95=lesions[:, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN columns, rows without cases
        # HD95 may be NaN on a case (convention "nan"): left out of its means; Dice never is.
        average = {key: np.mean if key == "dice" else np.nanmean for key in scores}
        means = {
            key: np.stack(
                [
                    average[key](values[allowed[:, s], s], axis=0) if counts[s] else np.full(len(REGIONS), np.nan)
                    for s in range(len(SUBSETS))
                ]
            )
            for key, values in scores.items()
        }
        subsets = [
            {
                "name": SUBSET_NAMES[s],
                "modalities": list(SUBSETS[s]),
                "cases": int(counts[s]),
                **{key: region_row(m[s]) for key, m in means.items()},
            }
            for s in range(len(SUBSETS))
        ]
        mean = {
            "rows": int(rows.sum()),
            **{
                key: region_row(average[key](m[rows], axis=0) if rows.any() else np.full(len(REGIONS), np.nan))
                for key, m in means.items()
            },
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


#: The scores a table shows, in order: (key of summary.json, column name, scale to the unit shown);
#: the lesion-wise ones only when the evaluation computed them (`eval.lesion_wise`).
SCORES = (
    ("dice", "Dice", 100),
    ("hd95", "HD95", 1),
    ("lesion_dice", "lesion Dice", 100),
    ("lesion_hd95", "lesion HD95", 1),
)


def _scores(summary: dict) -> list[tuple[str, str, float]]:
    return [score for score in SCORES if score[0] in summary["mean"]]


def _lesion_note(summary: dict) -> str:
    if "lesion_dice" not in summary["mean"]:
        return ""
    dilation, threshold = CHALLENGES[CHALLENGE]
    return (
        f" Lesion-wise: BraTS 2023's rules ({CHALLENGE}: 26-connected lesions, the truth's merged within"
        f" {dilation} dilations, lesions of at most {threshold:g} mm^3 left out; each missed or false lesion"
        f" scores Dice 0 and HD95 {PENALTY:g} mm)."
    )


def markdown_table(summary: dict, cfg: EvalConfig) -> str:
    """The papers' layout: one row per subset, a mark per modality present, the number of cases the
    row scores, Dice in percent (then HD95, and the lesion-wise scores when computed); a row without
    an applicable case shows dashes."""
    scores = _scores(summary)
    head = "| " + " | ".join(MODALITIES) + " | cases | " + " | ".join(f"{n} {r}" for _, n, _ in scores for r in REGIONS)
    lines = [head + " |", "|" + "---|" * (len(MODALITIES) + 1 + len(scores) * len(REGIONS))]
    for row in summary["subsets"]:
        marks = ["●" if m in row["modalities"] else "○" for m in MODALITIES]
        n = str(row.get("cases", summary["cases"]))
        cells = [c for key, _, scale in scores for c in _cells(row, key, scale)]
        lines.append("| " + " | ".join(marks) + f" | {n} | " + " | ".join(cells) + " |")
    mean = summary["mean"]
    rows = mean.get("rows", len(SUBSETS))
    cells = [_fmt(mean[key][r], scale) for key, _, scale in scores for r in REGIONS]
    lines.append(f"| **mean** | | | | {rows}/{len(SUBSETS)} rows | " + " | ".join(cells) + " |")
    note = (
        f"\n{summary['cases']} case(s); a row scores the cases that have all its modalities"
        f" ({NOT_APPLICABLE}: none), the mean is over the {rows} of {len(SUBSETS)} rows that have a case."
        f" Dice in percent; HD95 in mm, empty-mask convention '{cfg.hd95_empty}'"
        + ("" if cfg.hd95 else " (HD95 not computed)")
        + f"; ET post-processing {'on' if cfg.et_postprocess else 'off'}."
        + _lesion_note(summary)
        + "\n"
    )
    return "\n".join(lines) + "\n" + note


def csv_table(summary: dict) -> str:
    """One line per subset (`cases`: how many it scores; dashes when none) and a last line,
    ``mean of K/15 rows``, over the rows that have a case."""
    scores = _scores(summary)
    units = [f"{key}_{r}_{'percent' if scale == 100 else 'mm'}" for key, _, scale in scores for r in REGIONS]
    lines = [",".join(["subset", *MODALITIES, "cases", *units])]
    for row in summary["subsets"]:
        present = [str(int(m in row["modalities"])) for m in MODALITIES]
        n = str(row.get("cases", summary["cases"]))
        lines.append(",".join([row["name"], *present, n, *(c for k, _, sc in scores for c in _cells(row, k, sc))]))
    mean = summary["mean"]
    cells = [_fmt(mean[key][r], scale) for key, _, scale in scores for r in REGIONS]
    lines.append(",".join([_mean_label(summary), *[""] * len(MODALITIES), "", *cells]))
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
