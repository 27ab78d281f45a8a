import json

import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.pipeline import (
    ROTATION_PLANES,
    PipelineConfig,
    RandomCropAugmentDropout,
    crop_slices,
    crop_start,
    make_loader,
    rotated_crop,
    rotation_margin,
    sample_modality_masks,
    subset_indices,
)
from jaxbrats.errors import JaxbratsError
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
    # Two workers make alternate whole batches (a Grain DataLoader would batch each worker's own
    # records: other batches); a state saved there resumes in one process to the same batches.
    config = PipelineConfig(crop_size=CROP, batch_size=2, seed=7, workers=2)
    two = iter(make_loader(CacheDataset(phantom_cache), config))
    for a in first[:2]:
        _assert_same(a, next(two))
    alone = iter(make_loader(CacheDataset(phantom_cache), PipelineConfig(crop_size=CROP, batch_size=2, seed=7)))
    alone.set_state(two.get_state())
    _assert_same(first[2], next(alone))
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


def test_a_resume_with_another_batch_size_goes_on_at_the_next_sample(phantom_cache):
    """The state counts samples: 3 batches of 2, resumed with batches of 3, goes on at sample 6."""
    dataset = CacheDataset(phantom_cache)
    two = iter(make_loader(dataset, PipelineConfig(crop_size=CROP, batch_size=2, seed=3)))
    for _ in range(3):
        next(two)
    state = two.get_state()
    assert json.loads(state)["samples_served"] == 6
    after = [next(two) for _ in range(3)]  # samples 6..11
    three = iter(make_loader(dataset, PipelineConfig(crop_size=CROP, batch_size=3, seed=3)))
    three.set_state(state)
    resumed = [next(three) for _ in range(2)]
    for key in after[0]:
        np.testing.assert_array_equal(
            np.concatenate([b[key] for b in resumed]), np.concatenate([b[key] for b in after]), err_msg=key
        )
    with pytest.raises(JaxbratsError, match="unreadable"):
        three.set_state(b"{not json")


def test_a_state_saved_by_grains_data_loader_resumes(phantom_cache, capsys):
    """Runs checkpointed before the loader became a Grain MapDataset (a DataLoader of the same
    sampler, crops and batches) resume where they stopped; another cache is refused."""
    from jaxbrats.data.pipeline import CacheSource, _grain

    grain = _grain()  # with the transform registered as Grain's RandomMap
    config = PipelineConfig(crop_size=CROP, batch_size=2, seed=3)
    dataset = CacheDataset(phantom_cache)
    shards = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    sampler = grain.samplers.IndexSampler(len(dataset), shards, shuffle=True, num_epochs=None, seed=3)
    operations = [RandomCropAugmentDropout(config), grain.transforms.Batch(2, drop_remainder=True)]
    old = iter(grain.DataLoader(data_source=CacheSource(dataset), sampler=sampler, operations=operations))
    for _ in range(4):
        next(old)
    resumed = iter(make_loader(dataset, config))
    resumed.set_state(old.get_state())
    for _ in range(2):
        _assert_same(next(old), next(resumed))
    # A DataLoader of 2 workers drew in its own order: the run goes on in this one, with a note.
    two_workers = {**json.loads(old.get_state()), "last_seen_indices": {"0": 5, "1": 6}, "worker_count": 2}
    resumed.set_state(json.dumps(two_workers).encode())
    assert json.loads(resumed.get_state())["samples_served"] == 7
    assert "note: the data iterator was saved by an earlier jaxbrats with 2 loader" in capsys.readouterr().err
    other = iter(make_loader(CacheDataset(phantom_cache, dataset.case_ids[:4]), config))
    with pytest.raises(JaxbratsError, match="other cases"):
        other.set_state(old.get_state())


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
    element = {
        "image": image,
        "present": np.ones(4, bool),
        "case_index": np.int32(0),
        "box_start": np.zeros(3, np.int32),
    }
    config = PipelineConfig(crop_size=(16, 16, 16), flip_probability=0.0, foreground_oversample=0.0)
    out = RandomCropAugmentDropout(config).random_map(element, np.random.default_rng(1))
    for c in range(4):
        scale, shift = np.polyfit(image[..., c].ravel(), out["image"][..., c].ravel(), 1)
        assert 0.9 <= scale <= 1.1 and -0.1 <= shift <= 0.1
        np.testing.assert_allclose(out["image"][..., c], image[..., c] * scale + shift, atol=1e-5)
    padded = RandomCropAugmentDropout(PipelineConfig(crop_size=(20, 16, 16))).random_map(
        element, np.random.default_rng(2)
    )
    assert padded["valid"].sum() == 16**3 and not padded["image"][~padded["valid"]].any()


def test_batch_locates_each_crop_in_its_case(phantom_cache):
    """crop_start, flipped and case_shape reproduce the label crop from the whole case; box_start places the case."""
    dataset = CacheDataset(phantom_cache)
    for batch in _batches(phantom_cache, 3):
        for b in range(2):
            label = dataset.arrays(int(batch["case_index"][b]))["label"]
            np.testing.assert_array_equal(batch["case_shape"][b], label.shape)
            manifest = dataset.manifests[int(batch["case_index"][b])]
            np.testing.assert_array_equal(
                batch["box_start"][b], [lo for lo, _ in manifest["crop_box"]]
            )  # in the source grid
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
    np.testing.assert_array_equal(
        sample_modality_masks(rng, only_flair, "drop_k", 2, distinct=True), [only_flair, only_flair]
    )


# --- rotation --------------------------------------------------------------------------------


def _element(image, label=None):
    element = {
        "image": image,
        "present": np.ones(4, bool),
        "case_index": np.int32(0),
        "box_start": np.zeros(3, np.int32),
    }
    if label is not None:
        element["label"] = label
    return element


def _blobs(shape, seed=0):
    """(label, image): nested boxes of labels 0-3 in a case, channel 0 the label as float, the others noise + 1."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    for value, inset in ((1, 3), (2, 6), (3, 8)):
        label[tuple(slice(inset + int(rng.integers(3)), n - inset) for n in shape)] = value
    image = np.concatenate(
        [label[..., None].astype(np.float32), 1 + rng.random(shape + (3,), dtype=np.float32)], axis=-1
    )
    return label, image


@pytest.mark.parametrize("axes", ROTATION_PLANES)
def test_rotated_crop_matches_ndimage_rotate_of_the_padded_case(axes):
    """The rotated crop is scipy.ndimage.rotate of the zero-padded (then flipped) case about the crop's centre."""
    rng = np.random.default_rng(5)
    shape, crop = (20, 24, 18), (16, 12, 14)
    image = 1 + rng.random(shape + (4,), dtype=np.float32)
    label = rng.integers(0, 4, shape).astype(np.uint8)
    pad, extra = 40, 20
    padded = {
        "image": np.pad(image, [(pad, pad)] * 3 + [(0, 0)]),
        "label": np.pad(label, pad),
        "valid": np.pad(np.ones(shape, np.uint8), pad),
    }
    for degrees in (17.0, -73.0, 150.0):
        start = np.array([rng.integers(-6, n - c + 7) for n, c in zip(shape, crop)])  # partly outside the case
        flips = rng.random(3) < 0.5
        got = rotated_crop(image, label, start, crop, flips, axes, degrees)
        window = tuple(slice(pad + s - extra, pad + s + c + extra) for s, c in zip(start, crop))  # centred on the crop
        centre = tuple(slice(extra, extra + c) for c in crop)
        want = {}
        for key, order in (("image", 1), ("label", 0), ("valid", 0)):
            flipped = np.flip(padded[key][window], axis=tuple(np.flatnonzero(flips)))
            want[key] = ndi.rotate(flipped, degrees, axes=axes, reshape=False, order=order)[centre]
        want["valid"] = want["valid"].astype(bool)
        want["image"][~want["valid"]] = 0.0
        np.testing.assert_array_equal(got["valid"], want["valid"])
        np.testing.assert_array_equal(got["label"], want["label"])
        np.testing.assert_allclose(got["image"], want["image"], atol=1e-5)
        assert got["image"].flags.c_contiguous and got["image"].dtype == np.float32 and got["label"].dtype == np.uint8


def test_rotation_by_zero_degrees_is_the_plain_crop():
    rng = np.random.default_rng(6)
    shape, crop = (20, 14, 18), (16, 16, 16)
    image, label = rng.random(shape + (4,), dtype=np.float32), rng.integers(0, 4, shape).astype(np.uint8)
    start, flips = np.array([3, -2, 1]), np.array([True, False, True])
    src, dst = crop_slices(start, shape, crop, flips)
    want = {
        "image": np.zeros(crop + (4,), np.float32),
        "label": np.zeros(crop, np.uint8),
        "valid": np.zeros(crop, bool),
    }
    want["image"][dst], want["label"][dst], want["valid"][dst] = image[src], label[src], True
    for axes in ROTATION_PLANES:
        got = rotated_crop(image, label, start, crop, flips, axes, 0.0)
        _assert_same(got, want)


def test_rotation_margin_holds_the_rotated_crop():
    crop = (16, 24, 8)
    for axes in ROTATION_PLANES:
        assert (rotation_margin(crop, axes, 0.0)[list(axes)] == 1).all()
        for degrees in np.linspace(-180, 180, 37):
            margin = rotation_margin(crop, axes, degrees)
            a, b = axes
            t = np.deg2rad(degrees)
            reach_a = (crop[a] * abs(np.cos(t)) + crop[b] * abs(np.sin(t))) / 2
            assert margin[3 - a - b] == 0 and crop[a] / 2 + margin[a] >= reach_a + 1


def test_labels_rotate_with_the_image():
    """Channel 0 is the label as float: after rotation the labels (nearest) keep their values and agree with
    the rounded channel (linear) away from label boundaries, where the channel takes intermediate values."""
    shape = (24, 24, 24)
    label, image = _blobs(shape)
    config = PipelineConfig(
        crop_size=(16, 16, 16),
        rotation_degrees=40.0,
        flip_probability=0.5,
        foreground_oversample=0.0,
        intensity_scale=0.0,
        intensity_shift=0.0,
    )
    transform = RandomCropAugmentDropout(config)
    checked = 0
    for seed in range(6):
        out = transform.random_map(_element(image, label), np.random.default_rng(seed))
        assert set(np.unique(out["label"])) <= {0, 1, 2, 3}
        channel = out["image"][..., 0]
        # Interior: the label is the same over the voxel's 3^3 neighbourhood (and it is in the case).
        interior = (ndi.maximum_filter(out["label"], 3) == ndi.minimum_filter(out["label"], 3)) & ndi.binary_erosion(
            out["valid"], border_value=1
        )
        np.testing.assert_array_equal(np.rint(channel[interior]), out["label"][interior])
        checked += interior.sum()
        fractional = np.abs(channel - np.rint(channel)) > 0.05
        assert fractional.sum() > 50  # linear interpolation across the label boundaries
    assert checked > 6 * 16**3 / 4


def test_rotated_crop_is_filled_with_the_case():
    """Where the case extends beyond the rotated crop, no corner of it is padding."""
    shape = (32, 32, 32)
    rng = np.random.default_rng(7)
    image = 1 + rng.random(shape + (4,), dtype=np.float32)
    for axes in ROTATION_PLANES:
        out = rotated_crop(image, None, np.array([8, 8, 8]), (16, 16, 16), np.array([False, True, False]), axes, 45.0)
        assert out["valid"].all() and (out["image"] >= 1).all() and "label" not in out
    # Through the transform: a 10-degree rotation of a 16^3 crop needs 3 more voxels a side.
    config = PipelineConfig(crop_size=(16, 16, 16), rotation_degrees=10.0, foreground_oversample=0.0)
    for seed in range(10):
        out = RandomCropAugmentDropout(config).random_map(
            _element(np.pad(image, [(8, 8)] * 3 + [(0, 0)], constant_values=1)), np.random.default_rng(seed)
        )
        assert out["valid"].all() and (out["image"] > 0.5).all()


def test_rotation_keeps_padding_zero_and_invalid():
    """A case smaller than the crop: outside it valid is False and the (intensity-augmented) image exactly 0."""
    shape = (12, 10, 12)
    rng = np.random.default_rng(8)
    image = 1 + rng.random(shape + (4,), dtype=np.float32)
    label = rng.integers(1, 4, shape).astype(np.uint8)
    config = PipelineConfig(crop_size=(16, 16, 16), rotation_degrees=30.0, foreground_oversample=0.0)
    for seed in range(6):
        out = RandomCropAugmentDropout(config).random_map(_element(image, label), np.random.default_rng(seed))
        valid = out["valid"]
        assert not valid.all() and abs(int(valid.sum()) - int(np.prod(shape))) < 0.2 * np.prod(
            shape
        )  # rotation keeps volume
        assert not out["image"][~valid].any() and not out["label"][~valid].any()
        assert (out["label"][valid] > 0).all()  # a label is rotated with its voxel, never taken from padding


def test_rotation_off_draws_nothing_and_rotation_on_keeps_the_crop_place(phantom_cache):
    """rotation_degrees = 0 is off whatever the probability (the stream is unchanged); rotation draws after the
    crop's start and flips, so a rotated batch has the same crop_start, flipped and cases."""
    off = _batches(phantom_cache, 3)
    for a, b in zip(off, _batches(phantom_cache, 3, rotation_degrees=0.0, rotation_probability=0.5)):
        _assert_same(a, b)
    on = _batches(phantom_cache, 3, rotation_degrees=20.0)
    for a, b in zip(off, on):
        for key in ("crop_start", "flipped", "case_index", "case_shape", "box_start", "present"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert b["image"].shape == a["image"].shape and b["label"].dtype == np.uint8 and b["valid"].dtype == bool
        assert not np.array_equal(a["label"], b["label"])
        assert not b["image"][~b["valid"]].any()
    for a, b in zip(on, _batches(phantom_cache, 3, rotation_degrees=20.0)):
        _assert_same(a, b)
    never = _batches(phantom_cache, 3, rotation_degrees=20.0, rotation_probability=0.0)  # draws, never rotates
    for a, b in zip(off, never):
        for key in ("label", "valid", "crop_start", "flipped"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_rotation_settings_are_checked():
    with pytest.raises(ValueError, match="rotation_degrees must be in"):
        PipelineConfig(rotation_degrees=200.0)
    with pytest.raises(ValueError, match="rotation_probability in"):
        PipelineConfig(rotation_degrees=10.0, rotation_probability=1.5)
