"""The 15-subset evaluation program, its reports, and predictions in the source geometry."""

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from helpers import save

from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.preprocess import prepare_dataset
from jaxbrats.engine.workdir import load_splits
from jaxbrats.errors import JaxbratsError
from jaxbrats.evaluation import program as program_module
from jaxbrats.evaluation.metrics import canonical_spacing, dice_from_counts, hd95_table
from jaxbrats.evaluation.program import bucket_shape, evaluate, make_case_program, subset_evaluator
from jaxbrats.inference import segment as segmentation
from jaxbrats.inference.nifti import write_prediction
from jaxbrats.inference.predict import predict_case
from jaxbrats.inference.segment import pad_to, postprocess_et
from jaxbrats.inference.trained import load_trained
from jaxbrats.labels import ENHANCING, NECROSIS
from jaxbrats.modalities import SUBSET_MASKS, SUBSET_NAMES


def _case_inputs(cache, cfg, i=0):
    dataset = CacheDataset(cache)
    arrays, shape = dataset.arrays(i), tuple(dataset.manifests[i]["cropped_shape"])
    bucket = bucket_shape([shape], cfg)
    return (
        pad_to(np.asarray(arrays["image"]), bucket),
        pad_to(np.asarray(arrays["label"]), bucket),
        pad_to(np.ones(shape, bool), bucket),
    )


def test_the_15_subset_program_equals_a_python_loop(trained_run, phantom_cache):
    method, graphdefs, models, config = load_trained(trained_run)
    image, labels, valid = _case_inputs(phantom_cache, config.eval)
    counts, predicted = make_case_program(method, graphdefs, config.eval)(models, image, labels, valid)
    one = jax.jit(subset_evaluator(method, graphdefs, config.eval))
    for s, mask in enumerate(SUBSET_MASKS):
        c, p = one(models, image, labels, valid, jnp.asarray(mask), jnp.int32(s))
        np.testing.assert_array_equal(counts[s], c, err_msg=SUBSET_NAMES[s])
        np.testing.assert_array_equal(predicted[s], p, err_msg=SUBSET_NAMES[s])
    assert len({np.asarray(p).tobytes() for p in predicted}) > 1  # the subsets do differ


def test_evaluate_writes_the_summary_compiled_once(trained_run, phantom_cache, tmp_path):
    method, graphdefs, models, config = load_trained(trained_run)
    ids = load_splits(trained_run, CacheDataset(phantom_cache))["test"]
    summary = evaluate(
        method, graphdefs, models, CacheDataset(phantom_cache, ids), config.eval, tmp_path, progress=False
    )
    assert set(summary) == {"regions", "subsets", "mean", "cases"}
    assert summary["regions"] == ["WT", "TC", "ET"] and summary["cases"] == len(ids) == 2
    assert [row["name"] for row in summary["subsets"]] == list(SUBSET_NAMES)
    assert summary["subsets"][0]["modalities"] == ["flair"] and summary["subsets"][-1]["modalities"] == [
        "flair",
        "t1ce",
        "t1",
        "t2",
    ]
    for row in summary["subsets"]:
        assert set(row) == {"name", "modalities", "cases", "served", "dice", "hd95"}
        assert row["cases"] == 2 and row["served"]  # every phantom case has the four modalities
        assert all(0.0 <= row["dice"][r] <= 1.0 for r in ("WT", "TC", "ET"))
    assert set(summary["mean"]) == {"rows", "dice", "hd95"} and summary["mean"]["rows"] == 15
    case_dice = [json.loads((tmp_path / "cases" / f"{i}.json").read_text())["subsets"][3]["dice"]["WT"] for i in ids]
    assert summary["subsets"][3]["dice"]["WT"] == pytest.approx(np.mean(case_dice))
    settings = json.loads((tmp_path / "eval_settings.json").read_text())
    assert settings["compilations"] + settings["loaded_from_cache"] == 1  # compiled, or loaded from the cache
    assert (tmp_path / "summary.md").read_text().count("\n| ") == 16
    assert len((tmp_path / "summary.csv").read_text().splitlines()) == 17
    assert (tmp_path / "dice_heatmap.png").stat().st_size > 0
    for i in ids:  # full-modality predictions in the source geometry
        written = nib.load(tmp_path / "predictions" / f"{i}.nii.gz")
        source = nib.load(_source_image(phantom_cache, i))
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine)


def _source_image(cache, case_id):
    manifest = json.loads((cache / "cases" / case_id / "manifest.json").read_text())
    return manifest["sources"]["flair"]


def test_et_postprocessing_relabels_small_et():
    labels = jnp.zeros((8, 8, 8), jnp.uint8).at[0, 0, :3].set(ENHANCING)
    out = postprocess_et(labels, 4)
    assert int((out == ENHANCING).sum()) == 0 and int((out == NECROSIS).sum()) == 3
    assert int((postprocess_et(labels, 3) == ENHANCING).sum()) == 3


def test_dice_from_counts_over_subsets():
    counts = np.zeros((15, 3, 3))
    counts[:, :, 0] = [1, 1, 1]
    np.testing.assert_allclose(dice_from_counts(counts)[:, 0], 1.0)


def test_predict_uses_the_present_modalities_and_the_source_geometry(trained_run, tmp_path):
    from jaxbrats.data.phantom import write_phantom

    raw = tmp_path / "raw"
    write_phantom(raw, 1, (20, 24, 18), layout="brats2020", seed=9, workers=1)
    case = next(raw.iterdir())
    for f in case.iterdir():
        if f.name.endswith(("_t1.nii.gz", "_t2.nii.gz", "_seg.nii.gz")):
            f.unlink()
    before = _folder_digest(case)
    info = predict_case(trained_run, case, tmp_path / "out" / "seg.nii.gz")
    assert info["present"] == ["flair", "t1ce"] and info["missing"] == ["t1", "t2"]
    assert _folder_digest(case) == before  # same names, bytes, modes and modification times
    written = nib.load(tmp_path / "out" / "seg.nii.gz")
    source = nib.load(next(case.glob("*_flair.nii.gz")))
    assert written.shape == source.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 4}  # the 2018-2021 convention
    assert info["convention"] == "brats2018"


def _folder_digest(folder: Path) -> list[tuple]:
    """Every entry under `folder`: (relative path, sha256 of a file's bytes or "dir", mode, mtime in ns)."""
    rows = []
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        rows.append((str(path.relative_to(folder)), digest, st.st_mode, st.st_mtime_ns))
    return rows


def _input_case(tmp_path) -> Path:
    from jaxbrats.data.phantom import write_phantom

    write_phantom(tmp_path / "raw", 1, (16, 16, 16), layout="brats2020", seed=4, workers=1)
    return next((tmp_path / "raw").iterdir())


@pytest.mark.parametrize(
    "where", ["file", "nested", "the folder itself", "dotdot", "symlink to the folder", "case via symlink"]
)
def test_predict_refuses_an_output_inside_the_case_folder_and_writes_nothing(trained_run, tmp_path, where):
    case = _input_case(tmp_path)
    given_case = case
    if where == "file":
        out = case / "seg.nii.gz"
    elif where == "nested":
        out = case / "sub" / "seg.nii.gz"
    elif where == "the folder itself":
        out = case
    elif where == "dotdot":
        (tmp_path / "elsewhere").mkdir()
        out = tmp_path / "elsewhere" / ".." / "raw" / case.name / "seg.nii.gz"
    elif where == "symlink to the folder":
        (tmp_path / "link").symlink_to(case, target_is_directory=True)
        out = tmp_path / "link" / "seg.nii.gz"
    else:  # the case named through a symlink, the output through the real path
        given_case = tmp_path / "link"
        given_case.symlink_to(case, target_is_directory=True)
        out = case / "seg.nii.gz"
    before, outside = _folder_digest(case), sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(JaxbratsError) as raised:
        predict_case(trained_run, given_case, out)
    assert str(out) in str(raised.value) and "inside the input case folder" in str(raised.value)
    assert _folder_digest(case) == before  # no file, no partial file, no new directory
    assert sorted(p.name for p in tmp_path.iterdir()) == outside
    assert not any(p.name.startswith(".partial") for p in tmp_path.rglob("*"))


# Region definitions from the BraTS convention, independent of jaxbrats.labels:
# internal labels 1 necrosis, 2 edema, 3 enhancing; WT = all tumour, TC = necrosis + ET, ET = ET.
REGION_VALUES = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
HD95_ONE_EMPTY_BRATS = 373.13  # BraTS and nnU-Net: 0 when both are empty, 373.13 when exactly one is


def _numpy_dice(pred: np.ndarray, truth: np.ndarray) -> dict:
    out = {}
    for region, values in REGION_VALUES.items():
        p, t = np.isin(pred, values), np.isin(truth, values)
        total = int(p.sum()) + int(t.sum())
        out[region] = 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total
    return out


def _surface_points(mask: np.ndarray, spacing) -> np.ndarray:
    """Positions (mm) of the voxels of `mask` with a 6-neighbour outside it (numpy shifts, no scipy)."""
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for axis in range(3):
        for step in (1, -1):
            interior &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask & ~interior) * np.asarray(spacing, float)


def _brute_force_hd95(pred: np.ndarray, truth: np.ndarray, spacing) -> float:
    """medpy's HD95 (both directions pooled) from all pairwise surface distances; BraTS empty convention."""
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return HD95_ONE_EMPTY_BRATS
    a, b = _surface_points(pred, spacing), _surface_points(truth, spacing)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


class _Recording:
    """The 15-subset program, keeping each call's inputs and outputs (on the host)."""

    def __init__(self, program):
        self.program, self.calls = program, []

    @property
    def traces(self):
        return self.program.traces

    def __call__(self, models_state, image, labels, valid, case=None):
        out = self.program(models_state, image, labels, valid, case)
        self.calls.append(
            {"labels": np.asarray(labels), "case_shape": np.asarray(case["shape"]), "out": jax.device_get(out)}
        )
        return out


def test_dice_and_hd95_recomputed_in_numpy_equal_the_program_and_the_case_json(
    trained_run, phantom_cache, tmp_path, monkeypatch
):
    method, graphdefs, models, config = load_trained(trained_run)
    case_id = load_splits(trained_run, CacheDataset(phantom_cache))["test"][0]
    dataset = CacheDataset(phantom_cache, [case_id])
    shape = tuple(dataset.manifests[0]["cropped_shape"])
    cfg = dataclasses.replace(config.eval, bucket=(shape[0] + 8, shape[1], shape[2]))  # padding the program must ignore
    assert cfg.hd95_empty == "brats"
    recorded, make = [], program_module.make_case_program
    monkeypatch.setattr(
        program_module, "make_case_program", lambda *a: recorded.append(_Recording(make(*a))) or recorded[-1]
    )
    evaluate(method, graphdefs, models, dataset, cfg, tmp_path, predictions="none", progress=False)
    [program] = recorded
    [call] = program.calls
    counts, maps = call["out"]
    assert maps.shape == (15, *cfg.bucket) and tuple(call["case_shape"]) == shape
    truth = np.asarray(dataset.arrays(0)["label"])
    np.testing.assert_array_equal(call["labels"][: shape[0]], truth)
    assert not maps[:, shape[0] :].any()  # nothing predicted in the padding
    rows = json.loads((tmp_path / "cases" / f"{case_id}.json").read_text())["subsets"]
    assert [row["name"] for row in rows] == list(SUBSET_NAMES)
    program_dice = dice_from_counts(counts)
    spacing = canonical_spacing(dataset.manifests[0]["original_affine"])
    assert spacing == (1.0, 1.0, 1.0)  # the phantom's 1 mm voxels
    partial = 0
    for s, row in enumerate(rows):
        pred = maps[s, : shape[0], : shape[1], : shape[2]]  # only voxels inside the case count
        want = _numpy_dice(pred, truth)
        for r, region in enumerate(REGION_VALUES):
            assert program_dice[s, r] == pytest.approx(want[region], rel=1e-12, abs=1e-12), (SUBSET_NAMES[s], region)
            assert row["dice"][region] == pytest.approx(want[region], rel=1e-12, abs=1e-12), (SUBSET_NAMES[s], region)
            p, t = np.isin(pred, REGION_VALUES[region]), np.isin(truth, REGION_VALUES[region])
            assert row["hd95"][region] == pytest.approx(_brute_force_hd95(p, t, spacing), rel=1e-9), (
                SUBSET_NAMES[s],
                region,
            )
            partial += 0.0 < want[region] < 1.0
    assert partial >= 3 and len({m.tobytes() for m in maps}) > 1  # not vacuous: partial overlaps, subsets differ


# Source storage orders: source axis j runs along world axis AXES[j] (0 = x/R, 1 = y/A, 2 = z/S), in the
# direction SIGNS[j], with voxels of SIZES[j] mm. SPACING: the voxel size along world x, y, z, by hand.
STORAGES = {
    # axes stored (z, x, y) as I, L, A with 3, 1, 2 mm voxels
    "zxy": {"axes": (2, 0, 1), "signs": (-1, -1, 1), "sizes": (3.0, 1.0, 2.0), "spacing": (1.0, 2.0, 3.0)},
    # axes stored (y, z, x) as P, S, L with 2.5, 1.5, 0.5 mm voxels
    "yzx": {"axes": (1, 2, 0), "signs": (-1, 1, -1), "sizes": (2.5, 1.5, 0.5), "spacing": (0.5, 2.5, 1.5)},
    # axes stored (x, z, y) as R, I, P with 1.2, 3, 2 mm voxels
    "xzy": {"axes": (0, 2, 1), "signs": (1, -1, -1), "sizes": (1.2, 3.0, 2.0), "spacing": (1.2, 2.0, 3.0)},
}


def _affine(storage: dict, rotation_deg: float = 0.0) -> np.ndarray:
    affine = np.eye(4)
    for j, (axis, sign, size) in enumerate(zip(storage["axes"], storage["signs"], storage["sizes"])):
        affine[:3, j] = 0.0
        affine[axis, j] = sign * size
    c, s = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ affine[:3, :3]
    affine[:3, 3] = (12.0, -30.0, 7.5)
    return affine


def _to_source(canonical: np.ndarray, storage: dict) -> np.ndarray:
    """A RAS+ array stored the way `storage` says (by hand, not with nibabel's orientation code)."""
    source = canonical.transpose(storage["axes"])
    for j, sign in enumerate(storage["signs"]):
        if sign < 0:
            source = np.flip(source, axis=j)
    return np.ascontiguousarray(source)


@pytest.mark.parametrize("name,rotation", [("zxy", 0.0), ("yzx", 0.0), ("xzy", 0.0), ("zxy", 12.0), ("yzx", -20.0)])
def test_canonical_spacing_of_permuted_flipped_affines(name, rotation):
    storage = STORAGES[name]
    assert canonical_spacing(_affine(storage, rotation)) == pytest.approx(storage["spacing"], rel=1e-12)
    assert canonical_spacing(_affine(storage, rotation).tolist()) == pytest.approx(
        storage["spacing"], rel=1e-12
    )  # a manifest's list


@pytest.mark.parametrize("name", ["zxy", "yzx"])
def test_hd95_of_a_shift_along_each_physical_axis_uses_that_axis_spacing(name, tmp_path):
    """A case stored with permuted, flipped, anisotropic axes goes through prepare; a prediction shifted by
    two voxels along one RAS+ axis has HD95 = 2 x that physical axis' voxel size, for each axis."""
    storage = STORAGES[name]
    affine = _affine(storage)
    canonical_shape = (14, 12, 11)  # along world x, y, z
    truth = np.zeros(canonical_shape, np.uint8)
    truth[4:8, 3:7, 3:7] = 3  # enhancing tumour (internal label), so WT = TC = ET
    rng = np.random.default_rng(0)
    case = tmp_path / "raw" / "BraTS20_Training_001"
    for token in ("flair", "t1ce", "t1", "t2"):
        image = rng.integers(1, 100, canonical_shape)  # nonzero everywhere: the brain crop keeps the whole volume
        save(case / f"{case.name}_{token}.nii.gz", _to_source(image, storage), affine, np.int16)
    save(case / f"{case.name}_seg.nii.gz", _to_source(np.where(truth == 3, 4, truth), storage), affine, np.uint8)
    report = prepare_dataset(tmp_path / "raw", tmp_path / "cache", workers=1, progress=False)
    assert not report["errors"]
    dataset = CacheDataset(tmp_path / "cache")
    manifest, label = dataset.manifests[0], np.asarray(dataset.arrays(0)["label"])
    np.testing.assert_array_equal(label, truth)  # the cache holds the case in RAS+ as constructed by hand
    spacing = canonical_spacing(manifest["original_affine"])  # what `evaluate` passes to `hd95_table`
    for axis in range(3):
        shifted = np.roll(truth, 2, axis=axis)  # stays inside the volume (no wrap-around)
        assert shifted.sum() == truth.sum()
        table = hd95_table(np.repeat(shifted[None], 15, axis=0), label, spacing, "brats")
        np.testing.assert_allclose(table, 2 * storage["spacing"][axis], rtol=1e-12, err_msg=f"axis {axis}")
        # the pooled brute force on surface positions in mm agrees
        assert _brute_force_hd95(shifted > 0, truth > 0, storage["spacing"]) == pytest.approx(
            2 * storage["spacing"][axis]
        )
    # and the prediction writer puts a RAS+ label map back in the source storage, affine and convention
    write_prediction(label, manifest, tmp_path / "pred.nii.gz")
    written = nib.load(tmp_path / "pred.nii.gz")
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(written.dataobj), np.asarray(nib.load(case / f"{case.name}_seg.nii.gz").dataobj)
    )


# --- decoding, logit averaging and the centre crop (issue 25) ------------------------------------------


def test_argmax_decoding_differs_from_thresholds_where_rfnet_says():
    """A softmax voxel [0.40, 0.35, 0, 0.25] (background, NCR, ED, ET): WT = TC = 0.60 pass the
    thresholds (NCR), but the argmax over the four labels is background."""
    from jaxbrats.labels import BACKGROUND, region_probs_from_label_probs

    regions = region_probs_from_label_probs(jnp.asarray([[0.40, 0.35, 0.0, 0.25]]), xp=jnp)
    np.testing.assert_allclose(regions, [[0.60, 0.60, 0.25]], rtol=1e-6)
    assert int(segmentation.decode(regions, "threshold")[0]) == NECROSIS
    assert int(segmentation.decode(regions, "argmax")[0]) == BACKGROUND
    softmax = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (500, 4)), axis=-1)
    np.testing.assert_array_equal(
        segmentation.decode(region_probs_from_label_probs(softmax, xp=jnp), "argmax"), np.argmax(softmax, axis=-1)
    )  # exact for a softmax network


class _WindowDependent:
    """A stand-in method whose outputs depend on the window (x - the window's mean), so averaging
    probabilities and averaging logits give different labels."""

    decoding = "threshold"

    def fill(self, models, image, mask, case):
        return image

    def predict(self, models, window, mask, subset):
        x = window[..., :1]
        logits = 3.0 * (x - jnp.mean(x, axis=(1, 2, 3), keepdims=True)) + jnp.asarray([0.5, 0.0, -0.5])
        return jax.nn.sigmoid(logits)


def test_logit_averaging_blends_the_windows_logits():
    from jaxbrats.config import EvalConfig
    from jaxbrats.inference.windows import window_starts
    from jaxbrats.labels import labels_from_regions

    rng = np.random.default_rng(3)  # blocks of 4^3 with strong offsets: window means differ a lot
    image = np.kron(4.0 * rng.normal(size=(3, 3, 3, 1)), np.ones((4, 4, 4, 4))) + rng.normal(size=(12, 12, 12, 4))
    image = image.astype(np.float32)
    cfg = EvalConfig(window=(8, 8, 8), overlap=0.5, blend="uniform")
    total, count = np.zeros((12, 12, 12, 3)), np.zeros((12, 12, 12, 1))
    for start in window_starts((12, 12, 12), (8, 8, 8), 0.5):  # numpy: the mean of each voxel's logits
        box = tuple(slice(s, s + 8) for s in start)
        x = image[box][..., :1].astype(np.float64)
        total[box] += 3.0 * (x - x.mean()) + np.asarray([0.5, 0.0, -0.5])
        count[box] += 1
    expected = labels_from_regions(total / count > 0)
    method, mask = _WindowDependent(), jnp.ones((4,), bool)
    by_logits = segmentation.segment(method, {}, jnp.asarray(image), mask, dataclasses.replace(cfg, average="logits"))
    by_probs = segmentation.segment(method, {}, jnp.asarray(image), mask, cfg)
    np.testing.assert_array_equal(by_logits, expected)
    assert (np.asarray(by_probs) != expected).any()  # the two averages do differ here


def test_center_crop_view_cuts_the_source_grid_centre_out_of_the_brain_box():
    manifest = {
        "case_id": "c",
        "original_shape": [240, 240, 155],
        "original_affine": np.eye(4).tolist(),
        "crop_box": [[30, 200], [10, 230], [0, 150]],
        "cropped_shape": [170, 220, 150],
    }
    narrowed, view = program_module.center_crop_view(manifest, (160, 192, 128))
    # centre crop [40, 200) x [24, 216) x [13, 141) of the volume, within the box
    assert narrowed["crop_box"] == [[40, 200], [24, 216], [13, 141]]
    assert narrowed["cropped_shape"] == [160, 192, 128]
    assert view == (slice(10, 170), slice(14, 206), slice(13, 141))
    assert program_module.center_crop_view(manifest, ()) == (manifest, (slice(None),) * 3)
    with pytest.raises(JaxbratsError, match="case c: its brain box .* lies outside eval.center_crop"):
        program_module.center_crop_view({**manifest, "crop_box": [[0, 20], [0, 240], [0, 155]]}, (160, 192, 128))


def test_evaluate_with_a_center_crop_scores_and_writes_only_the_crop(trained_run, phantom_cache, tmp_path):
    method, graphdefs, models, config = load_trained(trained_run)
    ids = load_splits(trained_run, CacheDataset(phantom_cache))["test"][:1]
    dataset = CacheDataset(phantom_cache, ids)
    manifest = dataset.manifests[0]
    full = np.asarray(manifest["original_shape"])
    crop = tuple(int(s) - 8 for s in full)
    cfg = dataclasses.replace(config.eval, center_crop=crop)
    evaluate(method, graphdefs, models, dataset, cfg, tmp_path, progress=False)
    settings = json.loads((tmp_path / "eval_settings.json").read_text())
    assert settings["decoding"] == "threshold" and settings["eval"]["center_crop"] == list(crop)
    written = np.asarray(nib.load(tmp_path / "predictions" / f"{ids[0]}.nii.gz").dataobj)
    assert written.shape == tuple(full)
    inside = np.zeros(written.shape, bool)
    inside[4:-4, 4:-4, 4:-4] = True  # the phantom is stored RAS+ (identity axes)
    assert not written[~inside].any() and written[inside].any()


def test_auto_decoding_is_each_methods_own_and_a_setting_overrides_it():
    from jaxbrats.config import EvalConfig
    from jaxbrats.methods import get_method, load_config

    regions = get_method("baseline")(load_config(None, []))
    labels = get_method("baseline")(load_config(None, ["method.output='labels'"]))
    acdis = get_method("acdis")(load_config(None, ["method.name='acdis'"]))
    assert segmentation.decoding_of(regions, EvalConfig()) == "threshold"
    assert segmentation.decoding_of(labels, EvalConfig()) == "argmax"  # a softmax network's own
    assert segmentation.decoding_of(acdis, EvalConfig()) == "argmax"  # RFNet's evaluation, which ACDIS follows
    assert segmentation.decoding_of(acdis, EvalConfig(decoding="threshold")) == "threshold"
    mind_the_gap = get_method("mind_the_gap")(load_config(None, ["method.name='mind_the_gap'"]))
    assert segmentation.decoding_of(mind_the_gap, EvalConfig()) == "argmax"  # softmax teacher and students
