import os
from pathlib import Path

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
