import numpy as np
import pytest

from jaxbrats.labels import CONVENTIONS, REGIONS, from_internal, region_voxel_counts, regions_of, to_internal


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_conventions_round_trip(convention):
    source = np.array(sorted(CONVENTIONS[convention]))
    internal = to_internal(source, convention)
    np.testing.assert_array_equal(internal, [0, 1, 2, 3])
    np.testing.assert_array_equal(from_internal(internal, convention), source)


def test_brats2018_enhancing_is_4():
    assert to_internal(np.array([4]), "brats2018")[0] == 3
    assert from_internal(np.array([3]), "brats2018")[0] == 4


def test_regions_are_nested_label_sets():
    labels = np.array([0, 1, 2, 3])
    regions = regions_of(labels)
    assert REGIONS == ("WT", "TC", "ET")
    np.testing.assert_array_equal(regions, [[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    assert region_voxel_counts(np.array([0, 1, 1, 2, 3])) == {"WT": 4, "TC": 3, "ET": 1}
