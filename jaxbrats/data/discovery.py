"""Find BraTS cases on disk: detect the release layout, list each case's files.

Layouts recognised (METHODS.md section 1):

- ``brats2018``: ``<root>/{HGG,LGG}/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` (2018, 2019)
- ``brats2020``: ``<root>/BraTS20_*_XXX/BraTS20_*_XXX_{...}.nii[.gz]``
- ``brats2021``: ``<root>/BraTS2021_XXXXX/BraTS2021_XXXXX_{...}.nii.gz``
- ``brats2023``: ``<root>/BraTS-GLI-XXXXX-YYY/...-{t1n,t1c,t2w,t2f,seg}.nii.gz``
- ``plain``: one folder per case, files named by modality (``flair.nii.gz``, ...)

A case may lack modality files; the record says which are present.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from jaxbrats.errors import CaseError, JaxbratsError
from jaxbrats.modalities import MODALITIES, modality_of_token

LAYOUT_CONVENTION = {
    "brats2018": "brats2018",
    "brats2020": "brats2018",
    "brats2021": "brats2018",
    "brats2023": "brats2023",
    "plain": None,  # decided from the label values, see `infer_plain_convention`
}
LAYOUTS = tuple(LAYOUT_CONVENTION)

_CASE_PATTERNS = {
    "brats2020": re.compile(r"^BraTS20_[A-Za-z]+_\d+$"),
    "brats2021": re.compile(r"^BraTS2021_\d+$"),
    "brats2023": re.compile(r"^BraTS-[A-Z]+-\d+-\d+$"),
}
_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class CaseRecord:
    """One case on disk. `images` maps canonical modality -> path (present ones only)."""

    case_id: str
    directory: Path
    images: dict[str, Path]
    seg: Path | None
    layout: str
    convention: str | None

    @property
    def present(self) -> tuple[bool, ...]:
        return tuple(m in self.images for m in MODALITIES)

    @property
    def files(self) -> list[Path]:
        return [self.images[m] for m in MODALITIES if m in self.images] + ([self.seg] if self.seg else [])


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


def discover(root) -> tuple[str, list[CaseRecord], list[CaseError]]:
    """Detect the layout of `root` and return (layout, cases, bad cases).

    Cases whose folder is unusable (no modality files, duplicated files) are
    returned as errors, not raised, so a dataset-wide check can list them all.
    """
    root = Path(root)
    if not root.is_dir():
        raise JaxbratsError(f"{root}: not a directory")
    if not any(root.iterdir()):
        raise JaxbratsError(f"{root}: empty directory")
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
