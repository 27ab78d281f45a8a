"""Find BraTS cases on disk: detect the release layout, list each case's files.

Layouts recognised:

- ``brats2018``: ``<root>/{HGG,LGG}/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` (2018, 2019)
- ``brats2020``: ``<root>/BraTS20_*_XXX/BraTS20_*_XXX_{...}.nii[.gz]``
- ``brats2021``: ``<root>/BraTS2021_XXXXX/BraTS2021_XXXXX_{...}.nii.gz``
- ``brats2023``: ``<root>/BraTS-GLI-XXXXX-YYY/...-{t1n,t1c,t2w,t2f,seg}.nii.gz``
- ``plain``: one folder per case, files named by modality (``flair.nii.gz``, ...)
- ``msd``: the Medical Segmentation Decathlon (Task01_BrainTumour): a
  ``dataset.json`` with ``"modality"``; ``imagesTr/<case>.nii.gz`` is one 4D
  image (channels in dataset.json order), ``labelsTr/<case>.nii.gz``, and
  ``imagesTs/`` without labels. Cases come from its ``"training"`` (and
  ``"test"``) lists. nnU-Net v1 raw data (same dataset.json, one file per
  channel ``<case>_0000.nii.gz``, ...) is read as this layout too.
- ``nnunetv2``: nnU-Net v2 raw data: a ``dataset.json`` with
  ``"channel_names"``, ``"labels"`` (name -> value) and ``"file_ending"``;
  ``imagesTr/<case>_0000<file_ending>``, ... one file per channel,
  ``labelsTr/<case><file_ending>``, ``imagesTs/`` without labels.

A dataset.json's channel names map to modalities through the aliases of
`jaxbrats.modalities` (a modality it lacks is missing in every case), its label
names to internal labels by keywords (`jaxbrats.labels.internal_label_of_name`);
the case's convention is built from that mapping. Cases without labels
(imagesTs) are listed only when labels are not needed.

A case may lack modality files; the record says which are present.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from jaxbrats.errors import CaseError, JaxbratsError
from jaxbrats.labels import INTERNAL_LABELS, INTERNAL_NAMES, internal_label_of_name, mapped_convention
from jaxbrats.modalities import MODALITIES, MODALITY_ALIASES, modality_of_token

LAYOUT_CONVENTION = {
    "brats2018": "brats2018",
    "brats2020": "brats2018",
    "brats2021": "brats2018",
    "brats2023": "brats2023",
    "plain": None,  # decided per case from the label values (`labels.detect_convention`)
    "msd": None,  # built from dataset.json's labels (`dataset_json_layout`)
    "nnunetv2": None,  # likewise
}
DATASET_JSON = "dataset.json"
LAYOUTS = tuple(LAYOUT_CONVENTION)

_CASE_PATTERNS = {
    "brats2020": re.compile(r"^BraTS20_[A-Za-z]+_\d+$"),
    "brats2021": re.compile(r"^BraTS2021_\d+$"),
    "brats2023": re.compile(r"^BraTS-[A-Z]+-\d+-\d+$"),
}
_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class CaseRecord:
    """One case on disk. `images` maps canonical modality -> path (present ones only).

    A 4D image holding several modalities (the Decathlon's) is the path of each
    of them; `channels` gives each such modality's index along its last axis
    and `num_channels` the channel count the file must have. `dataset_json`
    is the file that named the channels and labels, if any.
    """

    case_id: str
    directory: Path
    images: dict[str, Path]
    seg: Path | None
    layout: str
    convention: str | None
    channels: dict[str, int] = dataclasses.field(default_factory=dict)
    num_channels: int | None = None
    dataset_json: Path | None = None

    @property
    def present(self) -> tuple[bool, ...]:
        return tuple(m in self.images for m in MODALITIES)

    def source(self, modality: str) -> tuple[Path, int | None]:
        """(path, channel index in a 4D file or None) of a present modality."""
        return self.images[modality], self.channels.get(modality)

    @property
    def files(self) -> list[Path]:
        """Every file the case is read from, once each (dataset.json too: it fixes the meaning)."""
        images = list(dict.fromkeys(self.images[m] for m in MODALITIES if m in self.images))
        return images + ([self.seg] if self.seg else []) + ([self.dataset_json] if self.dataset_json else [])


def _is_nifti(path: Path) -> bool:
    return path.is_file() and bool(_NIFTI.search(path.name))


def _token(path: Path) -> str:
    stem = _NIFTI.sub("", path.name)
    return re.split(r"[_\-.]", stem)[-1]


def _case_dirs(root: Path) -> tuple[str, list[Path]]:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    grades = [p for p in subdirs if p.name in ("HGG", "LGG")]
    if grades:
        return "brats2018", sorted((c for g in grades for c in g.iterdir() if c.is_dir()), key=lambda p: p.name)
    for layout, pattern in _CASE_PATTERNS.items():
        matching = [p for p in subdirs if pattern.match(p.name)]
        if matching and len(matching) >= len(subdirs) / 2:
            return layout, matching
    with_modalities = [p for p in subdirs if any(_is_nifti(f) and modality_of_token(_token(f)) for f in p.iterdir())]
    if with_modalities:
        return "plain", with_modalities
    raise JaxbratsError(
        f"{root}: no BraTS cases found (expected HGG/LGG folders, BraTS20_*, BraTS2021_*, "
        "BraTS-GLI-* case folders, or one folder per case with files named by modality)"
    )


def _record(case_dir: Path, layout: str) -> CaseRecord:
    images: dict[str, Path] = {}
    seg = None
    for f in sorted(case_dir.iterdir()):
        if not _is_nifti(f):
            continue
        kind = modality_of_token(_token(f))
        if kind is None:
            continue
        if kind == "seg":
            if seg is not None:
                raise CaseError(case_dir.name, f, f"second segmentation file (also {seg.name})")
            seg = f
        elif kind in images:
            raise CaseError(case_dir.name, f, f"second {kind} file (also {images[kind].name})")
        else:
            images[kind] = f
    if not images:
        raise CaseError(case_dir.name, case_dir, "no modality files (" + ", ".join(MODALITIES) + ")")
    return CaseRecord(case_dir.name, case_dir, images, seg, layout, LAYOUT_CONVENTION[layout])


def discover(root, need_labels: bool = True) -> tuple[str, list[CaseRecord], list[CaseError]]:
    """Detect the layout of `root` and return (layout, cases, bad cases).

    Cases whose folder is unusable (no modality files, duplicated files) are
    returned as errors, not raised, so a dataset-wide check can list them all.
    A dataset.json that cannot be used raises (one line naming what is wrong).
    `need_labels=False` also lists the unlabelled cases of a dataset.json
    layout (imagesTs).
    """
    root = Path(root)
    if not root.is_dir():
        raise JaxbratsError(f"{root}: not a directory")
    if not any(root.iterdir()):
        raise JaxbratsError(f"{root}: empty directory")
    if (root / DATASET_JSON).is_file():
        return _discover_dataset_json(root, need_labels)
    layout, dirs = _case_dirs(root)
    cases, bad = [], []
    seen: dict[str, Path] = {}
    for d in dirs:
        if d.name in seen:
            bad.append(CaseError(d.name, d, f"duplicate case id (also {seen[d.name]})"))
            continue
        seen[d.name] = d
        try:
            cases.append(_record(d, layout))
        except CaseError as e:
            bad.append(e)
    return layout, cases, bad


_TOKENS_2023 = {"t1n", "t1c", "t2w", "t2f"}


def read_case_dir(case_dir) -> CaseRecord:
    """The record of a single case folder (for `jaxbrats predict`), layout guessed from its names.

    A folder that matches no release pattern is "plain"; its label convention is
    guessed from the file names: 2023 tokens (t1n, t1c, t2w, t2f) -> brats2023,
    the older names (flair, t1ce, ...) -> brats2018.
    """
    case_dir = Path(case_dir)
    if not case_dir.is_dir():
        raise JaxbratsError(f"{case_dir}: not a directory")
    layout = next((name for name, pattern in _CASE_PATTERNS.items() if pattern.match(case_dir.name)), "plain")
    record = _record(case_dir, layout)
    if layout == "plain":
        tokens = {_token(p).lower() for p in record.images.values()}
        record = dataclasses.replace(record, convention="brats2023" if tokens & _TOKENS_2023 else "brats2018")
    return record


# --- dataset.json layouts: Medical Segmentation Decathlon, nnU-Net v2 --------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetJson:
    """What a dataset.json says: layout, modality -> channel index, label convention, file ending."""

    path: Path
    layout: str
    channels: dict[str, int]
    convention: str
    file_ending: str
    meta: dict


def _known_channel_names() -> str:
    return "; ".join("/".join(aliases) for aliases in MODALITY_ALIASES.values())


def _channel_modalities(path: Path, key: str, names) -> dict[str, int]:
    if not isinstance(names, dict) or not names:
        raise JaxbratsError(f"{path}: '{key}' must be a non-empty object of channel index -> name")
    out: dict[str, int] = {}
    unmapped = []
    for index, name in names.items():
        if not (isinstance(index, str) and index.isdigit() and isinstance(name, str)):
            raise JaxbratsError(f"{path}: '{key}' entry {index!r}: {name!r} is not channel index -> name")
        modality = modality_of_token(re.sub(r"[\s_\-]", "", name))
        if modality in (None, "seg"):
            unmapped.append(name)
        elif modality in out:
            raise JaxbratsError(
                f"{path}: '{key}' channels {out[modality]} and {index} ({name!r}) both map to {modality}"
            )
        else:
            out[modality] = int(index)
    if unmapped:
        raise JaxbratsError(
            f"{path}: '{key}' names {unmapped} map to no modality (known names: {_known_channel_names()})"
        )
    if sorted(out.values()) != list(range(len(out))):
        raise JaxbratsError(f"{path}: '{key}' indices {sorted(out.values())} are not 0..{len(out) - 1}")
    return out


def _label_convention(path: Path, layout: str, labels) -> str:
    if not isinstance(labels, dict) or not labels:
        raise JaxbratsError(f"{path}: 'labels' must be a non-empty object")
    pairs = []  # (value, name)
    if layout == "msd":  # value -> name
        for value, name in labels.items():
            if not (isinstance(value, str) and value.isdigit() and isinstance(name, str)):
                raise JaxbratsError(f"{path}: 'labels' entry {value!r}: {name!r} is not label value -> name")
            pairs.append((int(value), name))
    else:  # nnU-Net v2: name -> value
        for name, value in labels.items():
            if isinstance(value, (list, tuple)):
                raise JaxbratsError(
                    f"{path}: label {name!r} has a list of values {value} (an nnU-Net region-based dataset); "
                    "jaxbrats needs one integer value per label name"
                )
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise JaxbratsError(f"{path}: label {name!r} has value {value!r}; expected an integer >= 0")
            pairs.append((value, name))
    mapping: dict[int, int] = {}
    names: dict[int, str] = {}
    unmapped = []
    for value, name in pairs:
        internal = internal_label_of_name(name)
        if internal is None:
            unmapped.append(name)
        elif value in mapping:
            raise JaxbratsError(f"{path}: labels {names[value]!r} and {name!r} both have value {value}")
        else:
            mapping[value], names[value] = internal, name
    if unmapped:
        raise JaxbratsError(
            f"{path}: label names {unmapped} map to no tumour label (known words: background; edema, oedema, SNFH; "
            "necrosis, necrotic, non-enhancing, NCR, NET, core; enhancing, ET)"
        )
    missing = [INTERNAL_NAMES[i] for i in INTERNAL_LABELS if i not in mapping.values()]
    if missing:
        raise JaxbratsError(f"{path}: no label name maps to {missing} (labels {sorted(names.values())})")
    return mapped_convention(mapping, layout)


def dataset_json_layout(path) -> DatasetJson:
    """Read and check a dataset.json: its layout, channel -> modality map and label convention.

    Raises `JaxbratsError` (one line naming the file and the key) for anything
    it cannot use.
    """
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JaxbratsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise JaxbratsError(f"{path}: expected a JSON object")
    if "channel_names" in meta:
        layout, key = "nnunetv2", "channel_names"
    elif "modality" in meta:
        layout, key = "msd", "modality"
    else:
        raise JaxbratsError(
            f"{path}: neither 'modality' (Medical Segmentation Decathlon) nor 'channel_names' (nnU-Net v2)"
        )
    if "labels" not in meta:
        raise JaxbratsError(f"{path}: 'labels' missing")
    channels = _channel_modalities(path, key, meta[key])
    convention = _label_convention(path, layout, meta["labels"])
    ending = meta.get("file_ending", ".nii.gz") if layout == "nnunetv2" else ".nii.gz"
    if not isinstance(ending, str) or not _NIFTI.fullmatch(ending):
        raise JaxbratsError(f"{path}: file_ending {ending!r}: only NIfTI (.nii.gz, .nii) is read")
    return DatasetJson(path, layout, channels, convention, ending, meta)


def _nifti_files(folder: Path) -> list[Path]:
    """NIfTI files of a folder, without hidden ones (macOS "._" copies ship inside MSD's archive)."""
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if not f.name.startswith(".") and _is_nifti(f))


def _msd_entries(ds: DatasetJson, root: Path, key: str, folder: str) -> list[tuple[Path, Path | None]]:
    """(image, label or None) per case from dataset.json's `key` list, else from the folder."""
    entries = ds.meta.get(key)
    if entries is None:
        label_dir = root / "labelsTr" if folder == "imagesTr" else None
        return [(f, label_dir / f.name if label_dir else None) for f in _nifti_files(root / folder)]
    if not isinstance(entries, list):
        raise JaxbratsError(f"{ds.path}: '{key}' must be a list")
    out = []
    for entry in entries:
        if isinstance(entry, str) and key == "test":
            image, label = entry, None
        elif isinstance(entry, dict) and isinstance(entry.get("image"), str):
            image, label = entry["image"], entry.get("label")
        else:
            raise JaxbratsError(f"{ds.path}: '{key}' entry {entry!r} has no image path")
        out.append((root / image, root / label if isinstance(label, str) else None))
    return out


def _msd_record(ds: DatasetJson, case_id: str, image: Path, seg: Path | None) -> CaseRecord:
    common = {
        "case_id": case_id,
        "directory": image.parent,
        "seg": seg,
        "layout": ds.layout,
        "convention": ds.convention,
        "dataset_json": ds.path,
    }
    if image.is_file():  # one 4D image, a channel per modality
        images = dict.fromkeys(ds.channels, image)
        return CaseRecord(images=images, channels=dict(ds.channels), num_channels=len(ds.channels), **common)
    # nnU-Net v1: the listed name is the case; its channels are <case>_0000.nii.gz, ...
    ext = _NIFTI.search(image.name)[0] if _NIFTI.search(image.name) else ".nii.gz"
    files = {m: image.parent / f"{case_id}_{i:04d}{ext}" for m, i in ds.channels.items()}
    images = {m: f for m, f in files.items() if f.is_file()}
    if not images:
        raise CaseError(case_id, image, f"image file not found (nor per-channel files {case_id}_0000{ext}, ...)")
    return CaseRecord(images=images, **common)


def _nnunet_cases(ds: DatasetJson, root: Path, folder: str, bad: list) -> list[tuple[str, dict[str, Path], Path]]:
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ds.file_ending) + "$")
    by_index = {i: m for m, i in ds.channels.items()}
    groups: dict[str, dict[str, Path]] = {}
    failed: set[str] = set()
    folder_path = root / folder
    for f in sorted(folder_path.iterdir()) if folder_path.is_dir() else []:
        if f.name.startswith(".") or not f.is_file():
            continue
        match = pattern.match(f.name)
        if not match:  # e.g. a whole case in one file: that case is bad, not read without it
            stem = _NIFTI.sub("", f.name)
            bad.append(CaseError(stem, f, f"not named CASE_XXXX{ds.file_ending} (one file per channel, nnU-Net v2)"))
            failed.add(stem)
            continue
        case_id, index = match[1], int(match[2])
        if index not in by_index:
            bad.append(
                CaseError(case_id, f, f"channel {index:04d} is not in {ds.path.name} channel_names {sorted(by_index)}")
            )
            failed.add(case_id)
            continue
        groups.setdefault(case_id, {})[by_index[index]] = f
    return [(c, images, folder_path) for c, images in groups.items() if c not in failed]


def _discover_dataset_json(root: Path, need_labels: bool) -> tuple[str, list[CaseRecord], list[CaseError]]:
    ds = dataset_json_layout(root / DATASET_JSON)
    if not (root / "imagesTr").is_dir() and not ds.meta.get("training"):
        raise JaxbratsError(f"{root / 'imagesTr'}: missing (the {ds.layout} layout keeps its training images there)")
    cases: list[CaseRecord] = []
    bad: list[CaseError] = []
    folders = [("imagesTr", "labelsTr", "training")] + ([] if need_labels else [("imagesTs", None, "test")])
    for folder, label_folder, key in folders:
        if ds.layout == "msd":
            found = []
            for image, seg in _msd_entries(ds, root, key, folder):
                found.append((_NIFTI.sub("", image.name), image, seg))
        else:
            found = [
                (case_id, images, root / label_folder / f"{case_id}{ds.file_ending}" if label_folder else None)
                for case_id, images, _ in _nnunet_cases(ds, root, folder, bad)
            ]
        for case_id, images, seg in found:
            try:
                if seg is not None and not seg.is_file():
                    if need_labels:
                        raise CaseError(case_id, seg, "label file not found")
                    seg = None
                if ds.layout == "msd":
                    record = _msd_record(ds, case_id, images, seg)
                else:
                    record = CaseRecord(
                        case_id, root / folder, images, seg, ds.layout, ds.convention, dataset_json=ds.path
                    )
                cases.append(record)
            except CaseError as e:
                bad.append(e)
    seen: dict[str, CaseRecord] = {}
    unique = []
    for record in cases:
        if record.case_id in seen:
            bad.append(
                CaseError(
                    record.case_id, record.directory, f"duplicate case id (also in {seen[record.case_id].directory})"
                )
            )
        else:
            seen[record.case_id] = record
            unique.append(record)
    if not unique and not bad:
        raise JaxbratsError(f"{root}: {DATASET_JSON} ({ds.layout}) lists no cases")
    return ds.layout, unique, bad
