"""Modalities, their file-name aliases and the 15 missing-modality subsets.

This module is the one place that fixes the modality order and the subset
row order; everything else imports them from here.
"""

from __future__ import annotations

import itertools

import numpy as np

#: Canonical channel order of every image array in jaxbrats (last axis).
MODALITIES: tuple[str, ...] = ("flair", "t1ce", "t1", "t2")
NUM_MODALITIES = len(MODALITIES)

#: File-name tokens used by the BraTS releases (and common variants) for each
#: modality. BraTS 2023+ uses t2f/t1c/t1n/t2w; 2018-2021 use flair/t1ce/t1/t2.
#: Channel names of a dataset.json (MSD "FLAIR", "T1w", "t1gd", "T2w"; nnU-Net
#: "T1", "T1c", ...) are matched here too, lower-cased, without spaces, "-", "_".
MODALITY_ALIASES: dict[str, tuple[str, ...]] = {
    "flair": ("flair", "t2f", "fla", "t2flair"),
    "t1ce": ("t1ce", "t1c", "t1gd", "t1ce1", "t1wce", "t1post"),
    "t1": ("t1", "t1n", "t1w"),
    "t2": ("t2", "t2w"),
}
#: Tokens naming a segmentation file. "segm" covers BraTS 2020 case 355,
#: whose seg file is misnamed in the official release.
SEG_ALIASES: tuple[str, ...] = ("seg", "segm", "label", "labels")


def modality_of_token(token: str) -> str | None:
    """Canonical modality name for a file-name token, "seg", or None."""
    token = token.lower()
    if token in SEG_ALIASES:
        return "seg"
    for modality, aliases in MODALITY_ALIASES.items():
        if token in aliases:
            return modality
    return None


def _papers_row_order() -> list[tuple[str, ...]]:
    # Singles, then pairs, triples and the full set; inside each size the
    # combinations follow the canonical modality order (the papers' layout).
    return [c for k in range(1, NUM_MODALITIES + 1) for c in itertools.combinations(MODALITIES, k)]


#: The 15 non-empty modality subsets in the papers' row order.
SUBSETS: tuple[tuple[str, ...], ...] = tuple(_papers_row_order())
#: Stable short names, e.g. "flair+t1ce".
SUBSET_NAMES: tuple[str, ...] = tuple("+".join(s) for s in SUBSETS)
#: (15, 4) boolean array: SUBSET_MASKS[i, j] says whether subset i has modality j.
SUBSET_MASKS: np.ndarray = np.array([[m in s for m in MODALITIES] for s in SUBSETS], dtype=bool)
SUBSET_MASKS.setflags(write=False)
NUM_SUBSETS = len(SUBSETS)
FULL_SUBSET_INDEX = NUM_SUBSETS - 1


def subset_index(modalities) -> int:
    """Row index of a subset given as names (any order) or a boolean mask of 4."""
    if isinstance(modalities, str):
        modalities = modalities.split("+")
    mask = np.asarray(modalities)
    if mask.dtype != bool:
        unknown = set(modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; expected some of {MODALITIES}")
        mask = np.array([m in modalities for m in MODALITIES])
    hits = np.flatnonzero((SUBSET_MASKS == mask).all(axis=1))
    if hits.size != 1:
        raise ValueError(f"not a non-empty modality subset: {modalities!r}")
    return int(hits[0])


def drop_modalities(image, mask, fill=0.0):
    """Replace the channels whose mask is False by `fill`.

    `image` is channels-last (..., D, H, W, 4); `mask` is (..., 4) boolean
    with the leading axes of `image`. Works on numpy and jax arrays alike, so
    the dropped subset can be data inside a jitted function. `fill` may be a
    scalar or an array broadcastable to `image` (e.g. a substitute image).
    """
    mask = mask[..., None, None, None, :]
    xp = np if isinstance(image, np.ndarray) else _jnp()
    return xp.where(mask, image, xp.asarray(fill, dtype=image.dtype))


def _jnp():
    import jax.numpy as jnp

    return jnp


def student_subsets(students, where: str = "method.students") -> tuple[int, ...]:
    """Subset indices of a family of dedicated students: "all" -> the 15 in order; a list of subset
    names ("t1ce", "flair+t2") -> theirs. A bad value is one line naming `where`."""
    from jaxbrats.errors import ConfigError

    if students == "all":
        return tuple(range(len(SUBSET_NAMES)))
    if isinstance(students, str) or not isinstance(students, (list, tuple)) or not students:
        raise ConfigError(f"{where} must be 'all' or a non-empty list of subset names, got {students!r}")
    out = []
    for name in students:
        try:
            index = subset_index(str(name))
        except ValueError:
            raise ConfigError(
                f"{where}: {name!r} is not a subset (names like 't1ce' or 'flair+t2'; "
                f"the 15: {', '.join(SUBSET_NAMES)})"
            ) from None
        if index in out:
            raise ConfigError(f"{where}: {name!r} is listed twice")
        out.append(index)
    return tuple(out)
