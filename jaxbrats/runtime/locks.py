"""One writer per directory: a lock file that says who holds it.

Two runs writing into one work directory (checkpoints, metrics, the saved
config) or one cache (entries, the index) would interleave their files
without an error, so each run takes a lock first and a second one is refused
with one line naming the holder: its host, pid, start time and command.

How: `hold(path, what)` opens ``path`` (created with mode 0666, so the
user's umask decides, like every file jaxbrats writes: a shared cache stays
usable by the group) and takes an exclusive, non-blocking ``fcntl.flock`` on
it. flock, because the kernel drops the lock when the holder's last file
descriptor closes, whatever the way it ends (exit, exception, SIGKILL, OOM
killer): a lock can never outlive its run, there is no timeout to tune and
nothing to clean up. (POSIX ``fcntl`` record locks are dropped when the
process closes *any* descriptor of the file, which a library cannot rule out;
flock locks belong to the open file description. On Linux NFS, flock is
carried out with NFS locks, so it holds across hosts too.)

The holder then writes its record into the file, one JSON object
(`Holder`: host, pid, started, what, optional run_id), and truncates the file
on a clean release: an empty file means nobody holds it. The file itself is
never deleted: a run that opened it just before the unlink would lock an
orphan while the next run locks a new file, two writers at once.

Stale: a record in a file whose flock is free was left by a run that did not
release cleanly (killed); the kernel already dropped its lock, so it is taken
over, with a note on stderr naming the old holder.

No flock: some network file systems refuse it (``ENOLCK``: NFS without a lock
daemon, some FUSE mounts). Then the record alone decides, which cannot be
atomic (two runs starting in the same instant may both take it) but still
stops the common mistake. The record of a process on this host that no longer
exists is stale and taken over; a live one, or one on another host (whose
processes cannot be checked from here), refuses the run, and the line says to
delete the file if that run is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from jaxbrats.errors import JaxbratsError


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lock: the record in its file."""

    host: str
    pid: int
    started: str  # ISO 8601, local time with its offset
    what: str  # the command, e.g. "jaxbrats train"
    run_id: str | None = None

    @classmethod
    def me(cls, what: str, run_id: str | None = None) -> Holder:
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(socket.gethostname(), os.getpid(), started, what, run_id)

    def describe(self) -> str:
        run = f", run {self.run_id}" if self.run_id else ""
        return f"{self.what} (pid {self.pid} on host {self.host}, started {self.started}{run})"

    def is_gone(self) -> bool:
        """True only when certain: a process of this host that no longer exists.

        A reused pid keeps a stale lock held, never frees a live one.
        """
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
        return False


def _read(fd: int) -> tuple[str, Holder | None]:
    """The file's text and the holder it names (None when it is empty or unreadable)."""
    text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
        return text, Holder(
            str(data["host"]), int(data["pid"]), str(data["started"]), str(data["what"]), data.get("run_id")
        )
    except (ValueError, TypeError, KeyError):
        return text, None


def _write(fd: int, holder: Holder | None, path: Path) -> None:
    """Replace the record (None: empty the file); synced, so that other hosts see it when flock is missing.
    A failure (a full disk) names the lock file."""
    try:
        os.ftruncate(fd, 0)
        if holder is not None:
            os.pwrite(fd, (json.dumps(dataclasses.asdict(holder)) + "\n").encode(), 0)
        os.fsync(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def _flock(fd: int) -> bool:
    """Take the flock: True; False when this file system has none. Raises BlockingIOError when it is held."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:  # EWOULDBLOCK: another open file holds it
        raise
    except OSError:  # ENOLCK, EOPNOTSUPP...: no flock on this file system
        return False


def _note_stale(path: Path, text: str, holder: Holder | None) -> None:
    if holder is None:
        print(f"note: {path}: taking over a stale lock (unreadable record {text[:60]!r})", file=sys.stderr)
    else:
        print(
            f"note: {path}: taking over the stale lock of pid {holder.pid} on host {holder.host} "
            f"(started {holder.started})",
            file=sys.stderr,
        )


def _refuse(path: Path, holder: Holder | None, hint: str) -> JaxbratsError:
    who = holder.describe() if holder else "another process (it has not recorded who it is)"
    return JaxbratsError(f"{path}: locked by {who}; {hint}")


def _refuse_without_flock(path: Path, text: str, holder: Holder | None, hint: str) -> JaxbratsError:
    if holder is None:
        who = f"an unreadable record {text[:60]!r}"
    else:
        where = "" if holder.host == socket.gethostname() else ", on another host, which cannot be checked from here"
        who = f"{holder.describe()}{where}"
    return JaxbratsError(
        f"{path}: locked by {who} (this file system has no file locks, so the lock file's "
        f"record decides); {hint}; if that run is gone, delete {path}"
    )


def _take(fd: int, path: Path, hint: str) -> None:
    """Take the lock on `fd` or raise the one-line refusal; notes a stale holder taken over."""
    try:
        flocked = _flock(fd)
    except BlockingIOError:
        raise _refuse(path, _read(fd)[1], hint) from None
    text, holder = _read(fd)
    if text and not flocked and (holder is None or not holder.is_gone()):
        raise _refuse_without_flock(path, text, holder, hint)
    if text:  # a run that ended without releasing it (with flock: the kernel already let go of its lock)
        _note_stale(path, text, holder)


@contextlib.contextmanager
def hold(path: Path, what: str, hint: str = "wait for it to finish", run_id: str | None = None) -> Iterator[Holder]:
    """Hold the lock file `path` for the body (one writer); yields this run's record.

    `what` names this run in the record (e.g. "jaxbrats train"); `hint` ends a
    refusal (what to do instead). A held lock raises `JaxbratsError` naming its
    holder; a stale one is taken over with a note on stderr (module docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the mode goes through the user's umask
    try:
        _take(fd, path, hint)
        holder = Holder.me(what, run_id)
        _write(fd, holder, path)
        try:
            yield holder
        finally:
            _write(fd, None, path)  # released cleanly: an empty file, nobody holds it
    finally:
        os.close(fd)  # releases the flock
