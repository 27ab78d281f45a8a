import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbrats.modalities import (
    FULL_SUBSET_INDEX,
    MODALITIES,
    SUBSET_MASKS,
    SUBSET_NAMES,
    SUBSETS,
    drop_modalities,
    modality_of_token,
    subset_index,
)


def test_modality_order_is_canonical():
    assert MODALITIES == ("flair", "t1ce", "t1", "t2")


def test_fifteen_subsets_in_papers_row_order():
    assert len(SUBSETS) == 15 and len(set(SUBSET_NAMES)) == 15
    assert [len(s) for s in SUBSETS] == [1] * 4 + [2] * 6 + [3] * 4 + [4]
    assert SUBSET_NAMES[:5] == ("flair", "t1ce", "t1", "t2", "flair+t1ce")
    assert SUBSET_NAMES[FULL_SUBSET_INDEX] == "flair+t1ce+t1+t2"


def test_subset_masks_match_names():
    assert SUBSET_MASKS.shape == (15, 4) and SUBSET_MASKS.dtype == bool
    for mask, subset in zip(SUBSET_MASKS, SUBSETS):
        assert tuple(m for m, keep in zip(MODALITIES, mask) if keep) == subset
    assert not SUBSET_MASKS.flags.writeable


def test_subset_index_accepts_names_strings_and_masks():
    assert subset_index("t1ce+flair") == 4
    assert subset_index(["t2"]) == 3
    assert subset_index(np.array([True, True, True, True])) == FULL_SUBSET_INDEX
    with pytest.raises(ValueError):
        subset_index(["dwi"])
    with pytest.raises(ValueError):
        subset_index(np.zeros(4, bool))


@pytest.mark.parametrize(
    "token, modality",
    [
        ("t2f", "flair"),
        ("FLAIR", "flair"),
        ("t1c", "t1ce"),
        ("t1ce", "t1ce"),
        ("t1n", "t1"),
        ("t2w", "t2"),
        ("seg", "seg"),
        ("Segm", "seg"),
        ("dwi", None),
    ],
)
def test_file_name_aliases(token, modality):
    assert modality_of_token(token) == modality


def test_drop_modalities_numpy_and_inside_jit():
    image = np.arange(2 * 2 * 2 * 4, dtype=np.float32).reshape(1, 2, 2, 2, 4) + 1
    mask = SUBSET_MASKS[[subset_index("flair+t2")]]
    expected = image * np.array([1, 0, 0, 1], np.float32)
    np.testing.assert_array_equal(drop_modalities(image, mask), expected)
    jitted = jax.jit(lambda x, i: drop_modalities(x, jnp.asarray(SUBSET_MASKS)[i]))
    np.testing.assert_array_equal(jitted(image, jnp.array([subset_index("flair+t2")])), expected)
    fill = np.full_like(image, -1.0)
    assert (drop_modalities(image, mask, fill)[..., 1] == -1).all()
