"""One writer per work directory and per cache.

A second run is refused naming the holder; a killed run's lock is taken over.

Quick: no training. The `train` refusal through the command line is in
test_engine.py (`test_one_writer_per_work_directory`).
"""

import errno
import fcntl
import json
import os
import socket
import stat
import subprocess
import sys

import jax
import pytest
from conftest import tiny_config

from jaxbrats import engine
from jaxbrats.cli import main
from jaxbrats.data.cache import LOCK as PREPARE_LOCK
from jaxbrats.data.phantom import write_phantom
from jaxbrats.data.preprocess import prepare_dataset
from jaxbrats.errors import JaxbratsError
from jaxbrats.runtime import locks, processes
from jaxbrats.runtime.rundir import RunDir

HOST = socket.gethostname()

HOLD = """
import sys
from jaxbrats.runtime import locks
with locks.hold(sys.argv[1], "jaxbrats train"):
    print("held", flush=True)
    sys.stdin.read()
"""


def _finished_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _record(path, pid: int, host: str = HOST) -> dict:
    record = {"host": host, "pid": pid, "started": "2024-01-02T03:04:05+00:00", "what": "jaxbrats train"}
    path.write_text(json.dumps(record) + "\n")
    return record


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without flock (NFS without a lock daemon): ENOLCK."""

    def flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", flock)


def test_a_second_holder_is_refused_naming_host_pid_and_start(tmp_path):
    path = RunDir(tmp_path / "run").lock
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        record = json.loads(path.read_text())
        with pytest.raises(JaxbratsError) as refused, locks.hold(path, "jaxbrats train", hint="use another --workdir"):
            pass
        line = str(refused.value)
        assert "\n" not in line and line.startswith(f"{path}: locked by jaxbrats train"), line
        assert f"pid {holder.pid} on host {HOST}, started {record['started']}" in line and line.endswith(
            "use another --workdir"
        )
        assert json.loads(path.read_text()) == record  # the refused run leaves the holder's record alone
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and path.read_text() == ""  # released cleanly: an empty file


def test_the_record_names_this_run_and_release_empties_the_file(tmp_path):
    path = tmp_path / "lock"
    with locks.hold(path, "jaxbrats prepare", run_id="r1") as me:
        assert json.loads(path.read_text()) == {
            "host": HOST,
            "pid": os.getpid(),
            "started": me.started,
            "what": "jaxbrats prepare",
            "run_id": "r1",
        }
        refused = pytest.raises(
            JaxbratsError, match=rf"locked by jaxbrats prepare \(pid {os.getpid()} on host .*, run r1\)"
        )
        with (
            refused,
            locks.hold(path, "jaxbrats prepare"),
        ):  # another open file description: flock conflicts in one process
            pass
    assert path.exists() and path.read_text() == ""
    with locks.hold(path, "again"):  # and it can be taken again
        pass


@pytest.mark.parametrize("host", [HOST, "elsewhere"], ids=["this-host", "another-host"])
def test_a_killed_runs_lock_is_taken_over_with_a_note(tmp_path, capsys, host):
    """With flock, a record in a file nobody flocks is stale, whichever host wrote it (the kernel let go of it)."""
    path = tmp_path / "lock"
    pid = _finished_pid()
    _record(path, pid, host)
    with locks.hold(path, "jaxbrats train"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"note: {path}: taking over the stale lock of pid {pid} on host {host} (started 2024-01-02T03:04:05+00:00)"
    ]
    assert path.read_text() == ""


def test_without_flock_a_dead_holder_on_this_host_is_taken_over(tmp_path, capsys, no_flock):
    path = tmp_path / "lock"
    pid = _finished_pid()
    _record(path, pid)
    with locks.hold(path, "jaxbrats train"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {pid} on host {HOST}" in capsys.readouterr().err
    assert path.read_text() == ""
    with locks.hold(path, "jaxbrats train"):  # an empty file: nobody holds it
        pass


@pytest.mark.parametrize("host", [HOST, "elsewhere"], ids=["this-host", "another-host"])
def test_without_flock_a_live_or_remote_holder_is_refused_and_the_file_named(tmp_path, no_flock, host):
    path = tmp_path / "lock"
    record = _record(path, os.getppid(), host)  # alive (pytest's parent); on another host: cannot be checked
    with pytest.raises(JaxbratsError) as refused, locks.hold(path, "jaxbrats train", hint="wait for it to finish"):
        pass
    line = str(refused.value)
    assert "\n" not in line and f"pid {os.getppid()} on host {host}" in line and "no file locks" in line, line
    assert line.endswith(f"wait for it to finish; if that run is gone, delete {path}")
    assert ("another host" in line) == (host != HOST)
    assert json.loads(path.read_text()) == record


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_a_new_lock_file_gets_the_umask_mode(tmp_path, mask):
    old = os.umask(mask)
    try:
        with locks.hold(tmp_path / "lock", "jaxbrats train"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "lock").stat().st_mode) == 0o666 & ~mask


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    write_phantom(out, 2, (16, 16, 16), layout="brats2023", seed=0, workers=1)
    return out


def test_prepare_is_refused_on_a_locked_cache(raw, tmp_path, capsys):
    cache = tmp_path / "cache"
    with locks.hold(cache / PREPARE_LOCK, "jaxbrats prepare"):
        with pytest.raises(
            JaxbratsError, match=rf"{PREPARE_LOCK}: locked by jaxbrats prepare \(pid {os.getpid()} on host "
        ):
            prepare_dataset(raw, cache, workers=1, progress=False)
        assert main(["prepare", raw, cache, "--workers", "1"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "locked by jaxbrats prepare" in err[0] and "another cache directory" in err[0], err
        assert [p.name for p in cache.iterdir()] == [PREPARE_LOCK]  # nothing written
        assert main(["prepare", raw, cache, "--check-only", "--workers", "1"]) == 0  # writes nothing: no lock
    report = prepare_dataset(raw, cache, workers=1, progress=False)
    assert sorted(report["prepared"].values()) == ["written", "written"] and not report["errors"]
    assert (cache / PREPARE_LOCK).read_text() == "" and sorted(p.name for p in cache.iterdir()) == [
        PREPARE_LOCK,
        "cases",
        "index.json",
    ]


def test_the_other_processes_stop_when_process_0_is_refused(raw, tmp_path, monkeypatch):
    """Multi-host: only process 0 takes the lock and gives the outcome to the others (faked: one real process)."""
    cache, workdir = tmp_path / "cache", tmp_path / "run"
    prepare_dataset(raw, cache, workers=1, progress=False)
    trainer = engine.Trainer(tiny_config(), workdir, cache)
    sent = []
    refusal = {"error": f"{RunDir(workdir).lock}: locked by jaxbrats train (pid 1 on host h, started t); wait"}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(processes, "broadcast_json", lambda payload: sent.append(payload) or refusal)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with pytest.raises(JaxbratsError, match="locked by jaxbrats train"):  # process 0's line
        trainer.run()
    assert not workdir.exists() and sent == [None]  # process 1 never touches the lock (what it sends is not used)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(processes, "broadcast_json", lambda payload: sent.append(payload) or payload)
    with (
        locks.hold(RunDir(workdir).lock, "jaxbrats train"),
        pytest.raises(JaxbratsError, match="locked by jaxbrats train"),
    ):
        trainer.run()
    assert "locked by jaxbrats train" in sent[1]["error"] and sorted(p.name for p in workdir.iterdir()) == [
        RunDir(workdir).lock.name
    ]
    taken = []
    assert processes.on_process_0(lambda: taken.append(1) or True) is True
    assert taken == [1] and sent[2] == {"value": True}
