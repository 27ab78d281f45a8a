"""Segment one case folder with a trained run, whatever modality files it has.

The case is read and validated like a training case (`data.loading`),
cropped and normalised with the run's preprocessing settings, segmented with
the modalities present (the method fills the missing ones its own way) by
sliding-window inference, and written back in the source geometry (the crop
undone, the source orientation and affine, the header of the first image) and
label convention.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxbrats.data.discovery import read_case_dir
from jaxbrats.data.loading import from_canonical, load_case
from jaxbrats.data.preprocess import preprocess_case
from jaxbrats.engine import load_trained
from jaxbrats.errors import JaxbratsError
from jaxbrats.evaluation import segment, write_nifti
from jaxbrats.labels import CONVENTIONS, from_internal, region_voxel_counts
from jaxbrats.modalities import MODALITIES


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def predict_case(workdir, case_dir, out_path, convention: str | None = None, overrides=()) -> dict:
    """Write the segmentation of `case_dir` to `out_path`; returns what was done."""
    workdir, case_dir, out_path = Path(workdir), Path(case_dir), Path(out_path)
    if _inside(out_path, case_dir):
        raise JaxbratsError(f"{out_path}: inside the input case folder {case_dir}; choose an output outside it")
    if convention is not None and convention not in CONVENTIONS:
        raise JaxbratsError(f"--convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
    method, graphdefs, models_state, config = load_trained(workdir, overrides=overrides)
    try:
        preprocessing = json.loads((workdir / "data.json").read_text())["preprocessing"]
    except FileNotFoundError:
        raise JaxbratsError(f"{workdir / 'data.json'}: missing; the run's preprocessing settings are unknown") from None
    record = read_case_dir(case_dir)
    case = load_case(record, need_labels=False)
    arrays, fields = preprocess_case(case, preprocessing["normalization"], preprocessing["margin"])
    present = np.asarray(record.present)
    cfg = config.eval

    @jax.jit
    def run(models_state, image, mask):
        models = {n: nnx.merge(g, models_state[n]) for n, g in graphdefs.items()}
        return segment(method, models, image, mask, cfg)

    labels = np.asarray(run(models_state, arrays["image"], present))
    full = np.zeros(next(iter(case.images.values())).shape, np.uint8)
    full[tuple(slice(lo, hi) for lo, hi in fields["crop_box"])] = labels
    convention = convention or case.convention or "brats2023"
    data = from_internal(from_canonical(full, case.affine), convention)
    header = _first_header(record)
    write_nifti(data, case.affine, out_path, header)
    return {
        "present": [m for m, p in zip(MODALITIES, present) if p],
        "missing": [m for m, p in zip(MODALITIES, present) if not p],
        "convention": convention,
        "voxels": region_voxel_counts(labels),
        "out": str(out_path),
    }


def _first_header(record):
    import nibabel as nib

    path = next(record.images[m] for m in MODALITIES if m in record.images)
    header = nib.load(path).header.copy()
    header.set_data_dtype(np.uint8)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    return header
