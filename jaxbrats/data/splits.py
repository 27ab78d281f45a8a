"""Train/validation/test splits: deterministic from a seed, or from the lists papers publish.

A published list names its cases in its authors' way: M3AE's and ProtoKD's BraTS 2018 lists
hold one bare folder name per line (``Brats18_TCIA01_131_1``), RFNet's BraTS 2020 lists the
names of its preprocessed files (``HG_BraTS20_Training_001``: HG_/LG_ is the tumour grade);
others write paths or file names. `read_split_file` maps each line to a case id of the cache
(the case's folder name), so the authors' files are used as downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from jaxbrats.errors import JaxbratsError

SPLIT_NAMES = ("train", "val", "test")
#: A grade folder or prefix before a BraTS 2018/2020 case id (RFNet's preprocessed names).
_GRADE = re.compile(r"^(?:HGG|LGG|HG|LG)_")
_FILE_SUFFIX = re.compile(r"(?:\.nii\.gz|\.nii|\.npy|\.npz|\.pkl|\.h5|\.hdf5|\.mha|\.nrrd)$", re.IGNORECASE)
#: A per-file suffix after the case id (RFNet's ``_vol.npy``, BraTS's ``_flair.nii.gz``).
_KIND_SUFFIX = re.compile(r"_(?:vol|seg|flair|t1ce|t1|t2|t2f|t1c|t1n|t2w)$", re.IGNORECASE)
_SHOWN = 3  # missing ids an error names


def ratio_split(
    case_ids, ratios=(0.7, 0.1, 0.2), seed: int = 0, names=("train", "val", "test")
) -> dict[str, list[str]]:
    """Shuffle the (sorted) ids with `seed` and cut them by `ratios` (normalised to sum 1)."""
    if len(ratios) != len(names) or min(ratios) < 0 or sum(ratios) <= 0:
        raise JaxbratsError(f"bad split ratios {ratios} for {names}")
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    bounds = np.rint(np.cumsum(np.asarray(ratios, float) / sum(ratios)) * len(ids)).astype(int)
    parts = np.split(order, bounds[:-1])
    return {name: [ids[i] for i in sorted(part)] for name, part in zip(names, parts)}


def kfold_split(case_ids, folds: int, fold: int, seed: int = 0) -> dict[str, list[str]]:
    """Fold `fold` of `folds` as validation, the rest as training."""
    if not 0 <= fold < folds:
        raise JaxbratsError(f"fold {fold} outside 0..{folds - 1}")
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = set(np.array_split(order, folds)[fold].tolist())
    return {"train": [ids[i] for i in range(len(ids)) if i not in val], "val": [ids[i] for i in sorted(val)]}


def _candidates(entry: str):
    """The entry, then its last path component, stripped of file suffixes and a grade prefix."""
    yield entry
    name = re.split(r"[\\/]", entry.rstrip("\\/"))[-1]
    yield name
    stem = _KIND_SUFFIX.sub("", _FILE_SUFFIX.sub("", name))
    yield stem
    yield _GRADE.sub("", stem)


def _bounded_matches(entry: str, lowered: dict[str, str]) -> list[str]:
    """Known ids inside `entry` (case-insensitive) between non-alphanumeric characters or its ends."""
    text = entry.lower()
    found = []
    for low, case_id in lowered.items():
        start = text.find(low)
        while start >= 0:
            end = start + len(low)
            if (start == 0 or not text[start - 1].isalnum()) and (end == len(text) or not text[end].isalnum()):
                found.append(case_id)
                break
            start = text.find(low, start + 1)
    # An id inside a longer one found too ("case1" in "case1_b") is part of that one, not a second case.
    return [i for i in found if not any(i != j and i.lower() in j.lower() for j in found)]


def match_case_id(entry: str, known: set[str], lowered: dict[str, str]) -> str | None:
    """The cache's case id a list entry names, or None. Ambiguity is an error (raised by the caller)."""
    for candidate in _candidates(entry):
        if candidate in known:
            return candidate
    matches = _bounded_matches(entry, lowered)
    if len(matches) > 1:
        raise ValueError(f"{entry!r} names several cases: {', '.join(sorted(matches)[:_SHOWN])}")
    return matches[0] if matches else None


def _entries(path: Path, label: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")  # utf-8-sig: a BOM from Windows editors
    except FileNotFoundError:
        raise JaxbratsError(f"{label}: split file not found") from None
    except (IsADirectoryError, PermissionError) as e:
        raise JaxbratsError(f"{label}: cannot read the split file ({e.strerror})") from None
    entries = [line.split("#")[0].strip() for line in text.splitlines()]  # splitlines: LF, CRLF and CR alike
    return [e for e in entries if e]


def read_split_file(path, known_ids, *, key: str = "", cache: str = "the cache") -> list[str]:
    """The cache's case ids a published split list names, in the file's order.

    One case per line; blank lines, '#' comments and CRLF line ends are ignored. A line may be
    a bare case id, a path or file name holding it (``HGG/Brats18_2013_10_1``,
    ``Brats18_2013_10_1.npy``) or RFNet's ``HG_``/``LG_`` prefixed name. Cases the cache lacks
    are one error naming the file (`key`, the config key, leads it) and the first of them.
    """
    path = Path(path)
    label = f"{key} ({path})" if key else str(path)
    entries = _entries(path, label)
    if not entries:
        raise JaxbratsError(f"{label}: lists no cases")
    known = set(known_ids)
    lowered = {i.lower(): i for i in sorted(known)}
    ids, missing = [], []
    for entry in entries:
        try:
            case_id = match_case_id(entry, known, lowered)
        except ValueError as e:
            raise JaxbratsError(f"{label}: {e}") from None
        (ids if case_id else missing).append(case_id or entry)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:_SHOWN]) + (
            f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
        )
        hint = " (a list of another dataset, or another cache?)" if not ids else ""
        raise JaxbratsError(f"{label}: {len(missing)} of its {len(entries)} cases are not in {cache}: {shown}{hint}")
    seen: dict[str, str] = {}
    for entry, case_id in zip(entries, ids):
        if case_id in seen:
            raise JaxbratsError(f"{label}: case {case_id!r} listed twice ({seen[case_id]!r} and {entry!r})")
        seen[case_id] = entry
    return ids


def read_split_files(files: dict[str, str], known_ids, *, keys: dict[str, str], cache: str) -> dict[str, list[str]]:
    """`read_split_file` of each named file ({"train": path, ...}; "" is an empty split); no case in two."""
    splits: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for name in SPLIT_NAMES:
        path = files.get(name, "")
        splits[name] = read_split_file(path, known_ids, key=keys[name], cache=cache) if path else []
        for case_id in splits[name]:
            if case_id in owner:
                raise JaxbratsError(
                    f"{keys[name]} ({path}) and {keys[owner[case_id]]} ({files[owner[case_id]]}) both list "
                    f"case {case_id!r}: a case belongs to one split"
                )
            owner[case_id] = name
    return splits


def check_split_counts(splits: dict[str, list[str]], counts, *, keys: dict[str, str], files: dict[str, str]) -> None:
    """Each split list holds its paper's count (`counts`: train, val, test; empty: no check)."""
    if not counts:
        return
    nouns = {"train": "training", "val": "validation", "test": "test"}
    for name, expected in zip(SPLIT_NAMES, counts):
        got = len(splits.get(name, []))
        if got == expected:
            continue
        if not files.get(name):
            raise JaxbratsError(
                f"{keys[name]} is not set, the paper's split has {expected} {nouns[name]} cases "
                f"(data.split_counts = {list(counts)}): set it, or --set data.split_counts='[]'"
            )
        raise JaxbratsError(
            f"{keys[name]} ({files[name]}) lists {got} cases, the paper's split has {expected} "
            f"(data.split_counts = {list(counts)}): the wrong list, or --set data.split_counts='[]' for another split"
        )


def check_split_total(n_cases: int, counts, *, cache: str) -> None:
    """A ratio split of a paper's dataset covers the paper's number of cases (the sum of `counts`)."""
    if counts and n_cases != sum(counts):
        raise JaxbratsError(
            f"data.split_ratios split the {n_cases} cases of {cache}, the paper's split has {sum(counts)} "
            f"(data.split_counts = {list(counts)}): a case the cache lacks, another dataset, "
            f"or --set data.split_counts='[]'"
        )
