"""Train/validation/test splits: deterministic from a seed, or from files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxbrats.errors import JaxbratsError


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


def read_split_file(path, known_ids) -> list[str]:
    """Case ids from a text file, one per line ('#' comments and blank lines ignored).

    Every id must be a known case: an unknown one is an error naming it.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise JaxbratsError(f"{path}: split file not found") from None
    ids = [line.split("#")[0].strip() for line in lines]
    ids = [i for i in ids if i]
    known = set(known_ids)
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise JaxbratsError(
            f"{path}: unknown case id {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
        )
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise JaxbratsError(f"{path}: case id {duplicated[0]!r} listed twice")
    return ids
