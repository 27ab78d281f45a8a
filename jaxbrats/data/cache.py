"""The preprocessed cache: format, crash-safe writing, memory-mapped reading.

Layout of a cache directory::

    index.json                    dataset index: layout, settings, case ids
    .prepare.lock                 one `prepare` at a time (`jaxbrats.runtime.locks`): names the
                                  run writing the cache, empty when none is
    cases/<case_id>/image.npy     float32 (D, H, W, 4), channels in MODALITIES order,
                                  zeros for a modality the case lacks
    cases/<case_id>/label.npy     uint8 (D, H, W), internal labels (if the case has a seg)
    cases/<case_id>/foreground.npy int32 (N, 4) rows (label, i, j, k) for oversampling
    cases/<case_id>/manifest.json crop box, source shape/affine/orientation,
                                  sources and their fingerprint, present modalities,
                                  normalisation statistics, background value per
                                  modality, format version

Crash safety: an entry is written into ``cases/.partial-*`` and renamed into
place only once complete (manifest last), so a directory named after a case
is always whole. ``index.json`` is replaced atomically at the end of a
prepare run; a cache without it is not usable. Files and folders get the
permissions the user's umask gives (`jaxbrats.files`), so a cache can be shared.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np

from jaxbrats import files
from jaxbrats.errors import JaxbratsError

FORMAT_VERSION = 1
INDEX = "index.json"
MANIFEST = "manifest.json"
LOCK = ".prepare.lock"  # beside index.json, never in cases/: not an entry, nor a partial one
_PARTIAL = ".partial-"


def _cases_dir(cache_dir) -> Path:
    return Path(cache_dir) / "cases"


def source_fingerprint(record) -> dict[str, list[int]]:
    """Size and modification time of each source file: a change means re-preparing."""
    out = {}
    for path in record.files:
        st = path.stat()
        out[str(path)] = [st.st_size, st.st_mtime_ns]
    return out


def read_manifest(entry: Path) -> dict:
    path = entry / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise JaxbratsError(f"{path}: missing (incomplete cache entry; run jaxbrats prepare again)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JaxbratsError(f"{path}: corrupt manifest ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise JaxbratsError(
            f"{path}: cache format {manifest.get('format_version')} is not {FORMAT_VERSION}; run jaxbrats prepare again"
        )
    return manifest


def entry_is_current(cache_dir, case_id: str, fingerprint: dict, settings: dict) -> bool:
    """True when a complete entry exists for the same sources and settings."""
    try:
        manifest = read_manifest(_cases_dir(cache_dir) / case_id)
    except JaxbratsError:
        return False
    # An entry from before the background was detected (no "background" in its manifest) is redone
    # once: a constant non-zero background was then taken for brain.
    return (
        manifest["source_fingerprint"] == fingerprint and manifest["settings"] == settings and "background" in manifest
    )


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_entry(cache_dir, case_id: str, arrays: dict[str, np.ndarray], manifest: dict) -> None:
    """Write one case entry so that readers see either nothing or all of it."""
    cases = _cases_dir(cache_dir)
    cases.mkdir(parents=True, exist_ok=True)
    partial = files.mkdtemp(prefix=f"{_PARTIAL}{case_id}-", dir=cases)  # the umask's mode, not 0700
    old = None
    try:
        for name, array in arrays.items():
            np.save(partial / f"{name}.npy", np.ascontiguousarray(array))
        _write_json(partial / MANIFEST, {"format_version": FORMAT_VERSION, **manifest})
        final = cases / case_id
        if final.exists():  # an outdated entry: move it aside before the swap
            old = files.mkdtemp(prefix=f"{_PARTIAL}old-", dir=cases)
            final.rename(old / case_id)
        partial.rename(final)
    finally:
        remove_partial_entries(cache_dir, only=partial)
        if old is not None:
            remove_partial_entries(cache_dir, only=old)


def remove_partial_entries(cache_dir, only: Path | None = None) -> None:
    """Delete what interrupted writes left behind (all of it, or one directory)."""
    cases = _cases_dir(cache_dir)
    targets = [only] if only else (cases.glob(_PARTIAL + "*") if cases.is_dir() else [])
    for path in targets:
        shutil.rmtree(path, ignore_errors=True)


def write_index(cache_dir, layout: str, case_ids: list[str], settings: dict) -> None:
    """Atomically replace the dataset index."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    index = {"format_version": FORMAT_VERSION, "layout": layout, "settings": settings, "cases": case_ids}
    files.write_atomic(cache_dir / INDEX, lambda tmp: _write_json(tmp, index))


def remove_index(cache_dir) -> None:
    (Path(cache_dir) / INDEX).unlink(missing_ok=True)


# Grain reads records from a thread pool. np.load parses each .npy header with
# ast.literal_eval, and CPython 3.11.7's parser is not thread-safe ("AST
# constructor recursion depth mismatch", seen in this test suite), so entries
# are opened one at a time; the arrays themselves are then read concurrently.
_OPEN_LOCK = threading.Lock()


class CacheDataset:
    """Random access to a prepared cache; arrays are memory-mapped on first use.

    Pickles without its open memory maps, so it can be sent to loader workers.
    """

    def __init__(self, cache_dir, case_ids: list[str] | None = None):
        self.cache_dir = Path(cache_dir)
        index_path = self.cache_dir / INDEX
        try:
            self.index = json.loads(index_path.read_text())
        except FileNotFoundError:
            raise JaxbratsError(
                f"{index_path}: missing; prepare the data with `jaxbrats prepare DATA_DIR {cache_dir}`"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise JaxbratsError(f"{index_path}: corrupt index ({e})") from None
        if self.index.get("format_version") != FORMAT_VERSION:
            raise JaxbratsError(f"{index_path}: cache format is not {FORMAT_VERSION}; run jaxbrats prepare again")
        available = self.index["cases"]
        if case_ids is None:
            case_ids = available
        unknown = sorted(set(case_ids) - set(available))
        if unknown:
            raise JaxbratsError(f"{index_path}: unknown case ids {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        self.case_ids = list(case_ids)
        self.manifests = [read_manifest(_cases_dir(cache_dir) / c) for c in self.case_ids]
        self._arrays: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.case_ids)

    def arrays(self, i: int) -> dict[str, np.ndarray]:
        """Memory-mapped arrays of case i: image, and label/foreground when labelled."""
        with _OPEN_LOCK:
            if i not in self._arrays:
                entry = _cases_dir(self.cache_dir) / self.case_ids[i]
                self._arrays[i] = {p.stem: np.load(p, mmap_mode="r") for p in entry.glob("*.npy")}
            return self._arrays[i]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"} | {"_arrays": {}}
