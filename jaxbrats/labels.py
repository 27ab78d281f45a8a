"""Label conventions of the BraTS releases and the tumour regions scored.

Internally jaxbrats stores every segmentation in one contiguous convention:
0 background, 1 necrotic / non-enhancing core (NCR, NETC), 2 edema (ED, SNFH),
3 enhancing tumour (ET). Each release's convention maps onto it here and back
when predictions are written.

A convention is named by a string: a release name in `CONVENTIONS`, or, for a
dataset whose dataset.json names its labels (Medical Segmentation Decathlon,
nnU-Net v2), a spec built by `mapped_convention`, e.g.
``"msd:0=0,1=2,2=1,3=3"`` (source value = internal label). Strings keep the
convention readable in manifests and messages, and JSON-safe.
"""

from __future__ import annotations

import re

import numpy as np

from jaxbrats.errors import JaxbratsError

BACKGROUND, NECROSIS, EDEMA, ENHANCING = 0, 1, 2, 3
INTERNAL_LABELS: tuple[int, ...] = (BACKGROUND, NECROSIS, EDEMA, ENHANCING)
NUM_LABELS = len(INTERNAL_LABELS)

#: Source label value -> internal label, per release convention.
CONVENTIONS: dict[str, dict[int, int]] = {
    # BraTS 2018-2021: 4 is enhancing tumour, 3 is unused.
    "brats2018": {0: BACKGROUND, 1: NECROSIS, 2: EDEMA, 4: ENHANCING},
    # BraTS 2023 GLI: 1 NETC, 2 SNFH, 3 ET.
    "brats2023": {0: BACKGROUND, 1: NECROSIS, 2: EDEMA, 3: ENHANCING},
    # BraTS 2013-2016 (and many derived datasets): 1 necrosis, 2 edema,
    # 3 non-enhancing tumour (part of the core), 4 enhancing tumour.
    "brats2013": {0: BACKGROUND, 1: NECROSIS, 2: EDEMA, 3: NECROSIS, 4: ENHANCING},
}
#: The conventions a case's label values are matched against, in this order,
#: when the layout does not say (`detect_convention`).
DETECTED_CONVENTIONS: tuple[str, ...] = ("brats2023", "brats2018", "brats2013")

#: Keywords of label names (dataset.json) per internal label; see `internal_label_of_name`.
LABEL_NAME_KEYWORDS: dict[int, frozenset[str]] = {
    BACKGROUND: frozenset({"background", "bg"}),
    NECROSIS: frozenset({"nonenhancing", "necrotic", "necrosis", "ncr", "net", "netc", "core"}),
    EDEMA: frozenset({"edema", "oedema", "snfh", "ed"}),
    ENHANCING: frozenset({"enhancing", "et"}),
}
INTERNAL_NAMES: dict[int, str] = {
    BACKGROUND: "background",
    NECROSIS: "necrosis / non-enhancing core",
    EDEMA: "edema",
    ENHANCING: "enhancing tumour",
}

#: Regions scored by every paper, as sets of internal labels (nested).
REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
REGION_LABELS: dict[str, tuple[int, ...]] = {
    "WT": (NECROSIS, EDEMA, ENHANCING),
    "TC": (NECROSIS, ENHANCING),
    "ET": (ENHANCING,),
}


def mapped_convention(mapping: dict[int, int], name: str = "custom") -> str:
    """The convention string of a source value -> internal label mapping (e.g. from a dataset.json).

    Every internal label needs a source value, so that predictions can be
    written back; raises `JaxbratsError` otherwise.
    """
    mapping = {int(k): int(v) for k, v in mapping.items()}
    missing = [INTERNAL_NAMES[i] for i in INTERNAL_LABELS if i not in mapping.values()]
    if missing or any(v not in INTERNAL_LABELS for v in mapping.values()) or any(k < 0 for k in mapping):
        raise JaxbratsError(
            f"label mapping {mapping} of {name!r} must map values >= 0 onto every internal label; missing: {missing}"
        )
    if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
        raise ValueError(f"convention name {name!r}: letters, digits, '_' and '.' only")
    return f"{name}:" + ",".join(f"{k}={v}" for k, v in sorted(mapping.items()))


_SPEC = re.compile(r"^[A-Za-z0-9_.]+:(\d+=\d+)(,\d+=\d+)*$")


def convention_map(convention: str) -> dict[int, int]:
    """Source value -> internal label of a convention (a release name or a `mapped_convention` spec)."""
    if convention in CONVENTIONS:
        return CONVENTIONS[convention]
    if isinstance(convention, str) and _SPEC.match(convention):
        mapping = dict(tuple(int(x) for x in pair.split("=")) for pair in convention.split(":", 1)[1].split(","))
        if all(i in mapping.values() for i in INTERNAL_LABELS) and all(v in INTERNAL_LABELS for v in mapping.values()):
            return mapping
    raise JaxbratsError(
        f"unknown label convention {convention!r}; expected one of {sorted(CONVENTIONS)} "
        "or a dataset.json mapping like 'msd:0=0,1=2,2=1,3=3'"
    )


def convention_values(convention: str) -> list[int]:
    """The source label values a convention allows, sorted."""
    return sorted(convention_map(convention))


def detect_convention(values) -> str | None:
    """The first of `DETECTED_CONVENTIONS` whose values hold all of `values`, or None.

    {0, 1, 2, 3} -> brats2023; 4 without 3 -> brats2018; 3 and 4 -> brats2013.
    A case without label 4 or 3 fits brats2023 and brats2018 alike (they agree
    on 0, 1, 2). Only 3 alone is ambiguous between brats2023 (enhancing) and a
    brats2013 case without enhancing tumour: state the convention then.
    """
    values = set(values)
    return next((c for c in DETECTED_CONVENTIONS if values <= set(CONVENTIONS[c])), None)


def internal_label_of_name(name: str) -> int | None:
    """The internal label a dataset.json label name means, by keywords, or None.

    Case-insensitive words: background/bg -> 0; edema/oedema/SNFH/ED -> 2;
    necrotic/necrosis/non-enhancing/NCR/NET/NETC/core -> 1; enhancing/ET -> 3
    ("non-enhancing" is not enhancing). A name matching no group, or several
    (e.g. "enhancing core"), means nothing (None).
    """
    text = re.sub(r"non[\s_\-]*enhancing", "nonenhancing", str(name).lower())
    words = set(re.findall(r"[a-z]+", text))
    hits = [label for label, keys in LABEL_NAME_KEYWORDS.items() if words & keys]
    return hits[0] if len(hits) == 1 else None


def to_internal(seg: np.ndarray, convention: str) -> np.ndarray:
    """Map integer source labels to the internal convention (uint8).

    Values outside the convention must have been rejected before (see
    `jaxbrats.data.loading`); they map to background here.
    """
    mapping = convention_map(convention)
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for source, internal in mapping.items():
        lut[source] = internal
    return lut[seg]


def from_internal(labels: np.ndarray, convention: str) -> np.ndarray:
    """Map internal labels back to a convention's values (uint8).

    Where several source values share an internal label, the smallest is
    written: brats2013 necrosis (1) and non-enhancing tumour (3) are both
    internal 1 (tumour core, not enhancing) and are not told apart on the way
    back, so internal 1 is written as 1; the file is a valid brats2013 map
    whose TC, ET and WT regions are those predicted.
    """
    lut = np.zeros(NUM_LABELS, dtype=np.uint8)
    for source, internal in sorted(convention_map(convention).items(), reverse=True):
        lut[internal] = source
    return lut[labels]


def regions_of(labels, xp=np):
    """Stack the WT, TC, ET masks of internal labels on a new last axis.

    Works with numpy (default) or jax.numpy passed as `xp`.
    """
    return xp.stack([xp.isin(labels, xp.asarray(REGION_LABELS[r])) for r in REGIONS], axis=-1)


def region_voxel_counts(labels: np.ndarray) -> dict[str, int]:
    """Voxels per region of an internal label map."""
    return {r: int(np.isin(labels, REGION_LABELS[r]).sum()) for r in REGIONS}


def labels_from_regions(regions, xp=np):
    """Internal labels from nested WT, TC, ET masks (last axis), the inverse of `regions_of`.

    A voxel is ET if ET is on, else NCR if TC is on, else ED if WT is on;
    ET outside TC still counts as ET (the papers' thresholding, nnU-Net's too).
    """
    wt, tc, et = (regions[..., i] for i in range(3))
    labels = xp.where(wt, EDEMA, BACKGROUND)
    labels = xp.where(tc, NECROSIS, labels)
    return xp.where(et, ENHANCING, labels).astype(xp.uint8)


def label_probs_from_region_probs(regions, xp=np):
    """Probabilities of the 4 internal labels (last axis) from nested WT, TC, ET probabilities, the
    inverse of `region_probs_from_label_probs`: exact for a softmax network's region probabilities
    (and for their blend over windows, which is linear); for independent sigmoids the differences may
    be negative, and the argmax is still defined."""
    wt, tc, et = (regions[..., i] for i in range(3))
    return xp.stack([1.0 - wt, tc - et, wt - tc, et], axis=-1)  # BACKGROUND, NECROSIS, EDEMA, ENHANCING


def labels_by_argmax(regions, xp=np):
    """Internal labels as the argmax of the label probabilities behind region probabilities (RFNet's decoding)."""
    return xp.argmax(label_probs_from_region_probs(regions, xp=xp), axis=-1).astype(xp.uint8)


def region_probs_from_label_probs(probs, xp=np):
    """WT, TC, ET probabilities (last axis) from softmax probabilities over the 4 internal labels."""
    wt = 1.0 - probs[..., BACKGROUND]
    tc = probs[..., NECROSIS] + probs[..., ENHANCING]
    return xp.stack([wt, tc, probs[..., ENHANCING]], axis=-1)
