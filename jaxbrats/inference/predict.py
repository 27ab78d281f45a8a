"""Segment a case folder, or a folder of cases, with a trained run, whatever modality files each has.

The case is read and validated like a training case (`data.loading`),
cropped and normalised with the run's preprocessing settings, segmented with
the modalities present (the method fills the missing ones its own way) by
the evaluation's own segmentation (`inference.segment.segment`: same padding
rule, fill, window grid, average and decoding, see `segment_one_case`), and
written back in the source geometry (the crop undone, the source orientation
and affine, the header of the first image) and label convention, atomically
(`inference.nifti.write_nifti`). Predict of a case
gives the labels `jaxbrats eval` gives it for the subset of the modalities
it has (its ``predictions/<id>.nii.gz``). `predict_folder` does so for every
case of a dataset with one compiled program (`Predictor`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxbrats import files
from jaxbrats.data.discovery import discover, read_case_dir
from jaxbrats.data.loading import canonical_shape, from_canonical, load_case, nibabel
from jaxbrats.data.preprocess import preprocess_case
from jaxbrats.engine.workdir import read_preprocessing
from jaxbrats.errors import CaseError, JaxbratsError
from jaxbrats.inference.nifti import write_nifti
from jaxbrats.inference.segment import case_locator, pad_shape, pad_to, segment
from jaxbrats.inference.trained import load_trained
from jaxbrats.labels import CONVENTIONS, from_internal, region_voxel_counts
from jaxbrats.modalities import MODALITIES, SUBSET_NAMES, subset_index
from jaxbrats.runtime.sharding import OnMesh, eval_mesh


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


class Predictor:
    """A trained run ready to segment raw cases: its models loaded once, one compiled program per
    padded shape (`predict_folder` pads every case to one, so it compiles once)."""

    def __init__(self, workdir, overrides=(), stage: str | None = None, checkpoint="latest"):
        workdir = Path(workdir)
        self.method, self.graphdefs, self.models_state, self.config = load_trained(
            workdir, stage=stage, overrides=overrides, segmenting=True, checkpoint=checkpoint
        )
        self.preprocessing = read_preprocessing(workdir)
        self.program = segment_program(self.method, self.graphdefs, self.config.eval)

    def predict(self, record, out_path, convention: str | None = None, bucket=None) -> dict:
        """Segment the case of `record` (its seg file is not read) and write it to `out_path`; `bucket`:
        the padded shape (default: `inference.segment.pad_shape` of the case, its evaluation alone)."""
        # A seg file beside the images is not read: predict needs none, and its label values
        # (any release's convention) must not stop the segmentation.
        record = dataclasses.replace(record, seg=None)
        case = load_case(record, need_labels=False)
        present = np.asarray(record.present)
        self._check_served(present, record.directory)
        arrays, fields = preprocess_case(case, self.preprocessing["normalization"], self.preprocessing["margin"])
        box = [lo for lo, _ in fields["crop_box"]]
        labels = segment_one_case(
            self.method,
            self.graphdefs,
            self.models_state,
            arrays["image"],
            present,
            self.config.eval,
            box,
            bucket=bucket,
            program=self.program,
        )
        full = np.zeros(next(iter(case.images.values())).shape, np.uint8)
        full[tuple(slice(lo, hi) for lo, hi in fields["crop_box"])] = labels
        convention = convention or case.convention or "brats2023"
        write_nifti(
            from_internal(from_canonical(full, case.affine), convention), case.affine, out_path, _first_header(record)
        )
        return {
            "case": record.case_id,
            "present": [m for m, p in zip(MODALITIES, present) if p],
            "missing": [m for m, p in zip(MODALITIES, present) if not p],
            "convention": convention,
            "voxels": region_voxel_counts(labels),
            "out": str(out_path),
        }

    def _check_served(self, present, where) -> None:
        served = self.method.served_subsets()
        if subset_index(present) not in served:
            have = "+".join(m for m, p in zip(MODALITIES, present) if p)
            raise JaxbratsError(
                f"{where}: this {self.config.method_name} run has no model for the modalities the case has "
                f"({have}); it segments: {', '.join(SUBSET_NAMES[s] for s in served)}"
            )


def _check_convention(convention) -> None:
    if convention is not None and convention not in CONVENTIONS:
        raise JaxbratsError(f"--convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")


def predict_case(
    workdir,
    case_dir,
    out_path,
    convention: str | None = None,
    overrides=(),
    stage: str | None = None,
    checkpoint="latest",
) -> dict:
    """Write the segmentation of `case_dir` to `out_path` (the models of `stage`, default the last that
    segments, from `checkpoint`: `load_trained`); returns what was done, with the checkpoint read."""
    case_dir, out_path = Path(case_dir), Path(out_path)
    if _inside(out_path, case_dir):
        raise JaxbratsError(f"{out_path}: inside the input case folder {case_dir}; choose an output outside it")
    _check_convention(convention)
    predictor = Predictor(workdir, overrides, stage, checkpoint)
    info = predictor.predict(read_case_dir(case_dir), out_path, convention)
    return {**info, "checkpoint": predictor.method.served_checkpoint}


def header_bucket(records, cfg) -> tuple[tuple[int, int, int], list[CaseError]]:
    """One padded shape that holds every case's crop: `pad_shape` of the largest reoriented source
    shape, read from the NIfTI headers alone (a crop is never larger than its source); the cases
    whose header cannot be read, as errors."""
    nib = nibabel()  # before the loop: its missing package is the user's error, not a bad case
    shapes, bad = [], []
    for record in records:
        modality = next(m for m in MODALITIES if m in record.images)
        try:
            header = nib.load(record.images[modality]).header
            shapes.append(canonical_shape(header.get_data_shape(), header.get_best_affine()))
        except Exception as e:  # noqa: BLE001  nibabel raises several types for a broken file
            bad.append(CaseError(record.case_id, record.images[modality], f"unreadable NIfTI header ({e})"))
    return (pad_shape(np.max(shapes, axis=0), cfg) if shapes else tuple(cfg.window)), bad


def predict_folder(
    workdir,
    input_dir,
    out_dir,
    convention: str | None = None,
    overrides=(),
    stage: str | None = None,
    progress: bool = True,
    checkpoint="latest",
) -> dict:
    """Segment every case of `input_dir` (a folder of case folders, or any layout `prepare` reads) into
    ``out_dir/<case id>.nii.gz``, like nnU-Net's predict: the run loaded and the program compiled once
    (every case padded to `header_bucket`; the labels are those of each case alone, see
    `inference.segment.segment`), a progress bar, one line per case that fails (the others go on), and
    ``out_dir/predict_summary.json`` (per case: the modalities present and missing, or the error)."""
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if _inside(out_dir, input_dir):
        raise JaxbratsError(f"{out_dir}: inside the input folder {input_dir}; choose an output outside it")
    _check_convention(convention)
    _, records, bad = discover(input_dir, need_labels=False)
    predictor = Predictor(workdir, overrides, stage, checkpoint)
    bucket, unreadable = header_bucket(records, predictor.config.eval)
    failed = {e.case_id: str(e) for e in bad + unreadable}
    for error in failed.values():
        print(f"failed: {error}", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for record in tqdm(
        [r for r in records if r.case_id not in failed],
        desc="predict",
        unit="case",
        disable=not progress,
        dynamic_ncols=True,
    ):
        try:
            done.append(predictor.predict(record, out_dir / f"{record.case_id}.nii.gz", convention, bucket))
        except (JaxbratsError, OSError) as e:
            failed[record.case_id] = (
                str(e) if isinstance(e, JaxbratsError) else f"{e.filename or record.directory}: {e.strerror or e}"
            )
            tqdm.write(f"failed: {failed[record.case_id]}", file=sys.stderr)
    summary = {
        "input": str(input_dir),
        "out": str(out_dir),
        "bucket": list(bucket),
        "checkpoint": predictor.method.served_checkpoint,
        "predicted": done,
        "failed": [{"case": c, "error": e} for c, e in sorted(failed.items())],
    }
    files.write_text_atomic(out_dir / "predict_summary.json", json.dumps(summary, indent=1) + "\n")
    return summary


def segment_program(method, graphdefs, cfg):
    """The jitted segmentation of one padded case (`inference.segment.segment`), on `eval.mesh` as
    `evaluation.program.evaluate` runs it."""

    def segment_case(models_state, image, mask, subset, case):
        models = {n: nnx.merge(g, models_state[n]) for n, g in graphdefs.items()}
        return segment(method, models, image, mask, cfg, case=case, subset=subset)

    return OnMesh(jax.jit(segment_case), eval_mesh(cfg))


def segment_one_case(
    method, graphdefs, models_state, image, modality_mask, cfg, box_start=(0, 0, 0), bucket=None, program=None
) -> np.ndarray:
    """Internal labels of one preprocessed case (D, H, W, 4): `inference.segment.segment`, as
    `evaluation.program.evaluate` runs it.

    The case is padded at the end to `bucket` (default `inference.segment.pad_shape`:
    each axis rounded up to `eval.bucket_multiple`, at least the window: the
    bucket of an evaluation of this case alone) and segmented with its extent
    and its corner in the source grid (`box_start`) as the case's locator, so
    `Method.fill` (M3AE's x_sub read into the padding too) and the window grid (that
    of the case's extent) are the evaluation's; the labels equal the
    evaluation's for the subset `modality_mask`, whatever bucket that
    evaluation used. `program`: a `segment_program` to reuse (it compiles once per bucket).
    """
    image = np.asarray(image, np.float32)
    shape = image.shape[:3]
    bucket = pad_shape(shape, cfg) if bucket is None else bucket
    if any(s > b for s, b in zip(shape, bucket)):
        raise JaxbratsError(f"case of shape {shape} does not fit the padded shape {tuple(bucket)}")
    program = segment_program(method, graphdefs, cfg) if program is None else program
    mask = np.asarray(modality_mask, bool)
    labels = program(
        models_state, pad_to(image, bucket), mask, np.int32(subset_index(mask)), case_locator(shape, box_start)
    )
    return np.asarray(labels)[: shape[0], : shape[1], : shape[2]]


def _first_header(record):
    path = next(record.images[m] for m in MODALITIES if m in record.images)
    header = nibabel().load(path).header.copy()
    header.set_data_dtype(np.uint8)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    return header
