"""Methods side by side, as the papers print them: `jaxbrats compare EVAL_DIR... --out DIR`.

Each EVAL_DIR is the output of `jaxbrats eval` (its ``cases/<id>.json``,
``summary.json`` and ``eval_settings.json``). The runs must have scored the
same cases, with the same modalities present, under the same HD95 empty-mask
convention and ET post-processing; anything else is refused in one line.

For Dice and for HD95 the output folder gets the papers' layout, one block
of WT / TC / ET columns per method, the 15 subset rows in the papers' order
and their mean:

- ``compare_<metric>.md``, ``.csv``, ``.tex`` (LaTeX: booktabs), the best
  value of each row and region in bold (highest Dice, lowest HD95; ties all
  bold, compared at the printed precision), a dagger on a method's value
  where the Wilcoxon signed-rank test against the reference gives p < 0.05;
- the p-values themselves: a second Markdown table, CSV columns, and
  ``compare.json`` (everything, machine-readable);
- ``<metric>_means.png``: grouped bars of the mean row;
  ``<metric>_difference.png``: each method minus the reference per row and
  region, daggers where p < 0.05.

Statistics, per row and region: a method's value is the mean over the cases
the row scores (those with all its modalities, as `evaluation.reports.summarize`:
HD95 NaNs of the "nan" convention left out), so the numbers equal each run's
summary.json. The paired test (`scipy.stats.wilcoxon`, two-sided, its
defaults) takes the cases both runs scored with a finite value. For the mean
row the test pairs each case's mean over the mean's rows (our choice: the
papers do not say how they test a mean). The mean row is over the rows every
compared run serves (all 15 for catch-all methods; a dedicated method's
students' rows otherwise), so that each run's mean covers the same rows; it
equals a run's summary.json mean when every run serves all 15. With n cases the
smallest two-sided p-value the exact test can give is 2 / 2^n: fewer than 6
cases can never reach p < 0.05. A row a run does not serve (a dedicated
method without that student) is a dash.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np

from jaxbrats.errors import JaxbratsError
from jaxbrats.evaluation.compare_report import MetricTable, write_report
from jaxbrats.evaluation.metrics import HD95_EMPTY
from jaxbrats.labels import REGIONS
from jaxbrats.modalities import MODALITIES, SUBSET_NAMES, SUBSETS

ALPHA = 0.05
ROWS = (*SUBSET_NAMES, "mean")
METRICS = {  # name: (case-file key, scale to print, higher is better, unit)
    "dice": ("dice", 100.0, True, "%"),
    "hd95": ("hd95", 1.0, False, "mm"),
}
# The settings two evaluations must share for their numbers to be comparable.
SHARED_SETTINGS = {
    "hd95_empty": "HD95 empty-mask convention",
    "et_postprocess": "ET post-processing",
    "et_min_voxels": "ET post-processing threshold",
}


@dataclasses.dataclass
class Run:
    """One evaluation: per-case values (cases, 15, 3), NaN where a row does not score the case."""

    name: str
    path: Path
    cases: list[str]
    present: dict[str, list[str]]
    applicable: np.ndarray  # (cases, 15) bool
    served: np.ndarray  # (15,) bool
    values: dict[str, np.ndarray]  # metric -> (cases, 15, 3)
    settings: dict  # the evaluation's `eval` settings


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise JaxbratsError(f"{path}: missing; is {path.parent} the output of `jaxbrats eval`?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JaxbratsError(f"{path}: not valid JSON ({e})") from None


def _case_values(case: dict, path: Path, key: str) -> np.ndarray:
    try:
        rows = {row["name"]: row for row in case["subsets"]}
        return np.asarray(
            [[np.nan if rows[s][key][r] is None else rows[s][key][r] for r in REGIONS] for s in SUBSET_NAMES], float
        )
    except (KeyError, TypeError) as e:
        raise JaxbratsError(f"{path}: not a jaxbrats case result (no {e})") from None


def load_run(path, name: str) -> Run:
    """Read one `jaxbrats eval` output folder."""
    path = Path(path)
    if not path.is_dir():
        raise JaxbratsError(f"{path}: no such evaluation folder")
    summary = _read_json(path / "summary.json")
    settings = _read_json(path / "eval_settings.json").get("eval", {})
    case_files = sorted((path / "cases").glob("*.json"))
    if not case_files:
        raise JaxbratsError(f"{path / 'cases'}: no per-case results")
    cases, present, applicable, values = [], {}, [], {m: [] for m in METRICS}
    for case_file in case_files:
        case = _read_json(case_file)
        cases.append(str(case.get("case", case_file.stem)))
        present[cases[-1]] = list(case.get("present", MODALITIES))
        applicable.append([bool(row.get("applicable", True)) for row in case.get("subsets", [])])
        for metric, (key, *_) in METRICS.items():
            values[metric].append(_case_values(case, case_file, key))
    served = np.asarray([row.get("served", True) for row in summary.get("subsets", [{}] * len(SUBSETS))], bool)
    return Run(
        name,
        path,
        cases,
        present,
        np.asarray(applicable, bool),
        served,
        {m: np.asarray(v) for m, v in values.items()},
        settings,
    )


def default_names(paths) -> list[str]:
    """A folder's name, or its parent's when it is called ``eval`` (the layout ``<run>/eval``)."""
    return [Path(p).resolve().parent.name if Path(p).name == "eval" else Path(p).name for p in paths]


def _listing(ids, limit=5) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def check_comparable(runs: list[Run]) -> dict:
    """One line for the first difference that makes the runs' numbers incomparable; the shared settings."""
    first = runs[0]
    for run in runs[1:]:
        missing, extra = set(first.cases) - set(run.cases), set(run.cases) - set(first.cases)
        if missing or extra:
            raise JaxbratsError(
                f"{run.path}: scored other cases than {first.path}"
                + (f"; missing {_listing(missing)}" if missing else "")
                + (f"; extra {_listing(extra)}" if extra else "")
            )
        changed = [c for c in first.cases if sorted(first.present[c]) != sorted(run.present[c])]
        if changed:
            raise JaxbratsError(
                f"{run.path}: case {changed[0]} has modalities {run.present[changed[0]]} there "
                f"but {first.present[changed[0]]} in {first.path}"
            )
        for key, what in SHARED_SETTINGS.items():
            if first.settings.get(key) != run.settings.get(key):
                raise JaxbratsError(
                    f"{run.path}: evaluated with {what} {run.settings.get(key)!r}, {first.path} with "
                    f"{first.settings.get(key)!r}; re-evaluate one with --set eval.{key}=..."
                )
    return {key: first.settings.get(key) for key in SHARED_SETTINGS}


def _aligned(run: Run, order: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    index = [run.cases.index(c) for c in order]
    return run.applicable[index], {m: v[index] for m, v in run.values.items()}


def _quiet_nanmean(values, axis):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # rows without a value
        return np.nanmean(values, axis=axis)


def row_means(values: np.ndarray, served: np.ndarray, mean_rows: np.ndarray) -> np.ndarray:
    """(16, 3): each row's mean over its cases (NaN where none or not served), then the mean of the
    `mean_rows` (15,) bool."""
    rows = np.where(served[:, None], _quiet_nanmean(values, axis=0), np.nan)
    mean = _quiet_nanmean(rows[mean_rows], axis=0) if mean_rows.any() else np.full(len(REGIONS), np.nan)
    return np.concatenate([rows, mean[None]])


def wilcoxon_p(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired values (scipy's defaults) over the finite pairs."""
    from scipy import stats

    keep = np.isfinite(x) & np.isfinite(y)
    if not keep.any():
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all differences zero: scipy says p = 1
        return float(stats.wilcoxon(x[keep], y[keep]).pvalue)


def paired_p_values(values: np.ndarray, reference: np.ndarray, served: np.ndarray, mean_rows: np.ndarray) -> np.ndarray:
    """(16, 3) p-values of a run's per-case values against the reference's (NaN where not testable),
    the rows both serve; the mean row pairs each case's mean over the `mean_rows`."""
    out = np.full((len(ROWS), len(REGIONS)), np.nan)
    for s in np.flatnonzero(served):
        for r in range(len(REGIONS)):
            out[s, r] = wilcoxon_p(values[:, s, r], reference[:, s, r])
    both = mean_rows[None, :, None] & np.isfinite(values) & np.isfinite(reference)
    per_case = [_quiet_nanmean(np.where(both, v, np.nan), axis=1) for v in (values, reference)]
    for r in range(len(REGIONS)):
        out[-1, r] = wilcoxon_p(per_case[0][:, r], per_case[1][:, r])
    return out


def _best(table: np.ndarray, scale: float, higher: bool) -> np.ndarray:
    """(methods, 16, 3) bool: the best value of each row and region at the printed precision."""
    shown = np.round(table * scale, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        best = np.nanmax(shown, axis=0) if higher else np.nanmin(shown, axis=0)
    return (shown == best[None]) & (np.sum(np.isfinite(shown), axis=0) > 1)[None]


def compare_metric(runs: list[Run], reference: int, metric: str, note: str) -> MetricTable:
    """The table of one metric: means, p-values against the reference (NaN for itself), best and marked cells."""
    order = runs[reference].cases
    aligned = [_aligned(run, order) for run in runs]
    ref_values, cases = aligned[reference][1][metric], aligned[reference][0].sum(axis=0)
    mean_rows = np.logical_and.reduce([run.served for run in runs]) & (cases > 0)  # rows every run has
    means = np.stack([row_means(values[metric], run.served, mean_rows) for run, (_, values) in zip(runs, aligned)])
    p = np.stack(
        [
            np.full((len(ROWS), len(REGIONS)), np.nan)
            if i == reference
            else paired_p_values(values[metric], ref_values, run.served & runs[reference].served, mean_rows)
            for i, (run, (_, values)) in enumerate(zip(runs, aligned))
        ]
    )
    _, scale, higher, unit = METRICS[metric]
    return MetricTable(
        metric=metric,
        names=[run.name for run in runs],
        reference=reference,
        values=means * scale,
        p=p,
        best=_best(means, scale, higher),
        marked=p < ALPHA,
        cases=cases,
        mean_rows=mean_rows,
        higher_is_better=higher,
        unit=unit,
        note=note,
    )


def compare(paths, out_dir, names=None, reference: str | None = None) -> dict:
    """Write the comparison of the evaluations in `paths` to `out_dir`; return what was written."""
    if len(paths) < 2:
        raise JaxbratsError("compare needs at least two evaluation folders")
    names = list(names) if names else default_names(paths)
    if len(names) != len(paths):
        raise JaxbratsError(f"--names has {len(names)} names for {len(paths)} evaluation folders")
    if len(set(names)) != len(names):
        raise JaxbratsError(f"two runs have one name ({', '.join(names)}); give each its own with --names a,b,...")
    reference = names[0] if reference is None else reference
    if reference not in names:
        raise JaxbratsError(f"--reference {reference!r} is none of the runs: {', '.join(names)}")
    runs = [load_run(p, n) for p, n in zip(paths, names)]
    settings = check_comparable(runs)
    ref = names.index(reference)
    cases = len(runs[ref].cases)
    notes = {
        "dice": f"Dice in percent, mean over the cases each row scores ({cases} cases)",
        "hd95": empty_convention_note(settings),
    }
    post = "on" if settings.get("et_postprocess") else "off"
    tables = {m: compare_metric(runs, ref, m, f"{notes[m]}; ET post-processing {post}.") for m in METRICS}
    written = write_report(Path(out_dir), tables, settings, [str(Path(p)) for p in paths])
    return {"names": names, "reference": reference, "tables": tables, "settings": settings, "written": written}


def empty_convention_note(settings: dict) -> str:
    name = settings.get("hd95_empty") or "brats"
    both, one = HD95_EMPTY.get(name, (float("nan"),) * 2)
    return f"HD95 in mm, empty-mask convention '{name}': both masks empty -> {both:g}, exactly one empty -> {one:g}" + (
        " (NaNs left out of the means)" if name == "nan" else ""
    )
