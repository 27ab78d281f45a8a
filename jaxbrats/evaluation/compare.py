"""Methods side by side, as the papers print them: `jaxbrats compare EVAL_DIR... --out DIR`.

Each EVAL_DIR is the output of `jaxbrats eval` (its ``cases/<id>.json``,
``summary.json`` and ``eval_settings.json``). The runs must have scored the
same cases, with the same modalities present, under the same HD95 empty-mask
convention and ET post-processing; anything else is refused in one line.
``--paper NAME[:METHOD]`` adds a published table (`evaluation.published`)
as a column: one evaluation and a paper are enough.

For Dice and for HD95 (and the lesion-wise pair when every run has it) the
output folder gets the papers' layout, one block of WT / TC / ET columns per
method, the 15 subset rows in the papers' order and their mean:

- ``compare_<metric>.md``, ``.csv``, ``.tex`` (LaTeX: booktabs), the best
  value of each row and region in bold (highest Dice, lowest HD95; ties all
  bold, compared at the printed precision), a dagger on a method's value
  where the Wilcoxon signed-rank test against the reference, corrected for
  multiple testing, gives p < 0.05;
- the p-values (corrected; the raw ones too in CSV and JSON), the mean
  differences from the reference with bootstrap confidence intervals, and
  ``compare.json`` (everything, machine-readable);
- ``<metric>_means.png``: grouped bars of the mean row;
  ``<metric>_difference.png``: each method minus the reference per row and
  region, daggers where the corrected p < 0.05.

Statistics, per row and region: a method's value is the mean over the cases
the row scores (those with all its modalities, as `evaluation.reports.summarize`:
HD95 NaNs of the "nan" convention left out), so the numbers equal each run's
summary.json. The paired test (`scipy.stats.wilcoxon`, two-sided, its
defaults) takes the cases both runs scored with a finite value. For the mean
row the test pairs each case's mean over the mean's rows (our choice: the
papers do not say how they test a mean). The 48 tests (16 rows x 3 regions)
of one run against the reference in one table are one family, corrected
together (Holm by default, `compare_stats`). The confidence interval of a
difference is a percentile bootstrap over the same pairs. The mean row is
over the rows every compared column serves (all 15 for catch-all methods; a
dedicated method's students' rows otherwise), so that each mean covers the
same rows; it equals a run's summary.json mean when every column serves all
15. A paper's column has no cases: it is shown, never tested, and its mean row
is computed here over the same rows. With n cases the smallest two-sided
p-value the exact test can give is 2 / 2^n: fewer than 6 cases can never
reach p < 0.05 (before correction). A row a run does not serve (a dedicated
method without that student) is a dash.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np

from jaxbrats.errors import JaxbratsError
from jaxbrats.evaluation.compare_report import PRINTED, MetricTable, write_report
from jaxbrats.evaluation.compare_stats import (
    ALPHA,
    CORRECTIONS,
    Bootstrap,
    Statistics,
    adjust,
    uniforms,
    wilcoxon_p,
)
from jaxbrats.evaluation.metrics import HD95_EMPTY
from jaxbrats.labels import REGIONS
from jaxbrats.modalities import MODALITIES, SUBSET_NAMES, SUBSETS

ROWS = (*SUBSET_NAMES, "mean")
METRICS = {  # name: (case-file key, scale to print, higher is better, unit)
    "dice": ("dice", 100.0, True, "%"),
    "hd95": ("hd95", 1.0, False, "mm"),
    "lesion_dice": ("lesion_dice", 100.0, True, "%"),
    "lesion_hd95": ("lesion_hd95", 1.0, False, "mm"),
}
OPTIONAL_METRICS = ("lesion_dice", "lesion_hd95")  # only in evaluations run with eval.lesion_wise
# The settings two evaluations must share for their numbers to be comparable.
SHARED_SETTINGS = {
    "hd95_empty": "HD95 empty-mask convention",
    "et_postprocess": "ET post-processing",
    "et_min_voxels": "ET post-processing threshold",
}
DEFAULT_RESAMPLES = Statistics().resamples


@dataclasses.dataclass
class Run:
    """One evaluation: per-case values (cases, 15, 3), NaN where a row does not score the case."""

    name: str
    path: Path
    cases: list[str]
    present: dict[str, list[str]]
    applicable: np.ndarray  # (cases, 15) bool
    served: np.ndarray  # (15,) bool
    values: dict[str, np.ndarray]  # metric -> (cases, 15, 3); the optional metrics only where every case has them
    settings: dict  # the evaluation's `eval` settings


@dataclasses.dataclass
class PaperColumn:
    """A published table's method: row means only (15, 3) per metric, Dice as a fraction, NaN where absent."""

    label: str  # the column's name, e.g. "M3AE (paper)"
    spec: str  # as given: NAME[:METHOD]
    values: dict[str, np.ndarray]
    source: str  # where the numbers come from, for the notes under the tables
    info: dict  # the table's name, method, title, citation, dataset and split, for compare.json


JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}


def _json_type(value) -> str:
    return "null" if value is None else JSON_TYPES.get(type(value), type(value).__name__)


def _read_json(path: Path) -> dict:
    """A JSON object from a file `jaxbrats eval` writes; anything else is one line naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise JaxbratsError(f"{path}: missing; is {path.parent} the output of `jaxbrats eval`?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JaxbratsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise JaxbratsError(f"{path}: holds a JSON {_json_type(data)}, not the object `jaxbrats eval` writes")
    return data


def _objects(data: dict, key: str, path: Path, default=None) -> list[dict]:
    """``data[key]``: a list of JSON objects (`default` when absent and a default is given)."""
    value = data.get(key, default)
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        what = "missing" if value is None else f"a JSON {_json_type(value)}, not a list of objects"
        raise JaxbratsError(f"{path}: key {key!r} is {what}: not a jaxbrats evaluation result")
    return value


def _number(value, path: Path, where: str) -> float:
    """A score: a JSON number, or null (not scored) as NaN."""
    if value is None:
        return np.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise JaxbratsError(f"{path}: {where} is {json.dumps(value)[:60]} (a JSON {_json_type(value)}), not a number")


def _case_rows(case: dict, path: Path) -> dict[str, dict]:
    """A case file's rows by subset name; all 15 must be there."""
    rows = {}
    for row in _objects(case, "subsets", path):
        rows.setdefault(str(row.get("name")), row)
    missing = [s for s in SUBSET_NAMES if s not in rows]
    if missing:
        raise JaxbratsError(f"{path}: no row named {missing[0]!r} in 'subsets': not a jaxbrats case result")
    return rows


def _case_values(case: dict, path: Path, key: str) -> np.ndarray:
    """(15, 3) values of `key` in a case file, NaN where a row is not scored; one line per problem."""
    rows = _case_rows(case, path)
    values = np.full((len(SUBSET_NAMES), len(REGIONS)), np.nan)
    for i, subset in enumerate(SUBSET_NAMES):
        # a row without the optional metrics (not applicable) is unscored
        scores = rows[subset].get(key, dict.fromkeys(REGIONS) if key in OPTIONAL_METRICS else None)
        if not isinstance(scores, dict):
            what = "missing" if scores is None else f"a JSON {_json_type(scores)}, not an object of regions"
            raise JaxbratsError(f"{path}: subset {subset!r}: key {key!r} is {what}")
        for j, region in enumerate(REGIONS):
            if region not in scores:
                raise JaxbratsError(f"{path}: subset {subset!r}: key {key}.{region} is missing")
            values[i, j] = _number(scores[region], path, f"subset {subset!r}: key {key}.{region}")
    return values


def _has(case: dict, key: str) -> bool:
    return any(key in row for row in case.get("subsets", []))


def load_run(path, name: str) -> Run:
    """Read one `jaxbrats eval` output folder."""
    path = Path(path)
    if not path.is_dir():
        raise JaxbratsError(f"{path}: no such evaluation folder")
    summary = _read_json(path / "summary.json")
    settings = _read_json(path / "eval_settings.json").get("eval", {})
    if not isinstance(settings, dict):
        raise JaxbratsError(
            f"{path / 'eval_settings.json'}: key 'eval' is a JSON {_json_type(settings)}, not an object"
        )
    case_files = sorted((path / "cases").glob("*.json"))
    if not case_files:
        raise JaxbratsError(f"{path / 'cases'}: no per-case results")
    cases, present, applicable, values = [], {}, [], {m: [] for m in METRICS}
    for case_file in case_files:
        case = _read_json(case_file)
        cases.append(str(case.get("case", case_file.stem)))
        present[cases[-1]] = case.get("present", list(MODALITIES))
        if not isinstance(present[cases[-1]], list) or not all(isinstance(m, str) for m in present[cases[-1]]):
            raise JaxbratsError(f"{case_file}: key 'present' is not a list of modality names")
        rows = _case_rows(case, case_file)
        applicable.append([bool(rows[s].get("applicable", True)) for s in SUBSET_NAMES])
        for metric, (key, *_) in METRICS.items():
            if metric in OPTIONAL_METRICS and (values[metric] is None or not _has(case, key)):
                values[metric] = None  # one case without it: the run has no such metric
                continue
            values[metric].append(_case_values(case, case_file, key))
    rows = _objects(summary, "subsets", path / "summary.json", default=[{}] * len(SUBSETS))
    if len(rows) != len(SUBSETS):
        raise JaxbratsError(f"{path / 'summary.json'}: key 'subsets' has {len(rows)} rows, not {len(SUBSETS)}")
    served = np.asarray([row.get("served", True) for row in rows], bool)
    return Run(
        name,
        path,
        cases,
        present,
        np.asarray(applicable, bool),
        served,
        {m: np.asarray(v) for m, v in values.items() if v is not None},
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


def load_papers(specs, taken: list[str]) -> list[PaperColumn]:
    """`--paper NAME[:METHOD]` columns (`evaluation.published`; METHOD default: the paper's own, labelled
    "METHOD (paper)"; a baseline the paper quotes, or a label taken, "METHOD (NAME)")."""
    from jaxbrats.evaluation import published

    columns, given = [], set()
    for spec in specs:
        name, _, method = str(spec).partition(":")
        table = published.load(name)
        method = method or table.default_method
        values = table.values(method)  # an unknown method: one line naming the ones there are
        label = f"{method} (paper)" if method == table.default_method else f"{method} ({name})"
        if (name, method) in given:
            raise JaxbratsError(f"--paper {spec}: given twice")
        given.add((name, method))
        label = f"{method} ({name})" if label in taken else label
        if label in taken:
            raise JaxbratsError(f"--paper {spec}: its column's name {label!r} is taken; rename the run with --names")
        taken = [*taken, label]
        note = table.notes.get(method, "").strip().rstrip(".")
        source = (
            f'{label}: {table.sources[method]} of "{table.title}" ({table.citation}); {table.dataset}; '
            f"{table.split}" + (f"; {note}" if note else "")
        )
        info = {"table": name, "method": method, "source": table.sources[method], "note": note}
        info.update({k: getattr(table, k) for k in ("title", "citation", "dataset", "split")})
        info["printed_mean"] = {  # the paper's own mean row, where it prints one (the tables' mean row is ours)
            metric: [None if np.isnan(v) else float(v) for v in mean] for metric, mean in table.means[method].items()
        }
        values = {m: np.asarray(v, float).reshape(len(SUBSETS), len(REGIONS)) for m, v in values.items()}
        columns.append(PaperColumn(label, str(spec), values, source, info))
    return columns


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


def paper_means(values: np.ndarray, mean_rows: np.ndarray) -> np.ndarray:
    """(16, 3): a paper's 15 rows, then their mean over `mean_rows` (NaN in a region where one is absent)."""
    mean = values[mean_rows].mean(axis=0) if mean_rows.any() else np.full(len(REGIONS), np.nan)
    return np.concatenate([values, mean[None]])


def paired_cells(values: np.ndarray, reference: np.ndarray, served: np.ndarray, mean_rows: np.ndarray):
    """((row, region), x, y) of every cell a run is tested on against the reference: the rows both serve,
    per case; the mean row pairs each case's mean over the `mean_rows`."""
    for s in np.flatnonzero(served):
        for r in range(len(REGIONS)):
            yield (s, r), values[:, s, r], reference[:, s, r]
    both = mean_rows[None, :, None] & np.isfinite(values) & np.isfinite(reference)
    per_case = [_quiet_nanmean(np.where(both, v, np.nan), axis=1) for v in (values, reference)]
    for r in range(len(REGIONS)):
        yield (len(SUBSETS), r), per_case[0][:, r], per_case[1][:, r]


def paired_p_values(values: np.ndarray, reference: np.ndarray, served: np.ndarray, mean_rows: np.ndarray) -> np.ndarray:
    """(16, 3) p-values of a run's per-case values against the reference's (NaN where not testable)."""
    out = np.full((len(ROWS), len(REGIONS)), np.nan)
    for cell, x, y in paired_cells(values, reference, served, mean_rows):
        out[cell] = wilcoxon_p(x, y)
    return out


def paired_differences(values, reference, served, mean_rows, bootstrap: Bootstrap | None) -> np.ndarray:
    """(16, 3, 3): the mean paired difference from the reference and its bootstrap interval (NaN where not
    testable; only the mean without a bootstrap)."""
    out = np.full((len(ROWS), len(REGIONS), 3), np.nan)
    for cell, x, y in paired_cells(values, reference, served, mean_rows):
        if bootstrap is None:
            keep = np.isfinite(x) & np.isfinite(y)
            out[cell][0] = np.mean(x[keep] - y[keep]) if keep.any() else np.nan
        else:
            out[cell] = bootstrap(x, y)
    return out


def _best(table: np.ndarray, scale: float, higher: bool) -> np.ndarray:
    """(methods, 16, 3) bool: the best value of each row and region at the printed precision."""
    # The printed text's rounding, not np.round's: np.round(86.885, 2) is 86.88 but it prints 86.89.
    shown = np.vectorize(lambda v: float(PRINTED.format(v)), otypes=[float])(table * scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        best = np.nanmax(shown, axis=0) if higher else np.nanmin(shown, axis=0)
    return (shown == best[None]) & (np.sum(np.isfinite(shown), axis=0) > 1)[None]


def compare_metric(
    runs: list[Run],
    reference: int,
    metric: str,
    note: str,
    papers: list[PaperColumn] = (),
    statistics: Statistics | None = None,
) -> MetricTable:
    """The table of one metric: means (the runs', then the papers'), p-values against the reference (NaN for
    itself and the papers), their correction, the paired differences with intervals, best and marked cells."""
    stats = statistics or Statistics()
    order = runs[reference].cases
    aligned = [_aligned(run, order) for run in runs]
    ref_values, cases = aligned[reference][1][metric], aligned[reference][0].sum(axis=0)
    paper_rows = [np.isfinite(paper.values[metric]).any(axis=1) for paper in papers]
    mean_rows = np.logical_and.reduce([run.served for run in runs] + paper_rows) & (cases > 0)  # rows all have
    means = np.stack(
        [row_means(values[metric], run.served, mean_rows) for run, (_, values) in zip(runs, aligned)]
        + [paper_means(paper.values[metric], mean_rows) for paper in papers]
    )
    untested = np.full((len(ROWS), len(REGIONS)), np.nan)
    u = uniforms(stats.resamples, len(order), stats.seed) if stats.resamples else None
    bootstrap = Bootstrap(u, stats.confidence) if stats.resamples else None
    p, diff = [], []
    for i, (run, (_, values)) in enumerate(zip(runs, aligned)):
        served = run.served & runs[reference].served
        tested = i != reference
        p.append(paired_p_values(values[metric], ref_values, served, mean_rows) if tested else untested)
        diff.append(paired_differences(values[metric], ref_values, served, mean_rows, bootstrap) if tested else None)
    p += [untested] * len(papers)
    diff = [np.full((*untested.shape, 3), np.nan) if d is None else d for d in diff + [None] * len(papers)]
    adjusted = np.stack([adjust(run_p, stats.correction) for run_p in p])  # one family per run and table
    _, scale, higher, unit = METRICS[metric]
    return MetricTable(
        metric=metric,
        names=[run.name for run in runs] + [paper.label for paper in papers],
        reference=reference,
        values=means * scale,
        p=np.stack(p),
        best=_best(means, scale, higher),
        marked=adjusted < ALPHA,
        cases=cases,
        mean_rows=mean_rows,
        higher_is_better=higher,
        unit=unit,
        note=note,
        p_adjusted=adjusted,
        difference=np.stack(diff) * scale,
        papers=[paper.source for paper in papers],
        statistics=stats,
    )


def _check_arguments(paths, names, reference, papers, statistics: Statistics) -> tuple[list[str], str]:
    if len(paths) + len(papers) < 2 or not paths:
        raise JaxbratsError("compare needs two evaluation folders, or one and --paper NAME")
    names = list(names) if names else default_names(paths)
    if len(names) != len(paths):
        raise JaxbratsError(f"--names has {len(names)} names for {len(paths)} evaluation folders")
    if len(set(names)) != len(names):
        raise JaxbratsError(f"two runs have one name ({', '.join(names)}); give each its own with --names a,b,...")
    reference = names[0] if reference is None else reference
    tables = {str(p).partition(":")[0] for p in papers}
    labels = ("(paper)", *(f"({t})" for t in tables))  # a paper column's label ends with one of these
    if reference not in names and (reference in tables | set(map(str, papers)) or reference.endswith(labels)):
        raise JaxbratsError(
            f"--reference {reference!r} is a paper: it has no cases to test against; name a run: {', '.join(names)}"
        )
    if reference not in names:
        raise JaxbratsError(f"--reference {reference!r} is none of the runs: {', '.join(names)}")
    if statistics.correction not in CORRECTIONS:
        raise JaxbratsError(f"--correction {statistics.correction!r}: expected one of {', '.join(CORRECTIONS)}")
    if statistics.resamples < 0:
        raise JaxbratsError(f"--bootstrap {statistics.resamples}: expected a count >= 0 (0: no intervals)")
    return names, reference


def _metric_notes(settings: dict, cases: int) -> dict[str, str]:
    over = f"mean over the cases each row scores ({cases} cases)"
    lesion = "BraTS 2023 lesion-wise (eval.lesion_wise: per lesion, missed and spurious lesions penalised)"
    return {
        "dice": f"Dice in percent, {over}",
        "hd95": empty_convention_note(settings),
        "lesion_dice": f"{lesion} Dice in percent, {over}",
        "lesion_hd95": f"{lesion} HD95 in mm, {over}",
    }


def compare(
    paths,
    out_dir,
    names=None,
    reference: str | None = None,
    papers=(),
    correction: str = "holm",
    bootstrap: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict:
    """Write the comparison of the evaluations in `paths` (and the `papers`, NAME[:METHOD] each) to `out_dir`;
    return what was written, and "skipped": a line per metric left out because only some runs have it."""
    statistics = Statistics(correction=correction, resamples=int(bootstrap), seed=int(seed))
    names, reference = _check_arguments(list(paths), names, reference, list(papers), statistics)
    runs = [load_run(p, n) for p, n in zip(paths, names)]
    columns = load_papers(papers, names)
    settings = check_comparable(runs)
    ref = names.index(reference)
    metrics, skipped = [], []
    for metric in METRICS:
        having = [run.name for run in runs if metric in run.values]
        if len(having) == len(runs):
            metrics.append(metric)
        elif having:
            skipped.append(f"{metric}: left out, only {', '.join(having)} of the runs have it (eval.lesion_wise)")
    notes = _metric_notes(settings, len(runs[ref].cases))
    post = "on" if settings.get("et_postprocess") else "off"
    tables = {}
    for m in metrics:
        shown = [c for c in columns if np.isfinite(c.values.get(m, np.nan)).any()]  # papers without it: left out
        tables[m] = compare_metric(runs, ref, m, f"{notes[m]}; ET post-processing {post}.", shown, statistics)
    sources = [str(Path(p)) for p in paths] + [c.spec for c in columns]
    written = write_report(Path(out_dir), tables, settings, sources, {c.label: c.info for c in columns})
    names = names + [c.label for c in columns]
    return {
        "names": names,
        "reference": reference,
        "tables": tables,
        "settings": settings,
        "written": written,
        "skipped": skipped,
    }


def empty_convention_note(settings: dict) -> str:
    name = settings.get("hd95_empty") or "brats"
    both, one = HD95_EMPTY.get(name, (float("nan"),) * 2)
    return f"HD95 in mm, empty-mask convention '{name}': both masks empty -> {both:g}, exactly one empty -> {one:g}" + (
        " (NaNs left out of the means)" if name == "nan" else ""
    )
