import numpy as np
import pytest

from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.pipeline import (
    PipelineConfig,
    RandomCropAugmentDropout,
    crop_slices,
    crop_start,
    make_loader,
    sample_modality_masks,
    subset_indices,
)
from jaxbrats.modalities import SUBSET_MASKS

CROP = (16, 16, 16)


def _batches(cache, n, **overrides):
    config = PipelineConfig(crop_size=CROP, batch_size=2, seed=7, **overrides)
    iterator = iter(make_loader(CacheDataset(cache), config))
    return [next(iterator) for _ in range(n)]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_keys_shapes_dtypes(phantom_cache):
    batch = _batches(phantom_cache, 1, instantiations=2)[0]
    assert batch["image"].shape == (2, 16, 16, 16, 4) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (2, 16, 16, 16) and batch["label"].dtype == np.uint8
    assert batch["valid"].dtype == bool and batch["modality_mask"].shape == (2, 2, 4)
    assert batch["subset"].shape == (2, 2) and batch["subset"].dtype == np.int32
    np.testing.assert_array_equal(SUBSET_MASKS[batch["subset"]], batch["modality_mask"])


def test_deterministic_per_seed_and_worker_count(phantom_cache):
    first = _batches(phantom_cache, 3)
    for a, b in zip(first, _batches(phantom_cache, 3)):
        _assert_same(a, b)
    for a, b in zip(first, _batches(phantom_cache, 3, workers=1)):
        _assert_same(a, b)
    other = PipelineConfig(crop_size=CROP, batch_size=2, seed=8)
    assert not np.array_equal(next(iter(make_loader(CacheDataset(phantom_cache), other)))["image"], first[0]["image"])


def test_exact_resume_from_saved_iterator_state(phantom_cache):
    config = PipelineConfig(crop_size=CROP, batch_size=2, seed=3)
    iterator = iter(make_loader(CacheDataset(phantom_cache), config))
    for _ in range(4):  # past the end of the first epoch (6 cases, batch 2)
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    resumed = iter(make_loader(CacheDataset(phantom_cache), config))
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(3)]):
        _assert_same(a, b)


def test_uniform_dropout_covers_the_15_subsets_evenly():
    rng = np.random.default_rng(0)
    masks = sample_modality_masks(rng, np.ones(4, bool), "uniform", 15000)
    counts = np.bincount(subset_indices(masks), minlength=15)
    # Binomial(15000, 1/15): mean 1000, sd ~31; 5 sd bounds.
    assert counts.min() > 845 and counts.max() < 1155


def test_dropout_respects_really_missing_modalities():
    present = np.array([True, True, False, True])
    rng = np.random.default_rng(1)
    for mode in ("uniform", "drop_k", "none"):
        masks = sample_modality_masks(rng, present, mode, 3000)
        assert not masks[:, 2].any() and masks.any(axis=1).all()
    counts = np.bincount(subset_indices(sample_modality_masks(rng, present, "uniform", 7000)), minlength=15)
    assert (counts > 0).sum() == 7 and counts[counts > 0].min() > 800


def test_m3ae_drop_k_draws_k_uniformly():
    rng = np.random.default_rng(2)
    masks = sample_modality_masks(rng, np.ones(4, bool), "drop_k", 8000)
    dropped = np.bincount(4 - masks.sum(axis=1), minlength=4)
    assert dropped.min() > 1800 and dropped.max() < 2200  # k ~ U{0..3}


@pytest.mark.parametrize("shape", [(10, 20, 7), (30, 30, 30)])
def test_crop_with_flips_matches_numpy_pad_and_flip(shape):
    rng = np.random.default_rng(0)
    volume = rng.random(shape)
    crop = (16, 16, 16)
    for trial in range(20):
        start = crop_start(rng, shape, crop, None, 0.0)
        flips = rng.random(3) < 0.5
        src, dst = crop_slices(start, shape, crop, flips)
        got = np.zeros(crop)
        got[dst] = volume[src]
        pad = [(max(-s, 0), max(s + c - n, 0)) for s, c, n in zip(start, crop, shape)]
        padded = np.pad(volume, pad)  # the crop starts at max(start, 0) in padded coordinates
        want = padded[tuple(slice(max(s, 0), max(s, 0) + c) for s, c in zip(start, crop))]
        want = np.flip(want, axis=tuple(np.flatnonzero(flips)))
        np.testing.assert_array_equal(got, want)


def test_foreground_oversampling_puts_tumour_in_every_crop(phantom_cache):
    for batch in _batches(phantom_cache, 4, foreground_oversample=1.0):
        assert (batch["label"] > 0).any(axis=(1, 2, 3)).all()


def test_padding_is_marked_invalid(phantom_cache):
    dataset = CacheDataset(phantom_cache)
    config = PipelineConfig(crop_size=(32, 32, 32), batch_size=1, seed=0, num_epochs=1, flip_probability=0.0)
    for batch in make_loader(dataset, config):
        voxels = int(np.prod(dataset.manifests[batch["case_index"][0]]["cropped_shape"]))
        assert batch["valid"].sum() == voxels
        assert not batch["label"][~batch["valid"]].any()


def test_intensity_augmentation_is_per_channel_affine_and_padding_stays_zero():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(16, 16, 16, 4)).astype(np.float32)
    element = {"image": image, "present": np.ones(4, bool), "case_index": np.int32(0), "box_start": np.zeros(3, np.int32)}
    config = PipelineConfig(crop_size=(16, 16, 16), flip_probability=0.0, foreground_oversample=0.0)
    out = RandomCropAugmentDropout(config).random_map(element, np.random.default_rng(1))
    for c in range(4):
        scale, shift = np.polyfit(image[..., c].ravel(), out["image"][..., c].ravel(), 1)
        assert 0.9 <= scale <= 1.1 and -0.1 <= shift <= 0.1
        np.testing.assert_allclose(out["image"][..., c], image[..., c] * scale + shift, atol=1e-5)
    padded = RandomCropAugmentDropout(PipelineConfig(crop_size=(20, 16, 16))).random_map(element, np.random.default_rng(2))
    assert padded["valid"].sum() == 16**3 and not padded["image"][~padded["valid"]].any()


def test_batch_locates_each_crop_in_its_case(phantom_cache):
    """crop_start, flipped and case_shape reproduce the label crop from the whole case; box_start places the case."""
    dataset = CacheDataset(phantom_cache)
    for batch in _batches(phantom_cache, 3):
        for b in range(2):
            label = dataset.arrays(int(batch["case_index"][b]))["label"]
            np.testing.assert_array_equal(batch["case_shape"][b], label.shape)
            manifest = dataset.manifests[int(batch["case_index"][b])]
            np.testing.assert_array_equal(batch["box_start"][b], [lo for lo, _ in manifest["crop_box"]])  # in the source grid
            src, dst = crop_slices(batch["crop_start"][b], label.shape, CROP, batch["flipped"][b])
            want = np.zeros(CROP, np.uint8)
            want[dst] = label[src]
            np.testing.assert_array_equal(batch["label"][b], want)


def test_distinct_instantiations_differ_unless_the_case_cannot():
    rng = np.random.default_rng(3)
    pairs = [sample_modality_masks(rng, np.ones(4, bool), "drop_k", 2, distinct=True) for _ in range(500)]
    assert all((a != b).any() for a, b in pairs)
    independent = [sample_modality_masks(rng, np.ones(4, bool), "drop_k", 2) for _ in range(500)]
    assert sum((a == b).all() for a, b in independent) > 10  # equal views happen without the option
    only_flair = np.array([True, False, False, False])
    np.testing.assert_array_equal(sample_modality_masks(rng, only_flair, "drop_k", 2, distinct=True), [only_flair, only_flair])
