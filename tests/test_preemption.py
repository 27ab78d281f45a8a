"""SIGTERM and SIGINT during training: the step in flight is finished and saved, the logs flushed,
the lock released, the exit says so (143, 130), and the resume equals an uninterrupted run bit for bit.

The uninterrupted run is `test_engine`'s (dropout on, so a resume replaying the wrong key is caught);
the interrupted one is `python -m jaxbrats train` of the same config, so its train step comes from
the suite's compilation cache. Two processes (`jax.distributed`) stop at one step when one of
them gets SIGTERM (JAX's preemption sync).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import COMPILE_CACHE, TINY, tiny_config, with_xla_flags
from test_engine import RESUME, assert_bitwise_equal, final_state, uninterrupted  # noqa: F401  (a fixture)

from jaxbrats import engine
from jaxbrats.runtime import checkpoints
from jaxbrats.runtime.rundir import RunDir
from jaxbrats.runtime.signals import STOP_SIGNALS, StopRequests

#: `RESUME` with no regular checkpoint before its last step: the stop's checkpoint is the only one.
STOPPED = (*RESUME, "train.checkpoint_every=6")
HIDE = str(Path(__file__).resolve().parent / "support" / "hide_modules")

#: The child: `python -m jaxbrats` (run as such by runpy) with each batch placed 0.2 s late. This
#: tiny model's steps take ~30 ms, less than a poll takes to see a row and signal, so the run could
#: end first; steps of a real size take seconds, which the delay stands for.
CHILD = """
import runpy, time
from jaxbrats.engine import trainer
place = trainer.place_batch
def late(*args):
    time.sleep(0.2)
    return place(*args)
trainer.place_batch = late
runpy.run_module("jaxbrats", run_name="__main__", alter_sys=True)
"""


def rows(workdir: Path) -> list[dict]:
    """metrics.jsonl's rows of training steps (the throughput rows differ from run to run)."""
    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def tensorboard_steps(folder: Path, tag: str) -> list[int]:
    """The steps of `tag`'s scalars in a folder's TensorBoard event files (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at + 12 <= len(data):
            length = int.from_bytes(data[at : at + 8], "little")
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            steps += [event.step for value in event.summary.value if value.tag == tag]
            at += 12 + length + 4
    return steps


def train_and_signal(workdir: Path, cache: Path, after_step: int, signum: int) -> dict:
    """`jaxbrats train` of `STOPPED`, sent `signum` once `after_step` is logged; its exit code, stderr,
    and the seconds from the signal to its exit."""
    config = workdir.parent / "baseline.toml"
    config.write_text('[method]\nname = "baseline"\n')
    sets = [a for s in [*TINY, *STOPPED] for a in ("--set", s)]
    env = with_xla_flags()
    env.update(JAXBRATS_COMPILE_CACHE=str(COMPILE_CACHE), JAXBRATS_HIDE_MODULES="torch")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [HIDE, env.get("PYTHONPATH")]))
    command = [sys.executable, "-c", CHILD, "train", "--config", config, "--workdir", workdir, "--data", cache, *sets]
    err = workdir.parent / f"{workdir.name}.err"
    with open(err, "w") as stderr:
        child = subprocess.Popen(list(map(str, command)), stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        try:
            deadline = time.monotonic() + 240
            while not any(r["step"] == after_step for r in _rows_so_far(workdir)):
                assert child.poll() is None, f"ended before step {after_step}: {err.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "no step logged in 240 s"
                time.sleep(0.005)
            sent = time.perf_counter()
            child.send_signal(signum)
            rc = child.wait(timeout=120)
            return {"rc": rc, "stderr": err.read_text(), "seconds": time.perf_counter() - sent}
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


def _rows_so_far(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines[:-1] if '"loss"' in line]  # the last line may be half-written


def test_sigterm_saves_the_step_in_flight_and_the_resume_is_the_uninterrupted_run(
    uninterrupted,  # noqa: F811
    phantom_cache,
    tmp_path,
):
    whole_dir, whole = uninterrupted
    workdir = tmp_path / "run"
    run = train_and_signal(workdir, phantom_cache, after_step=2, signum=signal.SIGTERM)
    assert run["rc"] == 143, run["stderr"][-3000:]
    last = run["stderr"].strip().splitlines()[-1]
    match = re.fullmatch(
        r"jaxbrats: stopped by SIGTERM after step (\d) of stage train; saved checkpoint \1 in (.+); "
        r"resume with the same command",
        last,
    )
    assert match, last
    step = int(match.group(1))
    assert 2 <= step < 6, step  # past the step signalled after, before the stage's end
    assert Path(match.group(2)) == RunDir(workdir).checkpoints("train")
    manager = checkpoints.checkpoint_manager(workdir, "train", create=False)
    assert manager.all_steps() == [step]  # the stop's own checkpoint: no regular one came before it
    assert [r["step"] for r in rows(workdir)] == list(range(1, step + 1))  # the pending metrics were written
    assert step in tensorboard_steps(workdir / "tensorboard", "train/loss")  # and TensorBoard's
    assert RunDir(workdir).lock.read_text() == ""  # released, not left to be taken over as stale
    assert run["seconds"] < 60

    def mine(*_):
        pass

    previous = {s: signal.signal(s, mine) for s in STOP_SIGNALS}
    try:
        resumed = engine.train(tiny_config(*STOPPED), workdir, phantom_cache)
        assert all(signal.getsignal(s) is mine for s in STOP_SIGNALS)  # the caller's handlers are back
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert [s for _, s, _ in resumed.losses] == list(range(step + 1, 7))
    assert rows(workdir) == rows(whole_dir)  # every metric of every step, bit for bit
    assert_bitwise_equal(final_state(workdir, tiny_config(*STOPPED)), final_state(whole_dir, tiny_config(*RESUME)))
    assert [loss for *_, loss in whole.losses] == [r["loss"] for r in rows(workdir)]


def test_stop_requests_take_sigterm_and_sigint_and_give_the_handlers_back():
    """One signal asks for a stop; a second SIGTERM is ignored (the save goes on), a second SIGINT
    stops at once; the handlers before come back."""

    def mine(*_):
        pass

    previous = {s: signal.signal(s, mine) for s in STOP_SIGNALS}
    try:
        for first, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
            with StopRequests() as stop:
                assert signal.getsignal(first) is not mine
                assert not stop.due(1)
                os.kill(os.getpid(), first)
                time.sleep(0.01)  # the handler runs in this (the main) thread, between two bytecodes
                assert stop.due(2) and stop.signum == first and 128 + stop.signum == code
                os.kill(os.getpid(), signal.SIGTERM)  # while saving: noted, ignored
                time.sleep(0.01)
                assert stop.signum == first
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.01)
            assert all(signal.getsignal(s) is mine for s in STOP_SIGNALS)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


#: Two processes of one CPU device each, a sample each per step; XLA's own 3D convolution (the
#: quicker compile). Long enough that JAX's notifier (it looks for SIGTERM once a second) and the
#: agreement between the processes come before the stage's end.
TWO = [*TINY, "stages.train.steps=12", "train.checkpoint_every=12", "model.conv_impl='native'"]


def test_two_processes_stop_together_on_a_sigterm_to_one(phantom_cache, tmp_path):
    """SIGTERM to process 1 only: JAX's preemption sync tells process 0, both save the same step
    (each its iterator state) and exit 143; process 0 says where the checkpoint is."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    workdir, config = tmp_path / "run", tmp_path / "baseline.toml"
    config.write_text('[method]\nname = "baseline"\n')
    env = with_xla_flags()
    env.update(JAXBRATS_COMPILE_CACHE=str(COMPILE_CACHE), JAXBRATS_HIDE_MODULES="torch")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [HIDE, env.get("PYTHONPATH")]))
    sets = [a for s in TWO for a in ("--set", s)]
    children = []
    for i in (0, 1):
        command = [sys.executable, "-m", "jaxbrats", "train", "--config", config, "--workdir", workdir]
        command += ["--data", phantom_cache, *sets, "--distributed", "--coordinator", f"localhost:{port}"]
        command += ["--num-processes", "2", "--process-id", i, "--timeout", 60]
        err = open(tmp_path / f"p{i}.err", "w")  # noqa: SIM115  a file: a full pipe cannot stall a process
        children.append((subprocess.Popen(list(map(str, command)), stdout=err, stderr=err, env=env), err))
    try:
        deadline = time.monotonic() + 240
        while not any(r["step"] == 2 for r in _rows_so_far(workdir)):
            assert all(c.poll() is None for c, _ in children), (tmp_path / "p0.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "no step logged in 240 s"
            time.sleep(0.005)
        sent = time.perf_counter()
        children[1][0].send_signal(signal.SIGTERM)
        codes = [c.wait(timeout=60) for c, _ in children]
        seconds = time.perf_counter() - sent
    finally:
        for child, err in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            err.close()
    outputs = [(tmp_path / f"p{i}.err").read_text() for i in (0, 1)]
    assert codes == [143, 143], outputs
    match = re.search(r"jaxbrats: stopped by SIGTERM after step (\d+) of stage train; saved checkpoint \1 ", outputs[0])
    assert match, outputs[0][-3000:]
    step = int(match.group(1))
    assert 2 <= step < 12
    assert checkpoints.checkpoint_manager(workdir, "train", create=False).all_steps() == [step]
    iterators = sorted(p.name for p in (RunDir(workdir).checkpoints("train") / str(step) / "iterator").glob("*.json"))
    assert iterators == ["process_0-of-2.json", "process_1-of-2.json"]
    assert [r["step"] for r in rows(workdir)] == list(range(1, step + 1))
    assert seconds < 60
