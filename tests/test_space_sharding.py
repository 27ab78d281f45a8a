"""Volumes split along "space" (with "data" and "model"): every method trains and evaluates as on one device.

Each method trains 4 steps per stage in a subprocess with 8 fake CPU devices (`mesh_runs.py`;
the quick suite's methods one after the other in one process) under one device and under the
issue's meshes; the losses of every step, the baseline's gradients, the evaluation's labels and
Dice and `predict`'s labels (both on `eval.mesh` = data 2 x space 4) must equal one device's, the
compiled steps must exchange halos (collective-permutes) without gathering an activation, no
device may hold M3AE's x_sub or its optimiser moments whole, and the evaluation and `predict` must
split each window batch along "data" and each window's depth along "space". The quick suite runs
each method under the mesh that combines the most axes; `-m slow` the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import with_xla_flags

from jaxbrats.modalities import FULL_SUBSET_INDEX, SUBSET_NAMES

HERE = Path(__file__).resolve().parent
HIDE = str(HERE / "support" / "hide_modules")
ONE = "1,1,1"
RUNS = {  # method -> meshes (data, space, model) of the quick suite, and of -m slow
    "baseline": (["2,4,1"], ["1,8,1"]),
    "m3ae": (["2,4,1"], ["1,8,1", "2,2,2"]),
    "rirn": (["2,2,2"], ["2,4,1", "1,8,1"]),
    "mind_the_gap": ([], ["2,2,2"]),  # its per-modality encoders and students split along "model" too
}
QUICK = sorted(m for m, (quick, _) in RUNS.items() if quick)


def start(cache: Path, out: Path, runs: dict[str, list[str]]) -> subprocess.Popen:
    """One process with 8 CPU devices training each method under one device and its meshes."""
    env = with_xla_flags("--xla_force_host_platform_device_count=8")
    # TensorBoard's writer (tensorboardX) imports torch where it is installed: 2.5 CPU seconds, unused.
    env.update(JAXBRATS_HIDE_MODULES="torch", PYTHONPATH=os.pathsep.join(filter(None, [HIDE, env.get("PYTHONPATH")])))
    specs = [":".join([method, ONE, *meshes]) for method, meshes in runs.items()]
    args = [sys.executable, str(HERE / "mesh_runs.py"), str(cache), str(out), *specs]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    """Waits for the process: an error message where it failed, else ""."""
    _, stderr = process.communicate(timeout=1500)
    return stderr[-3000:] if process.returncode else ""


@pytest.fixture(scope="module")
def runs(phantom_cache, tmp_path_factory):
    """method -> {mesh: what mesh_runs.py measured}. The quick runs of the three methods share one
    process (one start of Python and JAX, where three cost about 10 CPU seconds more); the
    other test worker keeps the machine's second core busy."""
    quick = tmp_path_factory.mktemp("quick")
    processes = {False: (start(phantom_cache, quick, {m: RUNS[m][0] for m in QUICK}), quick)}
    errors = {}

    def get(method: str, slow: bool = False) -> dict:
        key = slow and method  # False: the quick process; a method's name: its slow one
        if key not in processes:
            out = tmp_path_factory.mktemp(f"{method}-more")
            processes[key] = start(phantom_cache, out, {method: RUNS[method][1]}), out
        process, out = processes[key]
        if key not in errors:
            errors[key] = finish(process)
        assert not errors[key], errors[key]
        return json.loads((out / f"{method}.json").read_text())

    yield get
    for process, _ in processes.values():
        if process.poll() is None:
            process.kill()


def assert_same_as_one_device(results: dict) -> None:
    one = results[ONE]
    for mesh, run in results.items():
        assert [r["step"] for r in run["losses"]] == [r["step"] for r in one["losses"]], mesh
        for got, want in zip(run["losses"], one["losses"]):
            assert set(got) == set(want), mesh
            for key in want:
                if key.endswith("loss"):  # every group's loss, e.g. model/loss and discriminator/loss
                    np.testing.assert_allclose(
                        got[key], want[key], rtol=1e-5, err_msg=f"{mesh} {key} step {want['step']}"
                    )
        assert set(run["labels"]) == set(one["labels"]) and one["labels"], mesh
        for name, labels in one["labels"].items():
            # The 4-step models put many probabilities near the 0.5 threshold, where the split
            # program's float rounding (losses equal within 1e-5) flips a few voxels; a wrong halo
            # would change whole slices (a 24^3 case's slice is 576 voxels, 4 %).
            differ = np.mean(np.asarray(run["labels"][name]) != np.asarray(labels))
            assert differ <= 1e-3, f"{mesh}: {name}: {differ:.3%} of the voxels differ"
    assert_same_dice(results)


def assert_same_dice(results: dict) -> None:
    """The evaluation's Dice of every subset and region equals one device's (a few voxels flipped at
    the threshold, as above, move it by less than 1e-3)."""
    one = results[ONE]["dice"]
    for mesh, run in results.items():
        assert set(run["dice"]) == set(one) and one, mesh
        for case, rows in one.items():
            for subset, dice in rows.items():
                got, want = ([d[region] for region in sorted(dice)] for d in (run["dice"][case][subset], dice))
                np.testing.assert_allclose(np.asarray(got, float), np.asarray(want, float), atol=1e-3, err_msg=mesh)


def predicted(run: dict) -> tuple[np.ndarray, np.ndarray]:
    """The test case's labels from `jaxbrats predict` (its case folder, all modalities) and from the
    evaluation's full subset, both in the source geometry."""
    (name,) = [n for n in run["labels"] if n.startswith("predict/")]
    case = name.removeprefix("predict/").removesuffix(".nii.gz")
    full = f"predictions/{case}_{SUBSET_NAMES[FULL_SUBSET_INDEX]}.nii.gz"
    return np.asarray(run["labels"][name]), np.asarray(run["labels"][full])


def halo_exchanges(run: dict, stage: str) -> Counter:
    return Counter(op for op, _ in run["collectives"][stage])


@pytest.mark.parametrize("method", QUICK)
def test_a_split_volume_trains_and_segments_as_on_one_device(runs, method):
    results = runs(method)
    for mesh, run in results.items():
        if mesh != ONE:
            for stage in run["collectives"]:
                assert halo_exchanges(run, stage)["collective-permute"] > 0, (mesh, stage)
    assert_same_as_one_device(results)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["baseline", "m3ae", "rirn", "mind_the_gap"])
def test_a_split_volume_trains_as_on_one_device_under_every_mesh(runs, method):
    results = runs(method, slow=True)
    assert_same_as_one_device(results)


def test_gradients_under_a_split_volume_equal_one_devices(runs):
    results = runs("baseline")
    want = np.asarray(results[ONE]["gradient"])
    for mesh, run in results.items():
        got = np.asarray(run["gradient"])
        # Relative to the largest gradient: a convolution bias followed by GroupNorm has a
        # gradient of exactly 0 in exact arithmetic, float32 noise on one device and another.
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=mesh)


def test_no_device_holds_x_sub_or_its_moments_whole(runs):
    """M3AE under (data 2, space 4): x_sub (32^3 x 4) and its optimiser moment are split in 4 along
    depth on every device, as placed, as the compiled step takes them and as it returns them, and
    no collective of either stage's step returns as many bytes as x_sub (a gathered x_sub); the mu
    and nu of the shipped config's Adam (x_sub with its own learning rate) are split the same way."""
    run = runs("m3ae")["2,4,1"]
    whole = [32, 32, 32, 4]
    part = [8, 32, 32, 4]
    assert set(run["substitute"]) == {"pretrain", "finetune"}
    for stage, ops in run["collectives"].items():
        assert any(op == "all-to-all" for op, _ in ops), stage  # the crops' windows of x_sub
        assert max(size for _, size in ops) < np.prod(whole) * 4, (stage, max(ops, key=lambda o: o[1]))
    for stage, rows in run["substitute"].items():
        paths = [row["path"] for row in rows]
        # Pretraining trains x_sub (its SGD momentum is in the state); fine-tuning only reads it.
        want = 2 if stage == "pretrain" else 1
        assert len(rows) == want and sum(p.startswith("['opt']") for p in paths) == want - 1, (stage, paths)
        for row in rows:
            assert row["shape"] == whole, row
            assert row["device_parts"] == [part], row  # each of the 8 devices holds a quarter
            for sharding in row["shardings"]:  # placed, the step's input, its output
                assert sharding == {"spec": "P('space',)", "shard": part}, (stage, row["path"], sharding)
    rows = run["adam_substitute"]
    moments = sorted(slot for row in rows for slot in ("mu", "nu") if f".{slot}[" in row["path"])
    assert moments == ["mu", "nu"] and len(rows) == 3, [row["path"] for row in rows]
    for row in rows:
        assert row["shardings"] == [{"spec": "P('space',)", "shard": part}], row


@pytest.mark.parametrize("method", QUICK)
def test_eval_mesh_splits_window_batches_along_data_and_predict_runs_on_it(runs, method):
    """eval.mesh = data 2 x space 4: inside the compiled evaluation and `predict` programs, each
    batch of 2 windows (16^3) is split along "data" and each window's depth along "space" (the
    sharding XLA gave it); on one device nothing is split. `predict` of the test case's folder
    gives the evaluation's full-subset labels, under the mesh as on one device (RIRN's students
    here serve T1ce and FLAIR alone: its run does not predict the four-modality case)."""
    results = runs(method)
    for mesh, run in results.items():
        programs = ("eval",) if method == "rirn" else ("eval", "predict")
        assert sorted(run["windows"]) == sorted(programs), mesh
        for program in programs:
            rows = run["windows"][program]
            assert rows, (mesh, program)  # the program split window batches
            for row in rows:
                batch, depth, *rest = row["shape"]
                want = row["shape"] if mesh == ONE else [batch // 2, depth // 4, *rest]
                assert batch == 2 and row["shard"] == want, (mesh, program, row)
        if method == "rirn":
            continue
        by_predict, by_eval = predicted(run)
        assert by_predict.any() and np.mean(by_predict != by_eval) <= 1e-3, mesh
        differ = np.mean(by_predict != predicted(results[ONE])[0])
        assert differ <= 1e-3, f"{mesh}: predict differs from one device's in {differ:.3%} of the voxels"


def test_the_split_step_moves_halos_and_never_gathers_an_activation(runs):
    """Under (data 2, space 4): neighbours exchange boundary slices; nothing activation-sized is
    all-gathered. An activation of this U-Net is at least one sample's 8x8x4 bottleneck x 8 channels."""
    smallest_activation = 8 * 8 * 4 * 8 * 4  # bytes
    for method in ("baseline", "m3ae"):
        run = runs(method)["2,4,1"]
        for stage, ops in run["collectives"].items():
            assert halo_exchanges(run, stage)["collective-permute"] >= 10, (method, stage)
            gathers = [size for op, size in ops if op == "all-gather"]
            assert all(size < smallest_activation for size in gathers), (method, stage, gathers)
    # RIRN's CAR compares every bottleneck voxel with every other: it gathers the bottleneck
    # embeddings of a sample (8x8x4 voxels x 4 channels; teacher and student, forward and
    # backward: 4 of them, which XLA may merge into one), nothing of finer levels.
    run = runs("rirn")["2,2,2"]
    gathers = [size for op, size in run["collectives"]["train"] if op == "all-gather"]
    assert sum(gathers) <= 4 * 8 * 8 * 4 * 4 * 4, gathers


# --- the command-line contract and the pieces, on this process's one device -----------------------


def test_an_impossible_mesh_is_one_line_naming_the_numbers(phantom_cache, tmp_path, capsys):
    from conftest import TINY

    from jaxbrats.cli import main

    sets = [a for s in TINY + ["train.mesh={data = 2, space = 4}", "data.crop_size=[64,16,16]"] for a in ("--set", s)]
    assert (
        main(
            ["train", "--config", "/dev/null", "--workdir", str(tmp_path / "run"), "--data", str(phantom_cache), *sets]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data 2 x space 4 x model 1 needs 8 devices, but 1 are visible" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_depth_that_does_not_split_at_every_level_is_refused():
    from conftest import tiny_config

    from jaxbrats.config import ConfigError

    with pytest.raises(ConfigError, match=r"crop_size\[0\] = 16 must be divisible by 32: train.mesh.space = 4"):
        tiny_config("train.mesh={space = 4}")  # 4 levels: the coarsest depth is 16 / 8 = 2 < 4 devices
    with pytest.raises(ConfigError, match=r"eval.window\[0\] = 16 must be divisible by 32: eval.mesh.space = 4"):
        tiny_config("eval.mesh={space = 4}")
    assert tiny_config("train.mesh={space = 2}", "data.crop_size=[16,16,16]").train.mesh.space == 2


def test_shifted_trilinear_upsampling_equals_jax_image_resize():
    import jax

    from jaxbrats.networks.unet import upsample_linear

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 5, 3))
    for factor in (2, 4):
        want = jax.image.resize(x, (2, 3 * factor, 4 * factor, 5 * factor, 3), "trilinear")
        np.testing.assert_allclose(upsample_linear(x, factor), want, atol=1e-6)
