"""Multi-host training: two local processes x 2 fake CPU devices around one coordinator.

An uninterrupted 2-process run and one stopped at step 3 then resumed write the
same losses; each checkpoint holds one iterator state per process; process 0
alone writes the run's files; a process whose peer never comes stops within
`--timeout` in one line.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, with_xla_flags

from jaxbrats.cli import main

#: The tiny U-Net cut to two levels on 16^3 crops (what is checked is how the processes share a run,
#: not the model: each of the six processes traces half the layers); a global batch of 4 over the
#: 2 x 2 devices of the data axis. XLA's own 3D convolution: this run compiles in 2/3 of the time
#: of the CPU's depth-sliced one.
SETTINGS = TINY + ["model.widths=[8,8]", "model.blocks=[1,1]", "data.batch_size=4", "stages.train.steps=6"]
SETTINGS += ["train.checkpoint_every=3", "model.conv_impl='native'"]
HIDE = str(Path(__file__).resolve().parent / "support" / "hide_modules")
#: A hang fails the test instead of hanging CI (a run is ~40 s on 2 busy cores).
RUN_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _sets(*extra):
    return [a for s in [*SETTINGS, *extra] for a in ("--set", s)]


def launch(workdir: Path, cache: Path, compile_cache: Path, *extra, processes=(0, 1), timeout: int = 60) -> list[dict]:
    """`jaxbrats train --distributed` as processes `processes` of 2 (each with 2 CPU devices);
    their exit codes and outputs, once all have ended."""
    config = workdir.parent / "baseline.toml"
    config.write_text('[method]\nname = "baseline"\n')
    env = with_xla_flags("--xla_force_host_platform_device_count=2")
    env["JAXBRATS_COMPILE_CACHE"] = str(compile_cache)  # the later runs load the train step, not compile it
    # TensorBoard's writer (tensorboardX) imports torch where it is installed: 2.5 CPU seconds of
    # each of these processes, which never use it. Hidden as on a machine without it.
    env.update(JAXBRATS_HIDE_MODULES="torch", PYTHONPATH=os.pathsep.join(filter(None, [HIDE, env.get("PYTHONPATH")])))
    port = free_port()
    runs = []
    for i in processes:
        out = workdir.parent / f"{workdir.name}.{len(list(workdir.parent.glob(f'{workdir.name}.*.out')))}.p{i}"
        command = [
            sys.executable,
            "-m",
            "jaxbrats",
            "train",
            "--config",
            str(config),
            *_sets(),
            "--workdir",
            str(workdir),
            "--data",
            str(cache),
            "--distributed",
            "--coordinator",
            f"localhost:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(i),
            "--timeout",
            str(timeout),
            *map(str, extra),
        ]
        stdout, stderr = open(f"{out}.out", "w"), open(f"{out}.err", "w")  # noqa: SIM115  files: a full pipe cannot stall a process
        runs.append(
            {
                "process": subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env),
                "out": out,
                "files": (stdout, stderr),
            }
        )
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        for run in runs:
            run["rc"] = run["process"].wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for run in runs:
            if run["process"].poll() is None:
                run["process"].kill()
                run["process"].wait()
            for f in run["files"]:
                f.close()
    return [
        {"rc": r["rc"], "stdout": Path(f"{r['out']}.out").read_text(), "stderr": Path(f"{r['out']}.err").read_text()}
        for r in runs
    ]


def _ok(results):
    for i, r in enumerate(results):
        assert r["rc"] == 0, f"process {i}: {r['stderr'][-3000:]}"
    return results


def loss_rows(workdir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def runs(phantom_cache, tmp_path_factory):
    """An uninterrupted 2-process run of 6 steps, and one stopped after 3 steps then resumed."""
    root = tmp_path_factory.mktemp("multihost")
    compile_cache = root / "xla"
    start = time.perf_counter()
    whole = _ok(launch(root / "whole", phantom_cache, compile_cache))
    first = _ok(launch(root / "split", phantom_cache, compile_cache, "--stop-after", 3))
    second = _ok(launch(root / "split", phantom_cache, compile_cache))
    print(f"three 2-process runs: {time.perf_counter() - start:.0f} s")
    return {"whole": root / "whole", "split": root / "split", "outputs": (whole, first, second)}


def test_a_resumed_two_process_run_equals_an_uninterrupted_one(runs):
    whole, split = loss_rows(runs["whole"]), loss_rows(runs["split"])
    assert [r["step"] for r in whole] == [1, 2, 3, 4, 5, 6]  # process 0 alone writes: no row twice
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in split] == [r["loss"] for r in whole]  # bit for bit


def test_each_checkpoint_holds_one_iterator_state_per_process(runs):
    iterator = runs["split"] / "checkpoints" / "train" / "3" / "iterator"
    files = sorted(p.name for p in iterator.glob("process_*.json"))
    assert files == ["process_0-of-2.json", "process_1-of-2.json"]
    states = [json.loads((iterator / f).read_text()) for f in files]
    assert [f"shard_index={i}, shard_count=2" in s["sampler"] for i, s in enumerate(states)] == [True, True]
    extra = json.loads((iterator.parent / "extra" / "metadata").read_text())  # process 0's JSON item
    assert extra["processes"] == 2 and "iterator" not in extra


def test_process_0_alone_writes_the_run_files_and_notes(runs):
    whole, _, second = runs["outputs"]
    assert len(list((runs["whole"] / "tensorboard").iterdir())) == 1
    for name in ("config.json", "splits.json", "data.json"):
        assert (runs["whole"] / name).exists()
    assert len((runs["split"] / "config_history.jsonl").read_text().splitlines()) == 2  # one row per call
    assert "resuming at step 3 of 6" in second[0]["stdout"] and "resuming" not in second[1]["stdout"]
    assert "trained baseline" in whole[0]["stdout"] and "trained baseline" not in whole[1]["stdout"]


def test_a_resume_with_another_process_count_is_refused_in_one_line(runs, phantom_cache, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(runs["split"], workdir)
    config = tmp_path / "baseline.toml"
    config.write_text('[method]\nname = "baseline"\n')
    rc = main(
        ["train", "--config", config, *_sets("stages.train.steps=9"), "--workdir", workdir, "--data", phantom_cache]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert "holds the data iterators of 2 process(es) and this run has 1" in err[0] and "--num-processes 2" in err[0]


def test_a_process_whose_peer_never_comes_stops_within_the_timeout(phantom_cache, tmp_path):
    start = time.monotonic()
    [alone] = launch(tmp_path / "run", phantom_cache, tmp_path / "xla", processes=(0,), timeout=5)
    took = time.monotonic() - start
    lines = alone["stderr"].strip().splitlines()
    assert alone["rc"] == 1 and len(lines) == 1 and "Traceback" not in alone["stderr"], alone["stderr"]
    assert (
        lines[0].startswith("jaxbrats: error: process 0 of 2") and "within 5 s" in lines[0] and "localhost:" in lines[0]
    )
    assert took < 30, took
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--process-id", "1"], "--process-id 1 needs --num-processes"),
        (
            ["--num-processes", "2", "--process-id", "2", "--coordinator", "localhost:1234"],
            "--process-id 2: out of range for 2 processes",
        ),
        (["--num-processes", "2", "--process-id", "1"], "needs --coordinator HOST:PORT"),
        (
            ["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
            "give the coordinator as HOST:PORT",
        ),
    ],
)
def test_bad_distributed_settings_are_one_line(args, fragment, tmp_path, capsys, monkeypatch):
    for variable in ("JAXBRATS_COORDINATOR", "JAXBRATS_NUM_PROCESSES", "JAXBRATS_PROCESS_ID", "JAXBRATS_TIMEOUT"):
        monkeypatch.delenv(variable, raising=False)
    rc = main(["train", "--config", "unused.toml", "--workdir", tmp_path / "run", "--distributed", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and fragment in err[0], err


def test_settings_come_from_the_environment_when_no_flag_gives_them():
    from jaxbrats.cli import build_parser
    from jaxbrats.runtime.processes import distributed_settings

    args = build_parser().parse_args(["train", "--config", "c", "--workdir", "w", "--distributed", "--process-id", "1"])
    env = {
        "JAXBRATS_COORDINATOR": "h:99",
        "JAXBRATS_NUM_PROCESSES": "2",
        "JAXBRATS_PROCESS_ID": "0",
        "JAXBRATS_TIMEOUT": "7",
    }
    assert distributed_settings(args, env) == {"coordinator": "h:99", "num_processes": 2, "process_id": 1, "timeout": 7}
    args = build_parser().parse_args(["train", "--config", "c", "--workdir", "w", "--distributed"])
    assert distributed_settings(args, {}) == {
        "coordinator": None,
        "num_processes": None,
        "process_id": None,
        "timeout": None,
    }


@pytest.mark.slow
def test_a_checkpoint_of_an_earlier_version_keeps_its_iterator_state_in_extra(phantom_cache, tmp_path):
    """Before one file per process, the (single-process) iterator state was the JSON item's "iterator"."""
    from conftest import tiny_config

    from jaxbrats import engine
    from jaxbrats.data.cache import CacheDataset
    from jaxbrats.data.pipeline import PipelineConfig, make_loader
    from jaxbrats.methods import get_method
    from jaxbrats.runtime import checkpoints

    method = get_method("baseline")(tiny_config())
    optimizers = engine.stage_optimizers(method, "train", 4)
    state = engine.init_state(method, "train", 0, optimizers)[1]
    iterator = iter(make_loader(CacheDataset(phantom_cache), PipelineConfig(crop_size=(16, 16, 16))))
    next(iterator)
    manager = checkpoints.checkpoint_manager(tmp_path, "train")
    checkpoints.save(manager, state, {"iterator": iterator.get_state().decode(), "stage": "train"})  # the old layout
    _, extra, step = checkpoints.restore_newest_readable(
        manager, engine.abstract_state(method, "train", optimizers)[1], iterator=True
    )
    assert step == 0 and checkpoints.iterator_state(extra, manager, step) == iterator.get_state().decode()
    next(iterator)
    checkpoints.save(manager, dict(state, step=state["step"] + 1), {"stage": "train"}, iterator)  # the new layout
    assert [p.name for p in (tmp_path / "checkpoints" / "train" / "1" / "iterator").glob("*.json")] == [
        "process_0-of-1.json"
    ]
    _, extra, step = checkpoints.restore_newest_readable(
        manager, engine.abstract_state(method, "train", optimizers)[1], iterator=True
    )
    assert step == 1 and extra["iterator"] == iterator.get_state().decode()
