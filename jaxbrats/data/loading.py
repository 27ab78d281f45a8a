"""Read a case's NIfTI files with nibabel and check that they make sense.

Every problem becomes a `CaseError` naming the case, the file and what is
wrong. Arrays come back reoriented to RAS+ (nibabel's canonical orientation),
so every case of every release has the same axis directions; the original
orientation is kept so that predictions can be written back.

A 4D image holding several modalities (the Medical Segmentation Decathlon's)
is read once and split into one (D, H, W) array per modality, each checked
like a separate file; errors name the file and the channel.
"""

from __future__ import annotations

import dataclasses
import gzip
import zlib
from pathlib import Path

import numpy as np

from jaxbrats.data.discovery import CaseRecord
from jaxbrats.errors import CaseError, require
from jaxbrats.labels import CONVENTIONS, DETECTED_CONVENTIONS, convention_values, detect_convention, to_internal
from jaxbrats.modalities import MODALITIES

#: Largest elementwise difference allowed between two files' affines (mm).
AFFINE_TOLERANCE = 1e-3
#: Largest distance of a float-stored label from an integer.
LABEL_ROUNDING_TOLERANCE = 1e-3


@dataclasses.dataclass
class LoadedCase:
    """A validated case in RAS+ voxel order.

    `images` maps each present modality to a float32 (D, H, W) array; `labels`
    holds internal labels (uint8) or is None when the case has no seg.
    """

    record: CaseRecord
    images: dict[str, np.ndarray]
    labels: np.ndarray | None
    convention: str | None
    affine: np.ndarray  # the source affine (before reorientation)
    shape: tuple[int, ...]  # the source shape
    axcodes: tuple[str, ...]  # the source orientation, e.g. ("L", "P", "S")


def nibabel(module: str = "nibabel"):
    """nibabel (or one of its modules), imported on first use: the networks, the train step and the
    benchmarks run without it (`errors.require`)."""
    return require(module, "reading or writing NIfTI volumes")


def to_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorder and flip the axes of a source-orientation array into RAS+."""
    ornt = nibabel("nibabel.orientations")
    transform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt("RAS"))
    return ornt.apply_orientation(array, transform)


def canonical_shape(shape, affine) -> tuple[int, int, int]:
    """The shape `to_canonical` gives a volume of `shape` (its first three axes) stored with `affine`."""
    ornt = nibabel("nibabel.orientations")
    out = [0, 0, 0]
    for source_axis, (target_axis, _) in enumerate(ornt.io_orientation(np.asarray(affine))):
        out[int(target_axis)] = int(shape[source_axis])
    return tuple(out)


def from_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of `to_canonical`: a RAS+ array back into the source orientation."""
    ornt = nibabel("nibabel.orientations")
    transform = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.io_orientation(affine))
    return ornt.apply_orientation(array, transform)


def _read(case_id: str, path: Path, channels: int | None = None):
    """(affine, data) of one NIfTI file: 3D, or 4D with `channels` channels when given.

    The whole file is decompressed up front so that gzip's CRC is checked:
    nibabel alone stops reading at the end of the voxel data and would accept
    a corrupted stream.
    """
    nib = nibabel()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CaseError(case_id, path, "file not found") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise CaseError(case_id, path, f"truncated or corrupt gzip data ({_describe(e)})") from None
    image = None
    for kind in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            image = kind.from_bytes(raw)
            break
        except Exception:  # nibabel raises several types for a foreign header
            continue
    if image is None:
        raise CaseError(case_id, path, "not a readable NIfTI file")
    try:
        data = np.asanyarray(image.dataobj)
    except (EOFError, OSError, ValueError) as e:
        raise CaseError(case_id, path, f"truncated or corrupt data ({_describe(e)})") from None
    if channels is not None:
        if channels == 1 and data.ndim == 3:
            data = data[..., None]
        if data.ndim != 4 or data.shape[-1] != channels:
            raise CaseError(
                case_id, path, f"expected a 4D image of {channels} channels (dataset.json), got shape {data.shape}"
            )
        return image.affine, data
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(case_id, path, f"expected a 3D volume, got shape {data.shape}")
    return image.affine, data


def _describe(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _check_geometry(case_id, path, shape, affine, ref_path, ref_shape, ref_affine):
    if shape != ref_shape:
        raise CaseError(case_id, path, f"shape {shape} differs from {ref_path.name} {ref_shape}")
    diff = np.abs(affine - ref_affine).max()
    if diff > AFFINE_TOLERANCE:
        raise CaseError(
            case_id, path, f"affine differs from {ref_path.name} by {diff:.4g} (tolerance {AFFINE_TOLERANCE})"
        )


def _check_labels(case_id: str, path: Path, data: np.ndarray, convention: str | None) -> tuple[np.ndarray, str]:
    if not np.all(np.isfinite(data)):
        raise CaseError(case_id, path, "labels contain NaN or Inf")
    rounded = np.rint(data)
    if np.issubdtype(data.dtype, np.floating) and np.abs(data - rounded).max() > LABEL_ROUNDING_TOLERANCE:
        raise CaseError(case_id, path, "labels are not integers")
    values = np.unique(rounded).astype(np.int64).tolist()
    if convention is None:  # plain layout: the values say which release
        convention = detect_convention(values)
        if convention is None:
            tried = "; ".join(f"{c} {convention_values(c)}" for c in DETECTED_CONVENTIONS)
            raise CaseError(case_id, path, f"labels {values} fit no label convention (tried {tried})")
    allowed = convention_values(convention)
    outside = sorted(set(values) - set(allowed))
    if outside:
        raise CaseError(
            case_id,
            path,
            f"labels {outside} outside the {convention} convention {allowed} (labels found {values}; "
            f"`jaxbrats prepare --convention` states another: {', '.join(sorted(CONVENTIONS))})",
        )
    return to_internal(rounded.astype(np.int64), convention), convention


def load_case(record: CaseRecord, need_labels: bool = True, convention: str | None = None) -> LoadedCase:
    """Read and validate all files of a case; raises `CaseError` on the first problem.

    `convention` (a label convention name) replaces the record's, e.g. the
    one stated for a whole dataset with `jaxbrats prepare --convention`.
    """
    cid = record.case_id
    if need_labels and record.seg is None:
        raise CaseError(cid, record.directory, "segmentation file missing (labels are needed)")
    images, ref = {}, None
    read: dict[Path, tuple] = {}  # a 4D file is read once for all its channels
    for modality in MODALITIES:
        if modality not in record.images:
            continue
        path, channel = record.source(modality)
        if path not in read:
            read[path] = _read(cid, path, record.num_channels if channel is not None else None)
        affine, data = read[path]
        where = "" if channel is None else f"channel {channel} ({modality}): "
        if channel is not None:
            data = data[..., channel]
        if ref is None:
            ref = (path, data.shape, affine)
        else:
            _check_geometry(cid, path, data.shape, affine, *ref)
        data = data.astype(np.float32)
        if not np.all(np.isfinite(data)):
            raise CaseError(cid, path, f"{where}image contains NaN or Inf")
        if not np.any(data):
            raise CaseError(cid, path, f"{where}image is all zero")
        images[modality] = to_canonical(data, affine)
    read.clear()
    ref_path, shape, affine = ref
    labels, convention = None, convention or record.convention
    if record.seg is not None:
        seg_affine, seg = _read(cid, record.seg)
        _check_geometry(cid, record.seg, seg.shape, seg_affine, ref_path, shape, affine)
        labels, convention = _check_labels(cid, record.seg, seg, convention)
        labels = to_canonical(labels, affine)
    axcodes = nibabel("nibabel.orientations").aff2axcodes(affine)
    return LoadedCase(record, images, labels, convention, affine, shape, axcodes)
