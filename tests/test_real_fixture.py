"""The real BraTS 2023 case beside the project (skipped when absent)."""

import numpy as np

from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.discovery import discover
from jaxbrats.data.loading import load_case
from jaxbrats.data.preprocess import prepare_dataset
from jaxbrats.labels import region_voxel_counts

# From the fixture folder's README (beside the project, see conftest.FIXTURES), counted on the raw seg file.
README_REGIONS = {"WT": 57305, "TC": 44469, "ET": 32731}
README_LABELS = {0: 8870695, 1: 11738, 2: 12836, 3: 32731}


def test_real_case_loads_with_the_readme_counts(fixture_case):
    layout, cases, bad = discover(fixture_case.parent)
    assert layout == "brats2023" and not bad and len(cases) == 1
    case = load_case(cases[0])
    assert case.shape == (240, 240, 155) and case.axcodes == ("L", "P", "S")
    assert region_voxel_counts(case.labels) == README_REGIONS
    assert dict(zip(*np.unique(case.labels, return_counts=True))) == README_LABELS


def test_real_case_preprocesses_cleanly(fixture_case, tmp_path):
    for normalization in ("zscore", "percentile"):
        cache = tmp_path / normalization
        report = prepare_dataset(fixture_case.parent, cache, normalization=normalization, workers=1, progress=False)
        assert not report["errors"]
        dataset = CacheDataset(cache)
        manifest, arrays = dataset.manifests[0], dataset.arrays(0)
        box = np.array(manifest["crop_box"])
        assert (box[:, 0] >= 0).all() and (box[:, 1] <= [240, 240, 155]).all() and (box[:, 0] < box[:, 1]).all()
        assert manifest["region_voxels"] == README_REGIONS
        image = np.asarray(arrays["image"])
        brain = (image != 0).any(axis=-1)
        for c in range(4):
            values = image[..., c][brain]
            assert np.isfinite(values).all() and values.std() > 0.1
            if normalization == "zscore":
                assert abs(values.mean()) < 0.05 and abs(values.std() - 1) < 0.05
            else:
                assert values.min() >= 0 and values.max() <= 1
