"""The suite's set-up: XLA flags, one compilation cache for the run, the order files run in, fixtures."""

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# The environment first, before JAX starts (subprocesses inherit it; `with_xla_flags` adds to it).
# The CLI keeps compiled programs in ~/.cache by default: not in tests (the cache below is theirs).
os.environ["JAXBRATS_COMPILE_CACHE"] = ""
# Two test workers (pytest-xdist) share one accelerator where there is one: no preallocation.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The suite is compile-bound (tiny inputs, many small programs): XLA:CPU's backend (LLVM) without
# optimisation compiles them about a third faster (RIRN's tests: 110 -> 69 s), and its elemental
# emitters, rather than the newer fusion emitters, another quarter faster (RIRN's train step:
# 9.9 -> 6.8 s), the steps running as fast.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"]
).strip()
# One persistent XLA compilation cache for the whole run: the suite trains the same tiny programs
# again and again (a second identical engine.train: 45 s cold, 19.5 s warm). The first process
# (xdist's controller, or the one process of `-n 0`) names a temporary folder after its pid; the
# workers inherit the name, so a program compiled by one worker is loaded by the other. Tests that
# count compilations count the loaded programs with the compiled ones. Set the variable to a
# folder of your own to keep the cache across runs, or empty to run without it.
os.environ.setdefault("JAXBRATS_TEST_COMPILE_CACHE", f"{tempfile.gettempdir()}/jaxbrats-tests-xla-{os.getpid()}")

import jax
import pytest

from jaxbrats.data.phantom import write_phantom
from jaxbrats.data.preprocess import prepare_dataset

COMPILE_CACHE = Path(os.environ["JAXBRATS_TEST_COMPILE_CACHE"])


def _remove_dead_caches() -> None:
    """The caches of runs that were killed before they could remove theirs (their process is gone)."""
    for folder in COMPILE_CACHE.parent.glob("jaxbrats-tests-xla-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not Path(f"/proc/{pid}").exists()):
            shutil.rmtree(folder, ignore_errors=True)


if COMPILE_CACHE.name == f"jaxbrats-tests-xla-{os.getpid()}":  # named here: removed when this process exits
    if Path("/proc/self").exists():
        _remove_dead_caches()
    atexit.register(shutil.rmtree, COMPILE_CACHE, ignore_errors=True)
if os.environ["JAXBRATS_TEST_COMPILE_CACHE"]:  # set empty: no cache, every program compiled
    jax.config.update("jax_compilation_cache_dir", str(COMPILE_CACHE))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # every program, however quick
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # and however small


def with_xla_flags(*flags: str) -> dict:
    """The environment for a subprocess: this one's, with more XLA flags (e.g. fake CPU devices)."""
    return dict(os.environ, XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip(), JAX_PLATFORMS="cpu")


def run_on_cpu_devices(command: list, devices: int, timeout: int = 600) -> str:
    """Runs `command` in a subprocess with `devices` fake CPU devices; asserts it succeeded, returns its stdout."""
    done = subprocess.run(
        command,
        env=with_xla_flags(f"--xla_force_host_platform_device_count={devices}"),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


#: CPU seconds each test file used, its subprocesses included, with the compilation cache above
#: (pytest --durations and a per-file CPU count; 2 workers on the 2-core machine; the first eight
#: measured alone, `pytest -n 0 FILE` from a cold cache, user + sys, 2026-12-07). xdist's
#: `--dist loadfile` hands files out in collection order (`--no-loadscope-reorder`): heaviest
#: first, so that no long file starts last while the other worker idles. The others are light.
FILE_SECONDS = {
    "test_space_sharding.py": 140,  # one process of 8 fake devices
    "test_gpu_bench.py": 105,  # ten processes, one per step of tools/gpu_bench.sh --tiny
    "test_mind_the_gap.py": 110,
    "test_rirn.py": 115,
    "test_acdis.py": 130,  # and a 4-device subprocess
    "test_engine.py": 90,
    "test_m3ae.py": 75,
    "test_multihost.py": 135,  # two processes, three runs; one process of 4 devices
    "test_model_settings.py": 45,
    "test_validation.py": 60,  # one validated run, a killed one resumed
    "test_preemption.py": 55,  # a SIGTERM subprocess, two processes stopped together
    "test_tta.py": 25,
    "test_disk_faults.py": 25,
    "test_predict.py": 35,
    "test_compile_once.py": 35,
    "test_cli.py": 30,
    "test_unet.py": 25,
    "test_evaluation.py": 20,
    "test_benchmark.py": 60,
    "test_eval_sharing.py": 60,
    "test_optional_imports.py": 20,
    "test_init_state.py": 10,
    "test_import_m3ae.py": 15,
    "test_applicability.py": 10,
    "test_family.py": 10,
    "test_torch_parity.py": 10,
    "test_permissions.py": 10,
    "test_m3ae_losses.py": 10,
    "test_consistency_losses.py": 10,
}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0.0))  # stable: a file's tests keep their order


FIXTURES = Path(os.environ.get("JAXBRATS_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "brats_fixtures"))


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Six 24^3 phantom cases in the BraTS 2023 layout."""
    out = tmp_path_factory.mktemp("phantom")
    write_phantom(out, 6, (24, 24, 24), layout="brats2023", seed=3, workers=1)
    return out


@pytest.fixture(scope="session")
def phantom_cache(phantom_dir, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    report = prepare_dataset(phantom_dir, cache, workers=1, progress=False)
    assert not report["errors"]
    return cache


@pytest.fixture
def fixture_case() -> Path:
    case = FIXTURES / "BraTS-GLI-00000-000"
    if not case.is_dir():
        pytest.skip(f"real BraTS fixture not found at {FIXTURES}")
    return case


#: A tiny baseline: 8-channel U-Net, 16^3 crops, a few steps; settings as `--set` overrides.
TINY = [
    "model.widths=[8,8,8,8]",
    "model.blocks=[1,1,1,1]",
    "data.crop_size=[16,16,16]",
    "data.batch_size=2",
    "data.split_ratios=[0.67,0.0,0.33]",
    "stages.train.steps=4",
    "stages.train.optimizers.model.lr=3e-3",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.progress=false",
    "eval.window=[16,16,16]",
    "eval.bucket_multiple=8",
]


def tiny_config(*extra):
    from jaxbrats.methods import load_config

    return load_config(None, TINY + list(extra))


@pytest.fixture(scope="session")
def trained_run(phantom_cache, tmp_path_factory) -> Path:
    """A work directory holding a 4-step tiny baseline run on `phantom_cache`."""
    from jaxbrats.engine.trainer import train

    workdir = tmp_path_factory.mktemp("run")
    train(tiny_config(), workdir, phantom_cache)
    return workdir


#: M3AE's phantom config shrunk to the test phantom (24^3 cases): 16^3 crops, 8^3 patches, a few steps.
M3AE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "m3ae_phantom.toml"
M3AE_TINY = [
    "model.widths=[8,8,8,8]",
    "data.crop_size=[16,16,16]",
    "data.split_ratios=[0.67,0.0,0.33]",
    "method.substitute_shape=[24,24,24]",
    "stages.pretrain.steps=3",
    "stages.finetune.steps=4",
    "stages.pretrain.optimizers.model.warmup_steps=0",
    "stages.finetune.optimizers.model.warmup_steps=0",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.progress=false",
    "eval.window=[16,16,16]",
    "eval.bucket_multiple=8",
    "eval.hd95=false",
]


def m3ae_config(*extra):
    from jaxbrats.methods import load_config

    return load_config(M3AE_CONFIG, M3AE_TINY + list(extra))


@pytest.fixture(scope="session")
def m3ae_run(phantom_cache, tmp_path_factory):
    """(work directory, trainer) of a tiny M3AE run, both stages (3 pretraining, 4 fine-tuning steps)."""
    from jaxbrats.engine.trainer import train

    workdir = tmp_path_factory.mktemp("m3ae")
    return workdir, train(m3ae_config(), workdir, phantom_cache)
