"""The papers' published 15-subset tables, as reference columns for `jaxbrats compare --paper NAME`.

Each table set is a JSON file in ``published/`` named ``<method>-<dataset>.json``: the paper (title,
arXiv id or DOI), the dataset and the split as the paper states them, and per method the rows its
table prints (the paper's own method and the baselines it quotes), each with its source ("Table 1").
A file lists each table's subsets in the table's row order (jaxbrats's subset names) and the rows
in that order; `load` puts them in `modalities.SUBSET_NAMES` order and converts to jaxbrats's
units (Dice a fraction as in summary.json, HD95 in mm), NaN where a table has no value. Every
file records, per method, how far the printed mean lies from the mean of its printed rows
(``mean_check``), and how the row order was checked against the paper's present/missing marks.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from importlib.resources.abc import Traversable

import numpy as np

from jaxbrats.errors import JaxbratsError
from jaxbrats.labels import REGIONS
from jaxbrats.modalities import NUM_SUBSETS, SUBSET_NAMES

#: The folder, inside the package, that holds the tables.
FOLDER = "published"
#: A metric's unit in a file -> what its values are divided by to give jaxbrats's unit.
UNITS = {"dice": {"percent": 100.0, "fraction": 1.0}, "hd95": {"mm": 1.0}}


@dataclasses.dataclass(frozen=True)
class PublishedTable:
    """One paper's tables on one dataset. `methods[method][metric]` is (15, 3): the rows in
    SUBSET_NAMES order, the columns WT, TC, ET; `means` the printed mean row (3,), NaN if none."""

    name: str
    title: str
    citation: str
    dataset: str
    split: str
    default_method: str
    sources: dict[str, str]  # method -> the table it comes from, e.g. "Table 1"
    methods: dict[str, dict[str, np.ndarray]]
    means: dict[str, dict[str, np.ndarray]]
    notes: dict[str, str]  # method -> what the paper says of it (rerun, quoted, ...)

    def values(self, method: str | None = None) -> dict[str, np.ndarray]:
        """metric -> (15, 3) of `method` (the paper's own by default); an unknown one is refused in one line."""
        method = self.default_method if method is None else method
        if method not in self.methods:
            raise JaxbratsError(
                f"published table {self.name!r} has no method {method!r}; it has: {', '.join(self.methods)}"
            )
        return self.methods[method]


def _files() -> dict[str, Traversable]:
    folder = resources.files("jaxbrats.evaluation").joinpath(FOLDER)
    return {f.name[: -len(".json")]: f for f in folder.iterdir() if f.name.endswith(".json")}


def available() -> list[str]:
    """The names of the published tables, e.g. "m3ae-brats2018"."""
    return sorted(_files())


def load(name: str) -> PublishedTable:
    """The table set `name` (see `available`); an unknown name or a malformed file is refused in one line."""
    files = _files()
    if name not in files:
        raise JaxbratsError(f"unknown published table {name!r}; available: {', '.join(sorted(files))}")
    return _load(name, files[name].read_text(encoding="utf-8"))


def _load(name: str, text: str) -> PublishedTable:
    where = f"jaxbrats/evaluation/{FOLDER}/{name}.json"
    try:
        doc = json.loads(text)
        return _parse(doc, where)
    except json.JSONDecodeError as e:
        raise JaxbratsError(f"{where}: not valid JSON ({e})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise JaxbratsError(f"{where}: malformed ({type(e).__name__}: {e})") from None


def _parse(doc: dict, where: str) -> PublishedTable:
    def bad(problem: str):
        return JaxbratsError(f"{where}: {problem}")

    if doc.get("name") != where.rsplit("/", 1)[1][: -len(".json")]:
        raise bad(f"name {doc.get('name')!r} differs from the file's")
    if doc.get("regions") != list(REGIONS):
        raise bad(f"regions must be {list(REGIONS)}, found {doc.get('regions')}")
    tables = doc["tables"]
    order = {}
    for table, spec in tables.items():
        subsets = spec["subsets"]
        unknown = [s for s in subsets if s not in SUBSET_NAMES]
        if unknown or len(set(subsets)) != len(subsets):
            raise bad(f"{table}: subsets must be distinct names of {SUBSET_NAMES}, found {subsets}")
        order[table] = [SUBSET_NAMES.index(s) for s in subsets]
    methods, means, sources, notes = {}, {}, {}, {}
    for method, entry in doc["methods"].items():
        source = entry["source"]
        if source not in order:
            raise bad(f"method {method!r}: source {source!r} is not one of the tables {list(order)}")
        sources[method], notes[method] = source, entry.get("note", "")
        methods[method], means[method] = {}, {}
        for metric in UNITS:
            if metric not in entry:
                continue
            unit = doc["metrics"][metric]["unit"]
            if unit not in UNITS[metric]:
                raise bad(f"{metric}: unit {unit!r} is not one of {list(UNITS[metric])}")
            divisor = UNITS[metric][unit]
            rows = np.array(entry[metric]["rows"], dtype=float)  # null -> NaN
            if rows.shape != (len(order[source]), len(REGIONS)):
                raise bad(
                    f"method {method!r} {metric}: rows of shape {rows.shape}, expected "
                    f"({len(order[source])}, {len(REGIONS)}) ({source}'s subsets x {'/'.join(REGIONS)})"
                )
            full = np.full((NUM_SUBSETS, len(REGIONS)), np.nan)
            full[order[source]] = rows / divisor
            mean = entry[metric].get("mean")
            mean = np.full(len(REGIONS), np.nan) if mean is None else np.array(mean, dtype=float) / divisor
            if mean.shape != (len(REGIONS),):
                raise bad(f"method {method!r} {metric}: mean of shape {mean.shape}, expected ({len(REGIONS)},)")
            for array in (full, mean):
                array.setflags(write=False)
            methods[method][metric], means[method][metric] = full, mean
        if not methods[method]:
            raise bad(f"method {method!r} has none of the metrics {list(UNITS)}")
    default = doc["default_method"]
    if default not in methods:
        raise bad(f"default_method {default!r} is not one of the methods {list(methods)}")
    paper = doc["paper"]
    return PublishedTable(
        name=doc["name"],
        title=paper["title"],
        citation=doc["citation"],
        dataset=doc["dataset"],
        split=doc["split"],
        default_method=default,
        sources=sources,
        methods=methods,
        means=means,
        notes=notes,
    )
