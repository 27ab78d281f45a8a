"""Label maps written as NIfTI in the source geometry and label convention, atomically."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from jaxbrats import files
from jaxbrats.data.loading import canonical_shape, from_canonical
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
    """Atomic NIfTI write: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.ascontiguousarray(data), np.asarray(affine), header=header)
    image.set_data_dtype(np.uint8)
    image.set_sform(np.asarray(affine), code=1)
    image.set_qform(np.asarray(affine), code=1)
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    tmp = files.mkstemp(prefix=".partial-", suffix=suffix, dir=path.parent)  # the umask's mode, not 0600
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
