"""Small NIfTI cases for tests, made on the fly (no data lives in the repository)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from jaxbrats.data.phantom import brats_affine, phantom_case
from jaxbrats.labels import from_internal

SHAPE = (20, 22, 18)
TOKENS_2018 = {"flair": "flair", "t1ce": "t1ce", "t1": "t1", "t2": "t2"}
TOKENS_2023 = {"flair": "t2f", "t1ce": "t1c", "t1": "t1n", "t2": "t2w"}


def phantom_arrays(seed: int = 0, shape=SHAPE):
    return phantom_case(shape, np.random.default_rng(seed))


def save(path: Path, array: np.ndarray, affine=None, dtype=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = brats_affine(array.shape) if affine is None else affine
    nib.save(nib.Nifti1Image(array.astype(dtype or array.dtype), affine), path)
    return path


def write_case(
    case_dir: Path,
    case_id: str | None = None,
    sep: str = "_",
    tokens=TOKENS_2018,
    convention: str = "brats2018",
    seed: int = 0,
    skip=(),
    seg: bool = True,
    ext: str = ".nii.gz",
    shape=SHAPE,
) -> Path:
    """A BraTS-style case folder with files `<case_id><sep><token><ext>`."""
    case_id = case_id or case_dir.name
    images, labels = phantom_arrays(seed, shape)
    for modality, token in tokens.items():
        if modality not in skip:
            save(case_dir / f"{case_id}{sep}{token}{ext}", images[modality], dtype=np.int16)
    if seg:
        save(case_dir / f"{case_id}{sep}seg{ext}", from_internal(labels, convention), dtype=np.uint8)
    return case_dir
