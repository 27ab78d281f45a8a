"""metrics.jsonl and TensorBoard: the training log, truncated to a resumed step; the NaN/Inf guard.

Metrics stay on the device until they are fetched, every `train.log_every` steps
(`PendingMetrics.flush`: one transfer), checked for NaN/Inf and written.

Each row is appended to ``metrics.jsonl`` in one write() call (`files.append_whole`: a write cut
short by a full disk is undone), then its scalars to a TensorBoard event file as one event, also
in one write() call: no writer thread and no buffer, so what was logged is on disk, and a failure
stops the run here, in one line naming the file.

On a resume (`MetricsLog.truncate`) the rows past the step each stage resumes from are dropped,
and so is a half-written last line (a kill or a full disk during an append leaves one), with a
note. A damaged line before the last is an error naming the file and the line: no cut-short
write leaves one, so it is an edit or damage for the user to look at, not to drop unseen.
Then the training's TensorBoard events are written afresh from the rows kept (`rebuild_events`),
so each (tag, step) is in the event files once, with metrics.jsonl's value: a new event file
is written under a temporary name and renamed into place, then the training's earlier files
are removed (a kill between the two leaves both, until the next resume rewrites them). Other
writers' files in the folder (the images of ``jaxbrats eval --figures`` when its ``--out`` is
the run's folder) are kept: a file is the training's when it holds scalars only.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import socket
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np

from jaxbrats import files
from jaxbrats.errors import JaxbratsError, require
from jaxbrats.runtime.rundir import RunDir


class TrainingDiverged(JaxbratsError):
    """A metric became NaN or Inf: the run stops, its last checkpoint holding good steps only."""


def _tensorboard() -> SimpleNamespace:
    """tensorboardX's event protos, scalar summary and record checksum (imported on first use)."""
    what = "the training's TensorBoard log"
    return SimpleNamespace(
        event_pb2=require("tensorboardX.proto.event_pb2", what),
        summary_pb2=require("tensorboardX.proto.summary_pb2", what),
        crc=require("tensorboardX.record_writer", what).masked_crc32c,
    )


def _cause(error: OSError) -> str:
    return files.storage_cause(error) or error.strerror or str(error)


def _row(line: bytes) -> dict | None:
    """A metrics row from a line, or None when the line is not one."""
    try:
        row = json.loads(line)
    except ValueError:  # JSON and UTF-8 errors alike
        return None
    whole = isinstance(row, dict) and isinstance(row.get("stage"), str) and isinstance(row.get("step"), int)
    return row if whole else None


def read_rows(path: Path) -> tuple[list[dict], bool]:
    """(rows of a metrics.jsonl, whether the file is clean: every line a row, ending in a newline).

    A half-written last line is dropped with a note on stderr; a line before it that is not a row
    is a `JaxbratsError` naming the file and the line."""
    data = path.read_bytes()
    lines = [(number, line) for number, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    rows = []
    for index, (number, line) in enumerate(lines):
        row = _row(line)
        if row is not None:
            rows.append(row)
        elif index == len(lines) - 1:
            print(
                f"note: {path}: dropped its half-written last line {number} ({len(line)} bytes), "
                f"which a write cut short (a kill, a full disk) leaves",
                file=sys.stderr,
            )
        else:
            raise JaxbratsError(
                f"{path}:{number}: not a metrics row (a JSON object with a 'stage' and an integer 'step'), and not "
                f"the last line, which a write cut short leaves: repair or remove the line, then train again"
            )
    return rows, len(rows) == len(lines) and (not data.strip() or data.endswith(b"\n"))


def _record(tb: SimpleNamespace, event) -> bytes:
    """An event as a TFRecord: its length, the length's checksum, the event, its checksum."""
    data = event.SerializeToString()
    head = struct.pack("<Q", len(data))
    return head + struct.pack("<I", tb.crc(head)) + data + struct.pack("<I", tb.crc(data))


def _header(tb: SimpleNamespace) -> bytes:
    """The first record of an event file: its format version."""
    return _record(tb, tb.event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))


@functools.cache
def _tag(name: str) -> str:
    """A TensorBoard tag as tensorboardX's writer makes it (other characters become "_")."""
    return re.sub(r"[^-/\w.]", "_", name).lstrip("/")


def _row_event(tb: SimpleNamespace, row: dict, wall_time: float):
    """One event holding a row's float values as ``<stage>/<key>`` at its step; None when it has none."""
    value = tb.summary_pb2.Summary.Value
    values = [value(tag=_tag(f"{row['stage']}/{k}"), simple_value=v) for k, v in row.items() if isinstance(v, float)]
    if not values:
        return None
    return tb.event_pb2.Event(wall_time=wall_time, step=row["step"], summary=tb.summary_pb2.Summary(value=values))


_FILES = itertools.count()


def _event_file_name() -> str:
    """A new event file's name: TensorBoard reads the files whose name holds "tfevents"; the process
    id and a count keep two files made within a second apart."""
    return f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_FILES)}"


def _records(path: Path):
    """The records of an event file, up to the first incomplete one (a write cut short)."""
    with open(path, "rb") as f:
        while len(head := f.read(12)) == 12:
            (length,) = struct.unpack("<Q", head[:8])
            data = f.read(length + 4)
            if len(data) < length + 4:
                return
            yield data[:length]


def _training_file(tb: SimpleNamespace, path: Path, walls: dict) -> bool:
    """Whether an event file holds scalars only (the training's: other writers log images); the wall
    time of each (stage, step) it logs goes into `walls`. A file that cannot be parsed is not ours."""
    found = {}
    for data in _records(path):
        try:
            event = tb.event_pb2.Event.FromString(data)
        except Exception:  # noqa: BLE001  protobuf's DecodeError: damaged, so keep the file as it is
            return False
        kind = event.WhichOneof("what")
        if kind == "file_version":
            continue
        if kind != "summary" or any(v.WhichOneof("value") != "simple_value" for v in event.summary.value):
            return False
        for value in event.summary.value:
            key = (value.tag.split("/")[0], event.step)
            found[key] = min(found.get(key, event.wall_time), event.wall_time)
    for key, wall in found.items():
        walls[key] = min(walls.get(key, wall), wall)
    return True


def rebuild_events(folder: Path, rows: list[dict]) -> None:
    """Write the scalars of `rows` as the training's one event file in `folder` (the wall times of
    the points logged before kept), replacing the training's earlier files; other files are kept."""
    tb = _tensorboard()
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".partial-*"):  # a rebuild killed before its rename
        stale.unlink(missing_ok=True)
    walls: dict = {}
    old = [p for p in sorted(folder.iterdir()) if "tfevents" in p.name and p.is_file() and _training_file(tb, p, walls)]
    if not rows and not old:
        return
    now, records = time.time(), [_header(tb)]
    for row in rows:
        event = _row_event(tb, row, walls.get((row["stage"], row["step"]), now))
        if event is not None:
            records.append(_record(tb, event))
    files.write_atomic(folder / _event_file_name(), lambda tmp: Path(tmp).write_bytes(b"".join(records)))
    for path in old:
        path.unlink(missing_ok=True)


class MetricsLog:
    """JSON lines plus TensorBoard event files in the work directory.

    Only one process of a multi-process run writes them (`write` False elsewhere: every
    call does nothing), so each row is written once.
    """

    def __init__(self, workdir: Path, write: bool = True):
        run = RunDir(workdir)
        self.path, self.tensorboard = run.metrics, run.tensorboard
        self.enabled = write
        self.events: Path | None = None  # the event file rows go to, made with the first one
        self.synced = False  # whether the event files were rewritten from metrics.jsonl in this run
        self.tb = _tensorboard() if write else None  # a missing tensorboardX is one line, before any step

    def truncate(self, resume_step: dict[str, int]) -> None:
        """Drop the rows of these stages past the step each resumes from (they are about to be
        redone) and a half-written last line; rewrite the TensorBoard events from the rows kept
        (the first time in a run, as events may be missing, and whenever rows are dropped)."""
        if not self.enabled or not self.path.exists():
            return
        rows, clean = read_rows(self.path)
        keep = [r for r in rows if r["step"] <= resume_step.get(r["stage"], r["step"])]
        changed = len(keep) < len(rows) or not clean
        try:
            if changed:
                files.write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
            if changed or not self.synced:
                self.events = None  # rows from here on go to a fresh file beside the rebuilt one
                rebuild_events(self.tensorboard, keep)
        except OSError as e:
            raise JaxbratsError(f"{e.filename or self.tensorboard}: cannot rewrite the log: {_cause(e)}") from e
        self.synced = True

    def write(self, row: dict) -> None:
        """Append a row to metrics.jsonl, then its float values to the TensorBoard log."""
        if not self.enabled:
            return
        try:
            files.append_whole(self.path, (json.dumps(row) + "\n").encode())
        except OSError as e:
            raise JaxbratsError(f"{self.path}: cannot append the metrics: {_cause(e)}") from e
        event = _row_event(self.tb, row, time.time())
        if event is None:
            return
        record = _record(self.tb, event)
        if self.events is None:
            self.tensorboard.mkdir(parents=True, exist_ok=True)
            self.events = self.tensorboard / _event_file_name()
            record = _header(self.tb) + record
        try:
            files.append_whole(self.events, record)
        except OSError as e:
            raise JaxbratsError(f"{self.events}: cannot write the TensorBoard log: {_cause(e)}") from e

    def close(self) -> None:
        """Nothing is held open: every row is on disk once `write` returns."""


class PendingMetrics:
    """The metrics of a stage's steps since the last fetch, still on the device.

    `loss_keys`: each update group's loss (`step.loss_keys`), the first of which goes into
    `losses` as (stage, step, loss) for every step; `schedules`: each group's learning-rate
    schedule, logged as ``lr/<group>``.
    """

    def __init__(self, log: MetricsLog, stage: str, loss_keys: list[str], schedules: dict, losses: list):
        self.log, self.stage, self.loss_keys, self.schedules, self.losses = log, stage, loss_keys, schedules, losses
        self.steps: list[tuple[int, dict]] = []  # (step, metrics on the device)

    def add(self, step: int, metrics: dict) -> None:
        self.steps.append((step, metrics))

    def flush(self, manager, steps_per_s: float, voxels_per_s: float) -> dict:
        """Fetch, check and write the pending metrics, then the stage's throughput; each group's
        latest loss for the progress bar. A NaN or Inf stops the run (`TrainingDiverged`) naming
        the last checkpoint of `manager`, written before these steps."""
        fetched = jax.device_get([metrics for _, metrics in self.steps])
        for (step, _), metrics in zip(self.steps, fetched):
            values = {k: float(v) for k, v in metrics.items()}
            self._check_finite(step, values, manager)
            self.losses.append((self.stage, step, values[self.loss_keys[0]]))
            row = {"stage": self.stage, "step": step, **values}
            row.update({f"lr/{group}": float(schedule(step - 1)) for group, schedule in self.schedules.items()})
            self.log.write(row)
        last = self.steps[-1][0]
        self.log.write(
            {"stage": self.stage, "step": last, "steps_per_s": float(steps_per_s), "voxels_per_s": float(voxels_per_s)}
        )
        self.steps = []
        return {k.replace("/", "_"): f"{values[k]:.4f}" for k in self.loss_keys}

    def _check_finite(self, step: int, values: dict, manager) -> None:
        bad = [k for k, v in values.items() if not np.isfinite(v)]
        if not bad:
            return
        good = manager.latest_step()
        where = f"step {good} in {manager.directory}" if good is not None else "none (no checkpoint yet)"
        raise TrainingDiverged(
            f"stage {self.stage}: {', '.join(f'{k} became {values[k]}' for k in bad)} at step {step}; "
            f"training stopped. Last good checkpoint: {where}"
        )
