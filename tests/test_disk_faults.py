"""Full disks and half-written files: a failed checkpoint write is one line and leaves the step
before it whole; a torn last line of metrics.jsonl is dropped on resuming; TensorBoard holds each
(tag, step) once after a resume, with metrics.jsonl's values.

The storage error is injected where Orbax hands each array to tensorstore, as the ValueError
tensorstore raises on a full disk (a real full disk needs a small mounted file system, which a
test cannot make without root)."""

import errno
import json
import logging
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tensorboard_values
from orbax.checkpoint._src.serialization import serialization

from jaxbrats import files
from jaxbrats.cli import main
from jaxbrats.engine.metrics_log import MetricsLog
from jaxbrats.errors import JaxbratsError
from jaxbrats.runtime import checkpoints

FULL = (
    'RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed to write 73625 bytes to file 27: '
    "No space left on device [os_error_code='28']"
)


def full_disk(monkeypatch, error=None):
    """Every array write of Orbax fails as on a full disk (or with `error`), in Orbax's own threads."""

    async def fail(*args, **kwargs):
        raise error or ValueError(FULL)

    monkeypatch.setattr(serialization, "async_serialize_from_host", fail)


def small_state(step: int) -> dict:
    return {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(5), "step": jnp.int32(step)}


def test_a_full_disk_while_saving_is_one_line_and_the_step_before_stays_whole(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    manager = checkpoints.checkpoint_manager(tmp_path, "train")
    checkpoints.save(manager, small_state(2), {"stage": "train"})
    full_disk(monkeypatch)
    with pytest.raises(checkpoints.CheckpointWriteError) as caught:
        checkpoints.save(manager, small_state(4), {"stage": "train"})
    folder = tmp_path / "checkpoints" / "train"
    message = str(caught.value)
    assert message.startswith(
        f"{folder / '4'}: cannot write the checkpoint: no space left on device (RESOURCE_EXHAUSTED"
    )
    assert "step 2 is whole: make room" in message and "\n" not in message
    # Orbax's threads logged a traceback each (absl's logger); none gets through.
    assert not [r for r in caplog.records if r.exc_info or "raised an exception" in str(r.msg)]
    assert sorted(p.name for p in folder.iterdir()) == ["2"]  # no step 4, and its unfinished folder removed
    assert checkpoints.existing_manager(tmp_path, "train").all_steps() == [2]
    restored, _ = checkpoints.restore(manager, small_state(0), 2)
    np.testing.assert_array_equal(restored["w"], small_state(2)["w"])


def test_other_storage_errors_name_their_cause_and_bugs_keep_their_traceback(tmp_path, monkeypatch):
    manager = checkpoints.checkpoint_manager(tmp_path, "train")
    full_disk(monkeypatch, PermissionError(errno.EACCES, "Permission denied", "x/d/1"))
    with pytest.raises(checkpoints.CheckpointWriteError) as caught:
        checkpoints.save(manager, small_state(3), {"stage": "train"})
    assert "/train/3: cannot write the checkpoint: permission denied (PermissionError: " in str(caught.value)
    assert str(caught.value).endswith("no earlier one was written: fix that and train again to resume")
    full_disk(monkeypatch, TypeError("a bug"))
    with pytest.raises(TypeError, match="a bug"):
        checkpoints.save(manager, small_state(5), {"stage": "train"})


def test_the_best_checkpoint_fails_in_one_line_and_keeps_the_previous_best(tmp_path, monkeypatch):
    manager = checkpoints.best_manager(tmp_path, "train")
    checkpoints.save_best(manager, {"net": {"w": jnp.ones(3)}}, 2, {"score": 0.5})
    full_disk(monkeypatch)
    with pytest.raises(checkpoints.CheckpointWriteError, match=r"best/6: cannot write the best checkpoint: no space"):
        checkpoints.save_best(manager, {"net": {"w": jnp.zeros(3)}}, 6, {"score": 0.7})
    assert checkpoints.best_record(checkpoints.best_manager(tmp_path, "train", create=False)) == {
        "score": 0.5,
        "step": 2,
    }


def test_only_the_closed_loop_reports_of_a_failed_write_are_dropped(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    full_disk(monkeypatch)
    with pytest.raises(checkpoints.CheckpointWriteError):
        checkpoints.save(checkpoints.checkpoint_manager(tmp_path, "train"), small_state(1), {"stage": "train"})
    report = type("Unraisable", (), {"object": None})
    for value in (RuntimeError("Event loop is closed"), RuntimeError("something else")):
        report.exc_value = value
        sys.unraisablehook(report)
    assert [str(v) for v in seen] == ["something else"]


def test_an_unfinished_step_is_never_listed_and_is_removed_when_training_starts(tmp_path, capsys):
    folder = tmp_path / "checkpoints" / "train"
    (folder / "6.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    (folder / "6.orbax-checkpoint-tmp" / "state" / "d").write_bytes(b"half")
    assert checkpoints.existing_manager(tmp_path, "train").all_steps() == []  # reading leaves it alone
    assert (folder / "6.orbax-checkpoint-tmp").is_dir()
    checkpoints.checkpoint_manager(tmp_path, "train")
    assert not (folder / "6.orbax-checkpoint-tmp").exists()
    assert "note: removed the unfinished checkpoint" in capsys.readouterr().err


# --- metrics.jsonl and TensorBoard -------------------------------------------------------------------


def events(folder: Path) -> list[tuple[str, int, object, float]]:
    """(tag, step, value or "image", wall time) of every summary value in a folder's event files."""
    return [
        (v.tag, e.step, v.simple_value if v.HasField("simple_value") else "image", e.wall_time)
        for e, v in tensorboard_values(folder)
    ]


def scalars_match(workdir: Path) -> None:
    """Each (tag, step) once in the event files, and the scalars are metrics.jsonl's float values."""
    points = [(tag, step, value) for tag, step, value, _ in events(workdir / "tensorboard") if value != "image"]
    assert not [k for k, n in Counter((t, s) for t, s, _ in points).items() if n > 1]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    want = {(f"{r['stage']}/{k}", r["step"]): v for r in rows for k, v in r.items() if isinstance(v, float)}
    assert {(t, s): pytest.approx(v, rel=1e-6) for t, s, v in points} == want


def legacy_run(workdir: Path) -> None:
    """A run logged as before: tensorboardX's writer, four steps; then an evaluation's figure in the same folder."""
    import tensorboardX

    rows = [{"stage": "train", "step": s, "loss": 1.0 / s, "lr/model": 0.1} for s in range(1, 5)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    writer = tensorboardX.SummaryWriter(str(workdir / "tensorboard"), filename_suffix=".training")
    for row in rows:
        for key in ("loss", "lr/model"):
            writer.add_scalar(f"train/{key}", row[key], row["step"], walltime=1000.0 + row["step"])
    writer.close()
    writer = tensorboardX.SummaryWriter(str(workdir / "tensorboard"), filename_suffix=".figures")
    writer.add_image("figures/case", np.zeros((4, 4, 3), np.uint8), 4, dataformats="HWC")
    writer.close()


def test_a_resume_rewrites_tensorboard_from_the_rows_kept_and_keeps_other_writers_files(tmp_path):
    legacy_run(tmp_path)
    log = MetricsLog(tmp_path)
    log.truncate({"train": 2})
    for step in (3, 4):  # redone after the resume, with other values
        log.write({"stage": "train", "step": step, "loss": 9.0 + step, "lr/model": 0.1})
    scalars_match(tmp_path)
    found = events(tmp_path / "tensorboard")
    assert [(t, s) for t, s, v, _ in found if v == "image"] == [("figures/case", 4)]
    assert {s: w for t, s, _, w in found if t == "train/loss" and s <= 2} == {1: 1001.0, 2: 1002.0}  # kept
    assert not list((tmp_path / "tensorboard").glob("*.training"))


def test_a_torn_last_line_is_dropped_with_a_note_and_a_damaged_middle_line_is_an_error(tmp_path, capsys):
    rows = [{"stage": "train", "step": s, "loss": 0.5} for s in (1, 2, 3)]
    whole = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(whole + '{"stage": "train", "step": 4, "lo')
    MetricsLog(tmp_path).truncate({"train": 3})
    assert (tmp_path / "metrics.jsonl").read_text() == whole
    assert "metrics.jsonl: dropped its half-written last line 4 (" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(whole.rstrip("\n"))  # the last row whole, its newline cut off
    MetricsLog(tmp_path).truncate({"train": 3})
    assert (tmp_path / "metrics.jsonl").read_text() == whole  # the next append starts a line of its own
    (tmp_path / "metrics.jsonl").write_text(whole.replace('"step": 2', '"st'))
    with pytest.raises(JaxbratsError, match=r"metrics.jsonl:2: not a metrics row .* repair or remove the line"):
        MetricsLog(tmp_path).truncate({"train": 3})


def test_an_append_cut_short_is_undone_and_names_the_file(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path)
    log.write({"stage": "train", "step": 1, "loss": 0.5})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    real = os.write

    def half_then_full(fd, data):
        if len(data) > 10:
            return real(fd, data[: len(data) // 2])  # the disk fills up mid-row
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "write", half_then_full)
    with pytest.raises(JaxbratsError, match=r"metrics.jsonl: cannot append the metrics: no space left on device"):
        log.write({"stage": "train", "step": 2, "loss": 0.25})
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


# --- through the command line: a resume onto a full disk ----------------------------------------------


def test_train_on_a_full_disk_prints_one_line_after_a_clean_resume(
    trained_run, phantom_cache, tmp_path, capfd, monkeypatch
):
    """A run stopped at step 2 with a torn last metrics line resumes (the line dropped with a note,
    TensorBoard rewritten: steps 3 and 4 logged once), then its checkpoint at step 4 meets a full disk."""
    from conftest import TINY

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "checkpoints" / "train" / "4")  # as if killed after logging steps 3 and 4
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "train", "step": 5, "lo')  # and during an append
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    legacy_run(legacy)
    figures = next(p for p in (legacy / "tensorboard").iterdir() if p.name.endswith(".figures"))
    shutil.copy(figures, run / "tensorboard")  # `eval --figures --out` the run's folder
    config = tmp_path / "tiny.toml"
    config.write_text('[method]\nname = "baseline"\n')
    command = ["train", "--config", config, "--workdir", run, "--data", phantom_cache]
    command += [a for s in TINY for a in ("--set", s)]
    capfd.readouterr()
    full_disk(monkeypatch)
    assert main(command) == 1
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert "resuming at step 2 of 4" in out and "Traceback" not in out + err
    assert len(lines) == 2 and "metrics.jsonl: dropped its half-written last line" in lines[0], err
    assert lines[1].startswith(f"jaxbrats: error: {run / 'checkpoints' / 'train' / '4'}: cannot write the checkpoint")
    assert sorted(p.name for p in (run / "checkpoints" / "train").iterdir()) == ["2"]  # the next resume's start
    scalars_match(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "loss" in r) == [1, 2, 3, 4]
    assert [(t, s) for t, s, v, _ in events(run / "tensorboard") if v == "image"] == [("figures/case", 4)]
