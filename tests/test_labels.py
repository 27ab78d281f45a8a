import numpy as np
import pytest

from jaxbrats.errors import JaxbratsError
from jaxbrats.labels import (
    CONVENTIONS,
    REGIONS,
    convention_map,
    detect_convention,
    from_internal,
    internal_label_of_name,
    mapped_convention,
    region_voxel_counts,
    regions_of,
    to_internal,
)


@pytest.mark.parametrize("convention", ["brats2018", "brats2023"])
def test_conventions_round_trip(convention):
    source = np.array(sorted(CONVENTIONS[convention]))
    internal = to_internal(source, convention)
    np.testing.assert_array_equal(internal, [0, 1, 2, 3])
    np.testing.assert_array_equal(from_internal(internal, convention), source)


@pytest.mark.parametrize("convention", sorted(CONVENTIONS) + ["msd:0=0,1=2,2=1,3=3"])
def test_every_internal_label_written_back_reads_back_the_same(convention):
    internal = np.array([0, 1, 2, 3])
    written = from_internal(internal, convention)
    assert set(written.tolist()) <= set(convention_map(convention))
    np.testing.assert_array_equal(to_internal(written, convention), internal)


# Regions of the BraTS 2013-2016 convention from its definition (TC = 1+3+4, ET = 4, WT = all),
# written out independently of jaxbrats.labels.
_REGIONS_2013 = {"WT": {1, 2, 3, 4}, "TC": {1, 3, 4}, "ET": {4}}


def test_brats2013_regions_come_out_right_and_write_back_valid():
    source = np.array([0, 1, 2, 3, 4, 4, 3, 2])
    internal = to_internal(source, "brats2013")
    np.testing.assert_array_equal(internal, [0, 1, 2, 1, 3, 3, 1, 2])  # 3 (non-enhancing) -> core, 4 -> enhancing
    expected = np.stack([np.isin(source, list(_REGIONS_2013[r])) for r in REGIONS], axis=-1)
    np.testing.assert_array_equal(regions_of(internal), expected)
    written = from_internal(internal, "brats2013")
    np.testing.assert_array_equal(written, [0, 1, 2, 1, 4, 4, 1, 2])  # non-enhancing written as necrosis (1)
    np.testing.assert_array_equal(
        np.stack([np.isin(written, list(_REGIONS_2013[r])) for r in REGIONS], axis=-1), expected
    )


@pytest.mark.parametrize(
    "values, expected",
    [
        ({0}, "brats2023"),
        ({0, 1, 2, 3}, "brats2023"),
        ({0, 1, 2, 4}, "brats2018"),
        ({0, 2, 3, 4}, "brats2013"),
        ({0, 1, 2, 3, 4}, "brats2013"),
        ({0, 1, 5}, None),
        ({-1, 0}, None),
    ],
)
def test_detect_convention(values, expected):
    assert detect_convention(values) == expected


@pytest.mark.parametrize(
    "name, label",
    [
        ("background", 0),
        ("Background", 0),
        ("edema", 2),
        ("peritumoral oedema", 2),
        ("SNFH", 2),
        ("non-enhancing tumor", 1),
        ("Non_Enhancing", 1),
        ("necrotic", 1),
        ("NCR/NET", 1),
        ("necrotic and non-enhancing tumor core", 1),
        ("enhancing tumour", 3),
        ("GD-enhancing tumor", 3),
        ("ET", 3),
        ("tumor", None),
        ("whole tumor", None),
        ("enhancing core", None),
        ("ignore", None),
    ],
)
def test_label_names_by_keyword(name, label):
    assert internal_label_of_name(name) == label


def test_mapped_convention_spec_round_trips_and_bad_ones_are_refused():
    spec = mapped_convention({0: 0, 1: 2, 2: 1, 3: 3}, "nnunetv2")
    assert spec == "nnunetv2:0=0,1=2,2=1,3=3" and convention_map(spec) == {0: 0, 1: 2, 2: 1, 3: 3}
    with pytest.raises(JaxbratsError, match="missing.*enhancing tumour"):
        mapped_convention({0: 0, 1: 2, 2: 1}, "msd")
    for bad in ("brats2015", "msd:0=0,1=2", "msd:0=0;1=1", ""):
        with pytest.raises(JaxbratsError, match="unknown label convention"):
            convention_map(bad)


def test_brats2018_enhancing_is_4():
    assert to_internal(np.array([4]), "brats2018")[0] == 3
    assert from_internal(np.array([3]), "brats2018")[0] == 4


def test_regions_are_nested_label_sets():
    labels = np.array([0, 1, 2, 3])
    regions = regions_of(labels)
    assert REGIONS == ("WT", "TC", "ET")
    np.testing.assert_array_equal(regions, [[0, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    assert region_voxel_counts(np.array([0, 1, 1, 2, 3])) == {"WT": 4, "TC": 3, "ET": 1}
