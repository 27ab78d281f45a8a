"""Multi-host training: two local processes x 2 fake CPU devices around one coordinator.

An uninterrupted 2-process run and one stopped at step 3 then resumed write the
same losses, and so does one process of 4 devices; each checkpoint holds one
iterator state per process; process 0 alone writes the run's files; a finished
stage loads with another number of processes; each process assembles its part
of a batch without the other; a process whose peer never comes stops within
`--timeout` in one line, and one whose peer falls silent within the heartbeat.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
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


def _env(devices: int) -> dict:
    env = with_xla_flags(f"--xla_force_host_platform_device_count={devices}")
    # TensorBoard's writer (tensorboardX) imports torch where it is installed: 2.5 CPU seconds of
    # each of these processes, which never use it. Hidden as on a machine without it.
    env.update(JAXBRATS_HIDE_MODULES="torch", PYTHONPATH=os.pathsep.join(filter(None, [HIDE, env.get("PYTHONPATH")])))
    # Unbuffered output: a process that JAX aborts (a peer gone silent) keeps what it printed.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _spawn(command: list, env: dict, out: str) -> dict:
    stdout, stderr = open(f"{out}.out", "w"), open(f"{out}.err", "w")  # noqa: SIM115  files: a full pipe cannot stall a process
    return {
        "process": subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env),
        "out": out,
        "files": (stdout, stderr),
    }


def _finish(runs: list[dict], first_only: bool = False) -> list[dict]:
    """Wait for `runs` (only the first with `first_only`, the others then killed); exit codes, outputs
    and when each ended."""
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        for run in runs[:1] if first_only else runs:
            run["rc"] = run["process"].wait(timeout=max(deadline - time.monotonic(), 1))
            run["ended"] = time.time()
    finally:
        for run in runs:
            if run["process"].poll() is None:
                run["process"].kill()
                run["rc"] = run["process"].wait()
            for f in run["files"]:
                f.close()
    return [
        {
            "rc": r["rc"],
            "ended": r.get("ended"),
            "stdout": Path(f"{r['out']}.out").read_text(),
            "stderr": Path(f"{r['out']}.err").read_text(),
        }
        for r in runs
    ]


def _train_command(workdir: Path, cache: Path, *extra) -> list:
    config = workdir.parent / "baseline.toml"
    config.write_text('[method]\nname = "baseline"\n')
    command = [sys.executable, "-m", "jaxbrats", "train", "--config", str(config), *_sets()]
    return command + ["--workdir", str(workdir), "--data", str(cache), *map(str, extra)]


def _out(workdir: Path, tag: str) -> str:
    return str(workdir.parent / f"{workdir.name}.{len(list(workdir.parent.glob(f'{workdir.name}.*.out')))}.{tag}")


def launch(workdir: Path, cache: Path, compile_cache: Path, *extra, processes=(0, 1), timeout: int = 60) -> list[dict]:
    """`jaxbrats train --distributed` as processes `processes` of 2 (each with 2 CPU devices);
    their exit codes and outputs, once all have ended."""
    env = _env(2)
    env["JAXBRATS_COMPILE_CACHE"] = str(compile_cache)  # the later runs load the train step, not compile it
    port = free_port()
    runs = []
    for i in processes:
        distributed = ["--distributed", "--coordinator", f"localhost:{port}", "--num-processes", "2"]
        distributed += ["--process-id", str(i), "--timeout", str(timeout)]
        runs.append(_spawn(_train_command(workdir, cache, *distributed, *extra), env, _out(workdir, f"p{i}")))
    return _finish(runs)


def launch_alone(workdir: Path, cache: Path, devices: int) -> dict:
    """`jaxbrats train` as one process with `devices` CPU devices."""
    return _finish([_spawn(_train_command(workdir, cache), _env(devices), _out(workdir, "alone"))])[0]


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
    _ok([launch_alone(root / "alone", phantom_cache, devices=4)])
    print(f"and one process of 4 devices: {time.perf_counter() - start:.0f} s")
    return {
        "whole": root / "whole",
        "split": root / "split",
        "alone": root / "alone",
        "outputs": (whole, first, second),
    }


#: One process of two (argv: process id, port, folder for the findings, then `jaxbrats train`'s
#: arguments). It trains (here: finds the stage finished by one process and skips it), then puts
#: its own two samples of a batch of 4 on the mesh, process 0 before process 1 has begun: an
#: assembly that needed the other host's data would wait for it. Then process 1 stops itself
#: (SIGSTOP: alive, silent) and process 0 waits for it in a barrier, which the heartbeat ends.
JOINED = """
import json, os, signal, sys, time
from pathlib import Path
import numpy as np
i, port, found, *train = sys.argv[1:]
i, found = int(i), Path(found)
from jaxbrats.cli import main
distributed = ["--distributed", "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
rc = main(["train", *train, *distributed, "--timeout", "5"])
import jax
from jaxbrats.runtime.sharding import make_mesh, place_batch

def wait_for(path):
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)

if i == 1:
    wait_for(found / "0.json")
began = time.time()
local = 100 * i + np.arange(2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4)
image = place_batch({"image": local}, make_mesh())["image"]
shards = []
for shard in image.addressable_shards:  # this process's devices' parts of the global batch
    rows = shard.index[0]
    mine = local[rows.start - 2 * i : rows.stop - 2 * i]  # its rows of the batch, in this process's samples
    same = bool(np.array_equal(np.asarray(shard.data), mine))
    shards.append({"process": shard.device.process_index, "rows": [rows.start, rows.stop], "local": same})
findings = {"rc": rc, "shape": list(image.shape), "shards": shards, "began": began, "time": time.time()}
(found / f"{i}.json").write_text(json.dumps(findings))
if i == 1:
    os.kill(os.getpid(), signal.SIGSTOP)
wait_for(found / "1.json")
from jax.experimental import multihost_utils
multihost_utils.sync_global_devices("never met")
print("the barrier passed", flush=True)
"""


@pytest.fixture(scope="module")
def joined(runs, phantom_cache, tmp_path_factory):
    """Two processes of `JOINED` on a copy of the one-process run: their findings, outputs and ends."""
    root = tmp_path_factory.mktemp("joined")
    workdir = root / "run"
    shutil.copytree(runs["alone"], workdir)
    port, env = free_port(), _env(2)
    train = _train_command(workdir, phantom_cache)[4:]  # what follows "jaxbrats train"
    script = [sys.executable, "-c", JOINED]
    procs = [_spawn([*script, str(i), str(port), str(root), *train], env, str(root / f"p{i}")) for i in (0, 1)]
    outputs = _finish(procs, first_only=True)  # process 1 stays stopped until killed
    found = [json.loads(p.read_text()) if p.exists() else None for p in (root / "0.json", root / "1.json")]
    return {"outputs": outputs, "found": found}


def test_a_resumed_two_process_run_equals_an_uninterrupted_one(runs):
    whole, split = loss_rows(runs["whole"]), loss_rows(runs["split"])
    assert [r["step"] for r in whole] == [1, 2, 3, 4, 5, 6]  # process 0 alone writes: no row twice
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in split] == [r["loss"] for r in whole]  # bit for bit


def test_two_processes_train_as_one_process_on_as_many_devices(runs):
    """2 processes x 2 devices against 1 process x 4 (the same mesh, data = 4, and batch of 4): each
    process loads its block of the one-process run's batch (`pipeline.SampledCrops`), so the losses
    are equal bit for bit and the models to float32 rounding; the 2-process run loads in this process.

    The gradients are summed over the 4 devices in another order (across processes, Gloo), so the
    weights differ in the last bit or two (measured: at most 1.8e-7 of a leaf's largest value). One
    kind of leaf differs more: with 8 channels in 8 groups, the GroupNorm after each block's first
    convolution removes that convolution's per-channel bias, whose gradient is then rounding noise
    only, which Adam scales up to steps of about the learning rate (measured: 0.4 of its largest
    value, 5e-4). It changes nothing after the norm: the losses are equal."""
    from jaxbrats.inference.trained import load_trained

    whole, alone = loss_rows(runs["whole"]), loss_rows(runs["alone"])
    assert [r["step"] for r in alone] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in whole] == [r["loss"] for r in alone]
    two, one = (jax.tree_util.tree_leaves_with_path(load_trained(runs[name])[2]) for name in ("whole", "alone"))
    assert [path for path, _ in two] == [path for path, _ in one] and len(two) > 20
    noise = 0
    for (path, a), (_, b) in zip(two, one, strict=True):
        a, b, name = np.asarray(a), np.asarray(b), jax.tree_util.keystr(path)
        if "['conv1']['bias']" in name:  # before a GroupNorm of one channel per group: no gradient but noise
            noise += 1
            assert np.abs(a - b).max() <= 2 * 6 * 3e-3, name  # 6 Adam steps of lr 3e-3 each way at most
        else:
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(b).max(), err_msg=name)
    assert noise == 3  # the encoder's two blocks, the decoder's one


def test_a_stage_finished_by_two_processes_is_skipped_by_one(runs, phantom_cache, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(runs["whole"], workdir)
    config = tmp_path / "baseline.toml"
    config.write_text('[method]\nname = "baseline"\n')
    rc = main(["train", "--config", config, *_sets(), "--workdir", workdir, "--data", phantom_cache])
    assert rc == 0 and "stage train: complete (6 steps), skipped" in capsys.readouterr().out


def test_a_stage_finished_by_one_process_is_skipped_by_two(joined):
    for i, (output, found) in enumerate(zip(joined["outputs"], joined["found"], strict=True)):
        assert found is not None and found["rc"] == 0, (i, output["stderr"][-3000:])
    assert "stage train: complete (6 steps), skipped" in joined["outputs"][0]["stdout"]


def test_each_process_puts_its_own_samples_on_its_own_devices_alone(joined):
    """`place_batch` of process 0 finished before process 1 called it: nothing came from the other host."""
    zero, one = joined["found"]
    assert zero["time"] < one["began"]
    for i, found in enumerate((zero, one)):
        assert found["shape"] == [4, 4, 4, 4]
        assert sorted(s["rows"] for s in found["shards"]) == [[2 * i, 2 * i + 1], [2 * i + 1, 2 * i + 2]]
        assert all(s["process"] == i and s["local"] for s in found["shards"]), found


def test_a_silent_process_stops_the_others_within_the_heartbeat_timeout(joined):
    """Process 1 stopped (SIGSTOP: alive, silent); process 0, waiting for it, ends with JAX's line
    within `--timeout 5` of its last heartbeat, not after JAX's default of 100 s."""
    zero, one = joined["outputs"]
    silent = joined["found"][1]["time"]
    assert "the barrier passed" not in zero["stdout"]
    assert (
        zero["rc"] != 0 and "Terminating process because the JAX distributed service detected fatal" in zero["stderr"]
    )
    assert "stopped sending heartbeats" in zero["stderr"]
    # Counted from process 1's last heartbeat, which may come a little before it stopped (measured 3.1
    # and 4.9 s); JAX's default would be 100 s.
    assert 0 < zero["ended"] - silent < 30, zero["ended"] - silent


def test_each_process_loads_its_block_of_the_one_process_batch(phantom_cache):
    """Two loaders (processes 0 and 1 of 2, batch 2 each), side by side, give the one-process loader's
    batches of 4: the same cases, crops, flips and modality masks (host only)."""
    import grain

    from jaxbrats.data.cache import CacheDataset
    from jaxbrats.data.pipeline import PipelineConfig, make_loader

    dataset, crop = CacheDataset(phantom_cache), (8, 8, 8)
    one = iter(make_loader(dataset, PipelineConfig(crop_size=crop, batch_size=4)))
    two = [
        iter(make_loader(dataset, PipelineConfig(crop_size=crop, batch_size=2), grain.sharding.ShardOptions(i, 2)))
        for i in (0, 1)
    ]
    for _ in range(3):  # two epochs of the 6 cases
        batch, parts = next(one), [next(t) for t in two]
        for key, value in batch.items():
            np.testing.assert_array_equal(value, np.concatenate([p[key] for p in parts]), err_msg=key)


def test_each_checkpoint_holds_one_iterator_state_per_process(runs):
    iterator = runs["split"] / "checkpoints" / "train" / "3" / "iterator"
    files = sorted(p.name for p in iterator.glob("process_*.json"))
    assert files == ["process_0-of-2.json", "process_1-of-2.json"]
    states = [json.loads((iterator / f).read_text()) for f in files]
    assert [s["samples_served"] for s in states] == [12, 12]  # 3 global batches of 4, the same in each process
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
