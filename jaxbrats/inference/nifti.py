"""Label maps written as NIfTI in the source geometry and label convention, atomically.

`write_prediction` puts a case's labels (internal convention, the cached crop) back into its source
volume: the crop undone, the source orientation and affine, the label convention of its release.
`write_nifti` writes any such array (`files.write_atomic`)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from jaxbrats import files
from jaxbrats.data.loading import canonical_shape, from_canonical, nibabel
from jaxbrats.labels import from_internal


def write_prediction(labels: np.ndarray, manifest: dict, path: Path, header=None) -> None:
    """Write internal labels of the cached crop as a NIfTI in the source geometry and convention."""
    full = np.zeros(canonical_shape(manifest["original_shape"], manifest["original_affine"]), np.uint8)
    box = tuple(slice(lo, hi) for lo, hi in manifest["crop_box"])
    full[box] = labels
    affine = np.asarray(manifest["original_affine"])
    data = from_internal(from_canonical(full, affine), manifest["label_convention"] or "brats2023")
    write_nifti(data, affine, path, header)


def write_nifti(data: np.ndarray, affine, path: Path, header=None) -> None:
    """Write uint8 `data` as a NIfTI with `affine` as its sform and qform, atomically
    (`files.write_atomic`; the temporary name keeps ``.nii.gz``, so nibabel compresses it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nibabel().Nifti1Image(np.ascontiguousarray(data), np.asarray(affine), header=header)
    image.set_data_dtype(np.uint8)
    image.set_sform(np.asarray(affine), code=1)
    image.set_qform(np.asarray(affine), code=1)
    files.write_atomic(path, lambda tmp: _save(image, Path(tmp)))


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _save(image, tmp: Path) -> None:
    """nibabel picks the format from the name (`files.write_atomic` keeps ``.nii.gz`` whole in its
    temporary name). A name it does not know (``seg``, ``seg.gz``) it would refuse or extend with
    ``.nii``, so such a file is written as a NIfTI itself, gzipped when the name ends in ``.gz``."""
    if files.full_suffix(tmp).lower() in NIFTI_SUFFIXES:
        nibabel().save(image, tmp)
        return
    with gzip.open(tmp, "wb") if tmp.name.endswith(".gz") else open(tmp, "wb") as stream:
        image.to_stream(stream)
