import os
from pathlib import Path

# The CLI keeps compiled programs on disk by default; tests start cold and write nothing outside tmp.
os.environ["JAXBRATS_COMPILE_CACHE"] = ""
# Two test workers (pytest-xdist) share one accelerator where there is one: no preallocation.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# The suite is compile-bound (tiny inputs, many small programs): XLA:CPU's backend (LLVM) without
# optimisation compiles them about a third faster (RIRN's tests: 110 -> 69 s). Set before JAX
# starts; subprocesses inherit it (`with_xla_flags` adds to it).
XLA_TEST_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_TEST_FLAGS}".strip()


def with_xla_flags(*flags: str) -> dict:
    """The environment for a subprocess: this one's, with more XLA flags (e.g. fake CPU devices)."""
    return dict(os.environ, XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip(), JAX_PLATFORMS="cpu")


import pytest

from jaxbrats.data.phantom import write_phantom
from jaxbrats.data.preprocess import prepare_dataset

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
