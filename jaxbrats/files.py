"""Temporary files and folders that end up with the permissions the user's umask gives.

`tempfile.mkstemp`/`mkdtemp` create 0600 files and 0700 folders whatever the
umask (they are meant to be private). jaxbrats writes through them only to
rename the result into place, so a shared cache or results folder would be
unreadable to the rest of a group. These wrappers create the same way, then
set the mode a plain `open`/`mkdir` would have given (0666 / 0777 & ~umask)
before anything is renamed into place.
"""

from __future__ import annotations

import os
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


def write_atomic(path, write) -> None:
    """Write `path` by calling `write(tmp)` on a temporary file beside it (same suffix, the umask's
    mode), then renaming it into place: a reader never finds half a file under the final name."""
    path = Path(path)
    tmp = mkstemp(prefix=".partial-", suffix=path.suffix, dir=path.parent)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
