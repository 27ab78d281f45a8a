"""M3AE: masking, the substitute image's frame, gradients, losses, both stages through the engine."""

import json
import shutil

import jax
import jax.numpy as jnp
import matplotlib.image
import nibabel as nib
import numpy as np
import optax
import pytest
from conftest import m3ae_config
from flax import nnx

from jaxbrats import engine
from jaxbrats.config import ConfigError
from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.transforms import place_centred
from jaxbrats.errors import JaxbratsError
from jaxbrats.evaluation.program import evaluate
from jaxbrats.inference.segment import case_locator
from jaxbrats.inference.trained import load_trained
from jaxbrats.losses import masked_mse
from jaxbrats.methods import get_method
from jaxbrats.methods.m3ae import mean_image, substitute_penalty
from jaxbrats.modalities import SUBSETS

#: The phantom config shrunk to the test phantom (tests/conftest.py's `M3AE_TINY`).
tiny = m3ae_config
#: The fewest levels M3AE's deep supervision takes, for the tests that build programs of their own
#: (those of `m3ae_run`, shared with tests/test_predict.py, keep its four): a quarter less to trace.
THREE_LEVELS = ("model.widths=[8,8,8]", "model.blocks=[1,1,1]")


def batch_of(case_shape, crop=(16, 16, 16), b=2, k=1, seed=0):
    rng = np.random.default_rng(seed)
    masks = rng.random((b, k, 4)) < 0.6
    masks[..., 0] = True
    return {
        "image": jnp.asarray(rng.normal(size=(b, *crop, 4)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 4, (b, *crop)), jnp.uint8),
        "valid": jnp.ones((b, *crop), bool),
        "present": jnp.ones((b, 4), bool),
        "modality_mask": jnp.asarray(masks),
        "crop_start": jnp.asarray(rng.integers(-4, 12, (b, 3)), jnp.int32),
        "flipped": jnp.asarray(rng.random((b, 3)) < 0.5),
        "case_shape": jnp.asarray(np.tile(case_shape, (b, 1)), jnp.int32),
        "box_start": jnp.asarray(rng.integers(0, 6, (b, 3)), jnp.int32),
    }


def models_of(method, stage, seed=0):
    return method.init_models(stage, nnx.Rngs(seed))


@pytest.fixture(scope="module")
def method():
    return get_method("m3ae")(tiny())


@pytest.fixture(scope="module")
def pretrain_models(method):
    """`method`'s pretraining models, made once: the tests below only read them."""
    return models_of(method, "pretrain")


@pytest.fixture(scope="module")
def with_frame(method, pretrain_models):
    """frame -> (method, pretraining models) with x_sub in that frame, each made once."""
    made = {method.options.substitute_frame: (method, pretrain_models)}

    def get(frame):
        if frame not in made:
            other = get_method("m3ae")(tiny(f"method.substitute_frame='{frame}'"))
            made[frame] = other, models_of(other, "pretrain")
        return made[frame]

    return get


# --- masking and the substitute image's frame --------------------------------------------


def test_exactly_the_mask_ratio_of_patches_is_hidden_on_the_patch_grid(method):
    masks = jnp.asarray([[1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 0, 1]], bool)
    keep = np.asarray(method.visible(jax.random.PRNGKey(3), masks, (16, 16, 16)))
    patches = keep.reshape(3, 2, 8, 2, 8, 2, 8, 4)
    # constant inside each 8^3 patch
    assert (patches == patches[:, :, :1, :, :1, :, :1, :]).all()
    grid = patches[:, :, 0, :, 0, :, 0, :]
    total = 2 * 2 * 2 * 4
    for i, m in enumerate(np.asarray(masks)):
        assert grid[i].sum() == round(0.125 * total)  # 4 of 32 patches visible, 87.5 % hidden
        assert not grid[i][..., ~m].any()  # none in a dropped modality


def test_without_patch_masking_only_whole_modalities_are_hidden():
    method = get_method("m3ae")(tiny("method.patch_masking=false"))
    masks = jnp.asarray([[1, 0, 1, 0]], bool)
    keep = np.asarray(method.visible(jax.random.PRNGKey(0), masks, (16, 16, 16)))
    assert keep[..., [0, 2]].all() and not keep[..., [1, 3]].any()


def test_patch_size_must_tile_the_crop():
    with pytest.raises(ConfigError, match="method.patch_size: crop"):
        tiny("method.patch_size=5")


def numpy_window(x_sub, start, flipped, size):
    """Reference: voxel by voxel, zeros outside x_sub, then the crop's flips."""
    out = np.zeros(tuple(size) + (x_sub.shape[-1],), x_sub.dtype)
    for i in range(size[0]):
        for j in range(size[1]):
            for k in range(size[2]):
                p = np.asarray(start) + (i, j, k)
                if (p >= 0).all() and (p < x_sub.shape[:3]).all():
                    out[i, j, k] = x_sub[tuple(p)]
    for axis in range(3):
        if flipped[axis]:
            out = np.flip(out, axis)
    return out


@pytest.mark.parametrize("frame", ["template", "centred"])
def test_training_fill_reads_x_sub_where_the_crop_came_from(frame, with_frame):
    method, models = with_frame(frame)
    x_sub = np.asarray(models["x_sub"].image[...])
    case_shape = np.asarray([20, 18, 22])
    batch = batch_of(case_shape)
    read = np.asarray(method.substitute(models, batch))
    for b in range(2):
        # template: the case's corner in its source grid; centred: the case centred in x_sub
        origin = (
            np.asarray(batch["box_start"][b])
            if frame == "template"
            else (np.asarray(x_sub.shape[:3]) - case_shape) // 2
        )
        expected = numpy_window(
            x_sub, np.asarray(batch["crop_start"][b]) + origin, np.asarray(batch["flipped"][b]), (16, 16, 16)
        )
        np.testing.assert_array_equal(read[b], expected)


def test_two_cases_with_different_crop_boxes_read_one_x_sub_voxel_at_one_source_coordinate(method, pretrain_models):
    """BraTS cases share one atlas grid: the same source voxel must read the same x_sub voxel in every case."""
    models = pretrain_models
    batch = batch_of([20, 18, 22])
    batch["box_start"] = jnp.asarray([[1, 5, 2], [4, 0, 6]], jnp.int32)  # two brain boxes in the source grid
    batch["crop_start"] = jnp.asarray([[3, -2, 5], [0, 3, 1]], jnp.int32)  # both crops start at source voxel (4, 3, 7)
    batch["flipped"] = jnp.zeros((2, 3), bool)
    read = np.asarray(method.substitute(models, batch))
    np.testing.assert_array_equal(read[0], read[1])
    np.testing.assert_array_equal(read[0][0, 0, 0], np.asarray(models["x_sub"].image[...])[4, 3, 7])


@pytest.mark.parametrize("frame", ["template", "centred"])
def test_inference_fill_uses_the_training_frame(frame, with_frame):
    """The whole case filled at inference, cropped where a training crop was, equals the training fill."""
    method, models = with_frame(frame)
    case_shape = np.asarray([20, 18, 22])
    bucket = (24, 24, 24)  # evaluation pads at the end
    image = jnp.asarray(np.random.default_rng(1).normal(size=bucket + (4,)), jnp.float32)
    keep = jnp.asarray([True, False, True, False])
    box = np.asarray([3, 1, 0])
    filled = np.asarray(method.fill(models, image, keep, case_locator(case_shape, box)))
    np.testing.assert_array_equal(filled[..., [0, 2]], np.asarray(image)[..., [0, 2]])
    batch = batch_of(case_shape, b=1)
    batch["box_start"] = jnp.asarray([box], jnp.int32)
    batch["crop_start"] = jnp.asarray([[2, 1, 3]], jnp.int32)
    batch["flipped"] = jnp.zeros((1, 3), bool)
    crop = np.asarray(method.substitute(models, batch))[0]
    np.testing.assert_array_equal(filled[2:18, 1:17, 3:19][..., [1, 3]], crop[..., [1, 3]])


def test_zero_fill_has_no_substitute():
    method = get_method("m3ae")(tiny("method.fill='zero'", "stages.pretrain.optimizers.model.model_lr={}"))
    models = models_of(method, "finetune")
    assert "x_sub" not in models
    image = jnp.ones((16, 16, 16, 4))
    filled = method.fill(models, image, jnp.asarray([True, False, False, True]), case_locator((16, 16, 16), (0, 0, 0)))
    np.testing.assert_array_equal(np.asarray(filled)[0, 0, 0], [1, 0, 0, 1])


def test_model_lr_for_an_untrained_x_sub_is_refused():
    method = get_method("m3ae")(tiny("method.fill='zero'"))
    with pytest.raises(ConfigError, match="model_lr: x_sub not trained"):
        engine.stage_optimizers(method, "pretrain", 10)


class TwoCases:
    """A dataset stand-in: a 2^3 case with every modality and a 4x2x2 case without T1."""

    def __init__(self):
        self.manifests = [
            {"present": [True, True, True, True], "crop_box": [[2, 4], [0, 2], [1, 3]]},
            {"present": [True, True, False, True], "crop_box": [[0, 4], [1, 3], [1, 3]]},
        ]
        self.images = [np.full((2, 2, 2, 4), 2.0, np.float32), np.full((4, 2, 2, 4), 4.0, np.float32)]

    def __len__(self):
        return 2

    def arrays(self, i):
        return {"image": self.images[i]}


def test_mean_image_places_each_case_at_its_source_box_and_averages_present_modalities():
    mean = mean_image(TwoCases(), (4, 4, 4), "template")
    # the 2^3 case sits at [2:4, 0:2, 1:3], the 4x2x2 one at [0:4, 1:3, 1:3]
    both = (slice(2, 4), slice(1, 2), slice(1, 3))
    np.testing.assert_array_equal(mean[both][..., [0, 1, 3]], 3.0)  # (2 + 4) / 2
    np.testing.assert_array_equal(mean[both][..., 2], 2.0)  # T1: only the first case has it
    np.testing.assert_array_equal(mean[0:2, 1:3, 1:3][..., [0, 1, 3]], 2.0)  # only the second case reaches here
    np.testing.assert_array_equal(mean[2:4, 0, 1:3][..., [0, 1, 3]], 1.0)  # only the first: 2 over the 2 cases with it
    np.testing.assert_array_equal(mean[2:4, 0, 1:3][..., 2], 2.0)
    assert mean[:, 3].sum() == 0 and mean[:, :, 0].sum() == 0


def test_mean_image_centres_each_case_and_averages_present_modalities():
    mean = mean_image(TwoCases(), (4, 4, 4), "centred")
    # the 2^3 case sits at [1:3]^3, the 4x2x2 one at [0:4, 1:3, 1:3]
    inner = (slice(1, 3), slice(1, 3), slice(1, 3))
    np.testing.assert_array_equal(mean[inner][..., [0, 1, 3]], 3.0)  # (2 + 4) / 2
    np.testing.assert_array_equal(mean[inner][..., 2], 2.0)  # T1: only the first case has it
    np.testing.assert_array_equal(mean[0, 1:3, 1:3][..., [0, 1, 3]], 2.0)  # only the second case reaches here
    assert mean[:, 0].sum() == 0 and mean[:, :, 3].sum() == 0


def test_place_centred_pads_or_crops_each_axis():
    case = np.arange(2 * 3 * 4 * 1, dtype=np.float32).reshape(2, 3, 4, 1)
    placed = place_centred(case, (4, 3, 2))  # one axis larger, one equal, one smaller
    np.testing.assert_array_equal(placed[1:3, :, :, 0], case[:, :, 1:3, 0])
    assert placed[0].sum() == 0 and placed[3].sum() == 0


# --- losses against numpy ------------------------------------------------------------------


def test_losses_against_numpy():
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=(2, 4, 4, 4, 4)), rng.normal(size=(2, 4, 4, 4, 4))
    w = rng.random((2, 4, 4, 4, 1)) < 0.5
    wb = np.broadcast_to(w, p.shape)
    np.testing.assert_allclose(
        masked_mse(jnp.asarray(p), jnp.asarray(t), jnp.asarray(w)), ((p - t) ** 2)[wb].mean(), rtol=1e-5
    )
    x = rng.normal(size=(5, 6, 7, 4)) + np.arange(4)
    np.testing.assert_allclose(substitute_penalty(jnp.asarray(x), "mean_square"), (x**2).mean(), rtol=1e-5)
    centred = x - x.reshape(-1, 4).mean(0)
    np.testing.assert_allclose(
        substitute_penalty(jnp.asarray(x), "centered_norm"), np.sqrt((centred**2).sum()), rtol=1e-5
    )


@pytest.mark.parametrize("feature", ["bottleneck", "deep_quarter"])
def test_consistency_is_zero_for_identical_instantiations_only(feature):
    method = get_method("m3ae")(tiny(f"method.consistency_feature='{feature}'", *THREE_LEVELS))
    models = models_of(method, "finetune")
    batch = batch_of([20, 18, 22], b=1, k=2)
    same = dict(batch, modality_mask=jnp.asarray([[[1, 0, 1, 0], [1, 0, 1, 0]]], bool))
    _, parts = method.finetune_loss(models, same, jax.random.PRNGKey(0))
    assert float(parts["consistency"]) == 0.0
    other = dict(batch, modality_mask=jnp.asarray([[[1, 0, 1, 0], [0, 1, 0, 0]]], bool))
    _, parts = method.finetune_loss(models, other, jax.random.PRNGKey(0))
    assert float(parts["consistency"]) > 0.0


# --- gradients -------------------------------------------------------------------------------


def one_step(method, stage, batch):
    optimizers = {"model": optax.adam(1e-2)}
    graphdefs, state = engine.init_state(method, stage, 0, optimizers)
    new, metrics = jax.jit(engine.make_train_step(method, stage, graphdefs, optimizers))(state, batch)
    return state["models"], new["models"], metrics


def changed(before, after):
    return any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_x_sub_learns_in_pretraining_and_is_frozen_in_finetuning():
    # Only the reconstruction can move x_sub.
    method = get_method("m3ae")(tiny("method.substitute_weight=0.0", *THREE_LEVELS))
    batch = batch_of([20, 18, 22], k=2)
    before, after, metrics = one_step(method, "pretrain", dict(batch, modality_mask=batch["modality_mask"][:, :1]))
    assert changed(before["x_sub"], after["x_sub"]) and changed(before["unet"], after["unet"])
    assert float(metrics["visible_fraction"]) == pytest.approx(0.125)
    before, after, _ = one_step(method, "finetune", batch)
    assert not changed(before["x_sub"], after["x_sub"]) and changed(before["unet"], after["unet"])


# --- both stages through the engine ------------------------------------------------------------


def restored_models(workdir, stage):
    _, _, models, _ = load_trained(workdir, stage=stage)
    return models


def test_both_stages_run_and_hand_over(m3ae_run):
    workdir, trainer = m3ae_run
    assert [(s, n) for s, n, _ in trainer.losses] == [("pretrain", 1), ("pretrain", 2), ("pretrain", 3)] + [
        ("finetune", n) for n in range(1, 5)
    ]
    assert {stage: sum(n.values()) for stage, n in trainer.compilations.items()} == {"pretrain": 1, "finetune": 1}
    pretrain, finetune = restored_models(workdir, "pretrain"), restored_models(workdir, "finetune")
    np.testing.assert_array_equal(pretrain["x_sub"]["image"][...], finetune["x_sub"]["image"][...])  # carried, frozen
    assert pretrain["unet"]["decoder"]["head"]["kernel"][...].shape[-1] == 4  # regression head
    assert finetune["unet"]["decoder"]["head"]["kernel"][...].shape[-1] == 3  # fresh segmentation head
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"mse", "x_sub_penalty"} <= set(next(r for r in rows if r["stage"] == "pretrain" and "loss" in r))
    assert {"seg_loss", "consistency"} <= set(next(r for r in rows if r["stage"] == "finetune" and "loss" in r))


def test_eval_refuses_the_pretraining_stage_in_one_line(m3ae_run, phantom_cache, tmp_path, capsys):
    from jaxbrats.cli import main

    workdir, _ = m3ae_run
    assert (
        main(
            [
                "eval",
                "--workdir",
                str(workdir),
                "--data",
                str(phantom_cache),
                "--out",
                str(tmp_path / "e"),
                "--stage",
                "pretrain",
            ]
        )
        == 1
    )
    assert capsys.readouterr().err.strip().splitlines() == [
        "jaxbrats: error: --stage pretrain: the models of stage pretrain of m3ae do not segment"
    ]
    assert not (tmp_path / "e").exists()


def test_x_sub_is_saved_as_nifti_and_png(m3ae_run):
    workdir, _ = m3ae_run
    saved = nib.load(workdir / "substitute" / "x_sub.nii.gz").get_fdata()
    np.testing.assert_allclose(saved, restored_models(workdir, "pretrain")["x_sub"]["image"][...], rtol=1e-6)
    png = matplotlib.image.imread(workdir / "substitute" / "x_sub.png")
    assert png.shape == (960, 750, 4)  # 7.5 x 9.6 inches at 100 dpi: a row of three slices per modality
    rgb = png[..., :3]
    grey = (rgb.max(-1) == rgb.min(-1)) & (rgb.min(-1) < 0.99)  # the grey-scale slices, not the white page
    assert grey.mean() > 0.3, grey.mean()  # twelve slices fill most of the figure
    assert rgb[grey, 0].std() > 0.1  # and show x_sub's range from dark to bright, not one flat colour


def finetuning_start(method, workdir, like: dict) -> dict:
    """The models fine-tuning started from: the pretrained U-Net and x_sub with a fresh segmentation head."""
    fresh = engine.init_state(method, "finetune", 0, {"model": optax.adam(1e-3)})[1]["models"]
    started = method.carry("finetune", fresh, restored_models(workdir, "pretrain"))
    return {name: started[name] for name in like}


def test_the_15_subset_table_comes_from_the_finetuned_model(m3ae_run, phantom_cache, tmp_path):
    """Evaluated in one program; with the checkpoint's models replaced by those fine-tuning started
    from, the table changes."""
    workdir, _ = m3ae_run
    method, graphdefs, models, config = load_trained(workdir)
    assert models["unet"]["decoder"]["head"]["kernel"][...].shape[-1] == 3
    test = CacheDataset(phantom_cache, engine.load_splits(workdir, CacheDataset(phantom_cache))["test"])

    def table(models, out):
        summary = evaluate(method, graphdefs, models, test, config.eval, out, predictions="none", progress=False)
        return [[row["dice"][r] for r in ("WT", "TC", "ET")] for row in summary["subsets"]]

    finetuned = table(models, tmp_path / "finetuned")
    assert len(finetuned) == len(SUBSETS) == 15
    settings = json.loads((tmp_path / "finetuned" / "eval_settings.json").read_text())
    assert settings["compilations"] + settings["loaded_from_cache"] == 1
    assert (tmp_path / "finetuned" / "summary.md").read_text().count("\n|") >= 16
    assert table(finetuning_start(method, workdir, models), tmp_path / "start") != finetuned


def test_resume_mid_pretraining_and_mid_finetuning_is_bit_for_bit(m3ae_run, phantom_cache, tmp_path):
    """Pretraining draws its patch masks from the step's key: a resume must replay the same masks.

    The run resumed is a copy of the uninterrupted one left with its checkpoints at pretraining
    step 2 (of 3) and fine-tuning step 2 (of 4), each the one a run stopped there writes (the same
    save); one call resumes pretraining at step 2, then fine-tuning at its step 2, without training
    the first halves again (stopping itself is tests/test_engine.py's)."""
    from test_engine import assert_bitwise_equal, final_state, logged_steps

    whole_dir, whole = m3ae_run
    workdir = tmp_path / "run"
    shutil.copytree(whole_dir, workdir)
    shutil.rmtree(workdir / "checkpoints" / "pretrain" / "3")
    shutil.rmtree(workdir / "checkpoints" / "finetune" / "4")
    rest = engine.train(tiny(), workdir, phantom_cache)
    assert [(s, n) for s, n, _ in rest.losses] == [("pretrain", 3), ("finetune", 3), ("finetune", 4)]
    for stage in ("pretrain", "finetune"):
        assert_bitwise_equal(final_state(workdir, tiny(), stage), final_state(whole_dir, tiny(), stage))
    assert logged_steps(workdir) == logged_steps(whole_dir) == {"pretrain": [1, 2, 3], "finetune": [1, 2, 3, 4]}
    assert [loss for *_, loss in rest.losses] == [loss for *_, loss in whole.losses[2:3] + whole.losses[-2:]]


@pytest.mark.parametrize("pretrained_unet", [True, False])
def test_ablation_a_finetunes_a_fresh_unet_with_the_pretrained_x_sub(m3ae_run, pretrained_unet):
    workdir, _ = m3ae_run
    method = get_method("m3ae")(tiny(f"method.pretrained_unet={str(pretrained_unet).lower()}"))
    pretrained = restored_models(workdir, "pretrain")
    fresh = engine.init_state(method, "finetune", 7, {"model": optax.adam(1e-3)})[1]["models"]
    started = method.carry("finetune", fresh, pretrained)
    np.testing.assert_array_equal(
        started["x_sub"]["image"][...], pretrained["x_sub"]["image"][...]
    )  # always the learned x_sub
    stem = ("encoder", "stem", "kernel")
    kernel = lambda models: np.asarray(models["unet"][stem[0]][stem[1]][stem[2]][...])  # noqa: E731
    want = pretrained if pretrained_unet else fresh
    np.testing.assert_array_equal(kernel(started), kernel(want))
    assert not np.array_equal(kernel(pretrained), kernel(fresh))


def test_one_stage_from_a_given_checkpoint(m3ae_run, phantom_cache, tmp_path):
    source, _ = m3ae_run
    with pytest.raises(JaxbratsError, match="stage finetune starts from stage pretrain"):
        engine.train(tiny(), tmp_path / "alone", phantom_cache, only=("finetune",))
    config = tiny(f"stages.finetune.init_from='{source / 'checkpoints' / 'pretrain'}'")
    trainer = engine.train(config, tmp_path / "from", phantom_cache, only=("finetune",))
    assert [s for s, _, _ in trainer.losses] == ["finetune"] * 4
    assert not (tmp_path / "from" / "checkpoints" / "pretrain").exists()
    np.testing.assert_array_equal(
        restored_models(tmp_path / "from", "finetune")["x_sub"]["image"][...],
        restored_models(source, "pretrain")["x_sub"]["image"][...],
    )
    with pytest.raises(JaxbratsError, match="--stage warmup: not a stage of m3ae"):
        engine.train(tiny(), tmp_path / "bad", phantom_cache, only=("warmup",))


@pytest.mark.slow  # `--stage` is also covered by test_one_stage_from_a_given_checkpoint
def test_stages_one_at_a_time_in_one_workdir(phantom_cache, tmp_path):
    engine.train(tiny(), tmp_path, phantom_cache, stop_after=2, only=("pretrain",))
    with pytest.raises(JaxbratsError, match="stage pretrain stopped at step 2 of 3"):
        engine.train(tiny(), tmp_path, phantom_cache, only=("finetune",))
    first = engine.train(tiny(), tmp_path, phantom_cache, only=("pretrain",))
    assert [(s, n) for s, n, _ in first.losses] == [("pretrain", 3)] and not (
        tmp_path / "checkpoints" / "finetune"
    ).exists()
    assert (tmp_path / "substitute" / "x_sub.png").exists()
    second = engine.train(tiny(), tmp_path, phantom_cache, only=("finetune",))
    assert [s for s, _, _ in second.losses] == ["finetune"] * 4
    shutil.rmtree(tmp_path / "checkpoints" / "finetune")
    with pytest.raises(JaxbratsError, match="no checkpoint of a stage that segments"):
        load_trained(tmp_path)


def test_grad_norms_of_a_term_of_another_stage_are_noted_not_refused():
    """`train.grad_norms = ["consistency"]`: fine-tuning's term; pretraining logs no such term, and
    is not refused for it (a one-stage method's unknown term is: tests/test_rirn.py)."""
    from jaxbrats import engine

    m = get_method("m3ae")(tiny("train.grad_norms=['consistency']", *THREE_LEVELS))
    for stage, batch in (("pretrain", batch_of((24, 24, 24))), ("finetune", batch_of((24, 24, 24), b=1, k=2))):
        optimizers = engine.stage_optimizers(m, stage, 10)
        graphdefs, state = engine.abstract_state(m, stage, optimizers)
        step = engine.make_train_step(m, stage, graphdefs, optimizers)
        _, metrics = jax.eval_shape(step, state, batch)
        assert ("grad_norm/consistency" in metrics) == (stage == "finetune")
        assert ("not a loss term of stage pretrain" in step.unlogged) == (stage == "pretrain")
