"""Segment one case folder with a trained run, whatever modality files it has.

The case is read and validated like a training case (`data.loading`),
cropped and normalised with the run's preprocessing settings, segmented with
the modalities present (the method fills the missing ones its own way) by
the evaluation's own segmentation (`evaluation.segment`: same padding rule,
fill, window grid and thresholds, see `segment_one_case`), and written back
in the source geometry (the crop undone, the source orientation and affine,
the header of the first image) and label convention. Predict of a case
gives the labels `jaxbrats eval` gives it for the subset of the modalities
it has (its ``predictions/<id>.nii.gz``).
"""

from __future__ import annotations

import dataclasses
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
from jaxbrats.evaluation import _pad, case_locator, pad_shape, segment, write_nifti
from jaxbrats.labels import CONVENTIONS, from_internal, region_voxel_counts
from jaxbrats.modalities import MODALITIES, SUBSET_NAMES, subset_index
from jaxbrats.sharding import OnMesh, eval_mesh


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def predict_case(workdir, case_dir, out_path, convention: str | None = None, overrides=(), stage: str | None = None) -> dict:
    """Write the segmentation of `case_dir` to `out_path` (the models of `stage`, default the last that
    segments); returns what was done."""
    workdir, case_dir, out_path = Path(workdir), Path(case_dir), Path(out_path)
    if _inside(out_path, case_dir):
        raise JaxbratsError(f"{out_path}: inside the input case folder {case_dir}; choose an output outside it")
    if convention is not None and convention not in CONVENTIONS:
        raise JaxbratsError(f"--convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
    method, graphdefs, models_state, config = load_trained(workdir, stage=stage, overrides=overrides, segmenting=True)
    try:
        preprocessing = json.loads((workdir / "data.json").read_text())["preprocessing"]
    except FileNotFoundError:
        raise JaxbratsError(f"{workdir / 'data.json'}: missing; the run's preprocessing settings are unknown") from None
    # A seg file beside the images is not read: predict needs none, and its label values
    # (any release's convention) must not stop the segmentation.
    record = dataclasses.replace(read_case_dir(case_dir), seg=None)
    case = load_case(record, need_labels=False)
    arrays, fields = preprocess_case(case, preprocessing["normalization"], preprocessing["margin"])
    present = np.asarray(record.present)
    served = method.served_subsets()
    if subset_index(present) not in served:
        have = "+".join(m for m, p in zip(MODALITIES, present) if p)
        raise JaxbratsError(f"{case_dir}: this {config.method_name} run has no model for the modalities the case has ({have}); "
                            f"it segments: {', '.join(SUBSET_NAMES[s] for s in served)}")
    box = [lo for lo, _ in fields["crop_box"]]
    labels = segment_one_case(method, graphdefs, models_state, arrays["image"], present, config.eval, box)
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


def segment_one_case(method, graphdefs, models_state, image, modality_mask, cfg, box_start=(0, 0, 0)) -> np.ndarray:
    """Internal labels of one preprocessed case (D, H, W, 4): `evaluation.segment`, as `evaluate` runs it.

    The case is padded at the end to `evaluation.pad_shape` (each axis rounded
    up to `eval.bucket_multiple`, at least the window: the bucket of an
    evaluation of this case alone) and segmented with its extent and its
    corner in the source grid (`box_start`) as the case's locator, so `fill` (M3AE's x_sub read into the padding too) and the
    window grid (that of the case's extent) are the evaluation's; the labels
    equal the evaluation's for the subset `modality_mask`, whatever bucket
    that evaluation used. One program of its own (compiled for this shape).
    """
    image = np.asarray(image, np.float32)
    shape = image.shape[:3]
    padded = _pad(image, pad_shape(shape, cfg))

    def segment_case(models_state, image, mask, subset, case):
        models = {n: nnx.merge(g, models_state[n]) for n, g in graphdefs.items()}
        return segment(method, models, image, mask, cfg, case=case, subset=subset)

    run = OnMesh(jax.jit(segment_case), eval_mesh(cfg))  # eval.mesh splits the windows, as in `evaluate`

    mask = np.asarray(modality_mask, bool)
    labels = run(models_state, padded, mask, np.int32(subset_index(mask)), case_locator(shape, box_start))
    return np.asarray(labels)[: shape[0], : shape[1], : shape[2]]


def _first_header(record):
    import nibabel as nib

    path = next(record.images[m] for m in MODALITIES if m in record.images)
    header = nib.load(path).header.copy()
    header.set_data_dtype(np.uint8)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    return header
