"""Label conventions of the BraTS releases and the tumour regions scored.

Internally jaxbrats stores every segmentation in one contiguous convention:
0 background, 1 necrotic / non-enhancing core (NCR, NETC), 2 edema (ED, SNFH),
3 enhancing tumour (ET). Each release's convention maps onto it here and back
when predictions are written.
"""

from __future__ import annotations

import numpy as np

BACKGROUND, NECROSIS, EDEMA, ENHANCING = 0, 1, 2, 3
INTERNAL_LABELS: tuple[int, ...] = (BACKGROUND, NECROSIS, EDEMA, ENHANCING)
NUM_LABELS = len(INTERNAL_LABELS)

#: Source label value -> internal label, per release convention.
CONVENTIONS: dict[str, dict[int, int]] = {
    # BraTS 2018-2021: 4 is enhancing tumour, 3 is unused.
    "brats2018": {0: BACKGROUND, 1: NECROSIS, 2: EDEMA, 4: ENHANCING},
    # BraTS 2023 GLI: 1 NETC, 2 SNFH, 3 ET.
    "brats2023": {0: BACKGROUND, 1: NECROSIS, 2: EDEMA, 3: ENHANCING},
}

#: Regions scored by every paper, as sets of internal labels (nested).
REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
REGION_LABELS: dict[str, tuple[int, ...]] = {
    "WT": (NECROSIS, EDEMA, ENHANCING),
    "TC": (NECROSIS, ENHANCING),
    "ET": (ENHANCING,),
}


def to_internal(seg: np.ndarray, convention: str) -> np.ndarray:
    """Map integer source labels to the internal convention (uint8).

    Values outside the convention must have been rejected before (see
    `jaxbrats.data.loading`); they map to background here.
    """
    lut = np.zeros(max(CONVENTIONS[convention]) + 1, dtype=np.uint8)
    for source, internal in CONVENTIONS[convention].items():
        lut[source] = internal
    return lut[seg]


def from_internal(labels: np.ndarray, convention: str) -> np.ndarray:
    """Map internal labels back to a release's convention (uint8)."""
    lut = np.zeros(NUM_LABELS, dtype=np.uint8)
    for source, internal in CONVENTIONS[convention].items():
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


def region_probs_from_label_probs(probs, xp=np):
    """WT, TC, ET probabilities (last axis) from softmax probabilities over the 4 internal labels."""
    wt = 1.0 - probs[..., BACKGROUND]
    tc = probs[..., NECROSIS] + probs[..., ENHANCING]
    return xp.stack([wt, tc, probs[..., ENHANCING]], axis=-1)
