"""Temporary files and folders with the permissions the user's umask gives, and atomic writes.

`tempfile.mkstemp`/`mkdtemp` create 0600 files and 0700 folders whatever the
umask (they are meant to be private). jaxbrats writes through them only to
rename the result into place, so a shared cache or results folder would be
unreadable to the rest of a group. These wrappers create the same way, then
set the mode a plain `open`/`mkdir` would have given (0666 / 0777 & ~umask)
before anything is renamed into place.

`write_atomic` and `write_text_atomic` are the library's one way to write a file: beside it under
a temporary name, then renamed into place, so a reader never finds half a file. `append_whole`
appends to a log (one write, undone when cut short), and `storage_cause` puts a failed write's
reason into words.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the umask can only be read by setting it. Set the most private one meanwhile,
    # so a file another thread creates in that instant is too private, never too open.
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def umask_mode(is_dir: bool) -> int:
    """The mode a new folder (0777) or file (0666) gets under the current umask."""
    return (0o777 if is_dir else 0o666) & ~current_umask()


def mkdtemp(prefix: str, dir) -> Path:
    """`tempfile.mkdtemp`, with the mode of a folder made by `mkdir`."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    os.chmod(path, umask_mode(True))
    return path


def mkstemp(prefix: str, suffix: str, dir) -> Path:
    """`tempfile.mkstemp` (closed), with the mode of a file made by `open(..., "w")`."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dir)
    try:
        os.fchmod(fd, umask_mode(False))
    finally:
        os.close(fd)
    return Path(path)


#: Suffixes that name a compression: a writer that picks its format from the name (nibabel for
#: ``.nii.gz``) needs the suffix before them too.
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


def full_suffix(path) -> str:
    """The suffix a writer reads its format from: ``.nii.gz`` for ``case.nii.gz``, ``.json`` for
    ``case.v2.json`` (only a compression suffix brings the one before it along)."""
    suffixes = Path(path).suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() in COMPRESSED_SUFFIXES:
        return "".join(suffixes[-2:])
    return Path(path).suffix


def write_atomic(path, write) -> None:
    """Write `path` by calling `write(tmp)` on a temporary file beside it (the same suffix, compound
    ones such as ``.nii.gz`` whole: `full_suffix`; the umask's mode), then renaming it into place: a
    reader never finds half a file under the final name, and a failed write leaves none there."""
    path = Path(path)
    tmp = mkstemp(prefix=".partial-", suffix=full_suffix(path), dir=path.parent)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path, text: str) -> None:
    """`write_atomic` of a text file."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def append_whole(path, data: bytes) -> None:
    """Append `data` to `path` (created with the umask's mode) in one write() call. A write cut short
    (a full disk, a quota) is undone, so the file never ends in part of `data`; the OSError goes on."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.fstat(fd).st_size
        try:
            done = os.write(fd, data)
            while done < len(data):  # a short write (the disk filled up): the rest fails or completes it
                more = os.write(fd, data[done:])
                if not more:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += more
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)


#: The operating system's error code that tensorstore (Orbax's storage layer) appends to its messages.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def storage_cause(error: BaseException) -> str | None:
    """Why a write failed, in words ("no space left on device"), from an OSError's errno or the code
    tensorstore appends to its message; None when neither gives one."""
    code = getattr(error, "errno", None)
    if not isinstance(code, int) or not code:
        found = _OS_ERROR_CODE.search(str(error))
        code = int(found.group(1)) if found else None
    if not code:
        return None
    words = os.strerror(code)
    return words[:1].lower() + words[1:]
