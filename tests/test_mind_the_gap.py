"""Mind the Gap: per-modality encoders mapped over the modality axis = separate encoders, the
teacher's objective (eq. 7), the teacher's checkpoint handed over to frozen-teacher students,
exact resume in each stage, one compilation per stage and for each evaluation.

The anchors and KD losses themselves are checked against numpy in test_alignment_losses.py and
test_distillation_losses.py.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import TINY
from flax import nnx
from helpers import assert_resume_is_bit_for_bit, synthetic_batch

from jaxbrats import engine
from jaxbrats.config import ConfigError
from jaxbrats.data.cache import CacheDataset
from jaxbrats.errors import JaxbratsError
from jaxbrats.evaluation import evaluate
from jaxbrats.losses import label_loss
from jaxbrats.methods import get_method, load_config
from jaxbrats.modalities import MODALITIES, SUBSET_NAMES, subset_index
from jaxbrats.networks import family
from jaxbrats.networks.latent_encoder import LatentEncoder, encode_modalities

#: A 3-level 8-channel U-Net, 8-channel latents, two students, a few steps per stage.
MTG = [s for s in TINY if not s.startswith("stages.train")] + [
    "method.name='mind_the_gap'", "model.widths=[8,8,8]", "model.blocks=[1,1,1]", "method.students=['t1ce','flair']",
    "stages.teacher.steps=2", "stages.students.steps=2",
    "stages.teacher.optimizers.teacher.lr=3e-3", "stages.students.optimizers.students.lr=3e-3",
]


def mtg_config(*extra):
    return load_config(None, MTG + list(extra))


def mtg(*extra):
    return get_method("mind_the_gap")(mtg_config(*extra))


# --- encoders ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["vmap", "unroll"])
def test_per_modality_encoders_equal_separate_encoders(how):
    method = mtg()
    encoders = method.init_models("teacher", nnx.Rngs(0))["encoders"]
    assert family.size(encoders) == len(MODALITIES)
    image = jnp.asarray(synthetic_batch(0)["image"])
    stacked = jax.jit(lambda img: encode_modalities(encoders, img, shared=False, how=how)["latent"])(image)
    for j in range(len(MODALITIES)):
        alone = family.member(encoders, j)(image[..., j:j + 1])["latent"]
        np.testing.assert_allclose(stacked[j], alone, rtol=1e-5, atol=1e-5)
    # member j is the encoder made from its own key: equal to one built alone
    root = jax.random.split(nnx.Rngs(0).params(), 4)[0]
    own = LatentEncoder(method.encoder_config(), nnx.Rngs(jax.random.fold_in(root, 2)))
    np.testing.assert_array_equal(nnx.state(own)["stem"]["kernel"][...], nnx.state(encoders)["stem"]["kernel"][...][2])


def test_a_shared_encoder_folds_the_modalities_into_the_batch():
    method = mtg("method.shared_encoder=true")
    encoder = method.init_models("teacher", nnx.Rngs(0))["encoders"]
    assert "encoders" not in method.families("teacher")
    image = jnp.asarray(synthetic_batch(1)["image"])
    latents = encode_modalities(encoder, image, shared=True)["latent"]
    for j in range(len(MODALITIES)):
        np.testing.assert_allclose(latents[j], encoder(image[..., j:j + 1])["latent"], rtol=1e-5, atol=1e-5)


# --- the teacher -------------------------------------------------------------------------------------

def test_the_teacher_loss_is_eq7_summed_over_modalities():
    method = mtg("method.anchor='modality'")
    models = method.init_models("teacher", nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, synthetic_batch(2))

    @jax.jit
    def both(batch):  # the method's loss, and eq. 7 written out modality by modality
        latents = method.encode(models, batch["image"])["latent"]
        seg = [label_loss(models["predictor"](latents[j])["logits"], batch["label"], batch["valid"])[0]
               for j in range(len(MODALITIES))]
        align = [jnp.mean(jnp.square(latents[j] - latents[1])) for j in range(len(MODALITIES))]  # T1ce is k
        return method.teacher_loss(models, batch, jax.random.PRNGKey(0)), sum(seg), sum(align)

    (loss, parts), seg, align = both(batch)
    seg, align = float(seg), float(align)
    np.testing.assert_allclose(float(parts["seg"]), seg, rtol=1e-4)
    np.testing.assert_allclose(float(parts["align"]), align, rtol=1e-4)
    np.testing.assert_allclose(float(loss), seg + align, rtol=1e-4)
    assert float(parts["align/t1ce"]) == 0.0


def test_the_teacher_predicts_from_the_present_latents_only():
    method = mtg()
    method.serve("teacher")
    models = method.init_models("teacher", nnx.Rngs(0))
    image = jnp.asarray(synthetic_batch(3)["image"])
    mask = jnp.asarray([True, True, False, False])  # FLAIR and T1ce
    predict = jax.jit(lambda img: method.predict(models, img, mask))
    before = predict(image)
    np.testing.assert_array_equal(predict(image.at[..., 2:].add(7.0)), before)  # T1, T2 change nothing
    assert float(jnp.abs(predict(image.at[..., 0].add(7.0)) - before).max()) > 1e-4
    # the combination is the mean of the present latents
    latents = method.encode(models, image)["mean"]
    expected = models["predictor"](jnp.mean(latents[:2], axis=0))["logits"]
    np.testing.assert_allclose(method.teacher_output(models, latents, mask)["logits"], expected, rtol=1e-5, atol=1e-5)
    assert method.served_subsets() == tuple(range(15))


@pytest.mark.parametrize("anchor", ["none", "normal", "mix"])
def test_every_anchor_trains(anchor):
    method = mtg(f"method.anchor='{anchor}'")
    models = method.init_models("teacher", nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, synthetic_batch(4))
    loss, parts = jax.jit(lambda b: method.teacher_loss(models, b, jax.random.PRNGKey(1)))(batch)
    assert np.isfinite(float(loss))
    if anchor == "none":
        assert float(parts["align"]) == 0.0
    else:
        assert float(parts["align"]) > 0.0
    if anchor == "mix":
        weights = [float(parts[f"w/{m}"]) for m in MODALITIES]
        np.testing.assert_allclose(sum(weights), 4.0, rtol=1e-5)
        assert "mix" in method.updates("teacher")[0].trainable  # learned with the teacher, not frozen
    if anchor == "normal":
        assert models["encoders"].head.kernel.shape[-1] == 2 * method.latent_channels  # mean + log variance


# --- the students ---------------------------------------------------------------------------------------

def test_a_student_sees_only_its_subset_and_the_teacher_gets_no_gradient():
    method = mtg("method.kd='kdnet'")
    models = method.init_models("students", nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, synthetic_batch(5))
    context = {"step": jnp.asarray(0)}
    per_student = jax.jit(lambda b: method.students_loss(models, b, jax.random.PRNGKey(0), context)[1])
    before = per_student(batch)
    t1 = per_student({**batch, "image": batch["image"].at[..., 2].add(3.0)})  # T1: neither student, but the teacher
    for name in ("t1ce", "flair"):
        np.testing.assert_allclose(t1[f"{name}/seg"], before[f"{name}/seg"], rtol=1e-6)
        assert abs(float(t1[f"{name}/kd"]) - float(before[f"{name}/kd"])) > 1e-7  # the teacher saw it
    graphdef, predictor = nnx.split(models["predictor"])

    def loss(state):
        return method.students_loss({**models, "predictor": nnx.merge(graphdef, state)}, batch, jax.random.PRNGKey(0), context)[0]

    grads = jax.jit(jax.grad(loss))(predictor)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("kd", ["none", "protokd", "smunet"])  # pmkl: the end-to-end run below (the config's)
def test_every_kd_loss_runs_one_student_step(kd):
    method = mtg(f"method.kd='{kd}'", "method.students=['t2']", "method.teacher_view='subset'", "method.ramp_steps=10")
    optimizers = engine.stage_optimizers(method, "students", 10)
    graphdefs, state = engine.init_state(method, "students", 0, optimizers)
    assert set(state["opt"]) == ({"students", "discriminator"} if kd == "smunet" else {"students"})
    step = jax.jit(engine.make_train_step(method, "students", graphdefs, optimizers))
    state, metrics = step(state, jax.tree.map(jnp.asarray, synthetic_batch(6)))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert ("t2/kd" in metrics or "students/t2/kd" in metrics) == (kd != "none")


@pytest.mark.parametrize("stage", ["teacher", "students"])
def test_resume_mid_stage_is_bit_for_bit(stage, tmp_path):
    assert_resume_is_bit_for_bit(mtg(), stage, [synthetic_batch(s) for s in range(4)], tmp_path)


# --- both stages end to end: handover, frozen teacher, one compilation, evaluation ---------------------

@pytest.fixture(scope="module")
def mtg_run(phantom_cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mind_the_gap")
    trainer = engine.train(mtg_config(), workdir, phantom_cache)
    assert trainer.compilations == {"teacher": {"compiled": 1, "loaded": 0}, "students": {"compiled": 1, "loaded": 0}}
    return workdir


def _checkpoint(workdir, stage):
    manager = ocp.CheckpointManager((workdir / "checkpoints" / stage).absolute())
    return manager.restore(manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def test_the_teacher_hands_over_and_stays_frozen(mtg_run):
    teacher, students = _checkpoint(mtg_run, "teacher"), _checkpoint(mtg_run, "students")
    for name in ("encoders", "predictor", "mix"):  # the students' stage ends with the teacher it began with
        for a, b in zip(jax.tree.leaves(teacher["models"][name]), jax.tree.leaves(students["models"][name])):
            np.testing.assert_array_equal(a, b)
    assert set(students["opt"]) == {"students"}  # the teacher has no optimiser state in stage 2
    rows = [json.loads(line) for line in (mtg_run / "metrics.jsonl").read_text().splitlines()]
    weights = [r for r in rows if r.get("stage") == "teacher" and "w/t1ce" in r]
    assert weights and all(abs(sum(r[f"w/{m}"] for m in MODALITIES) - 4) < 1e-4 for r in weights)


def test_teacher_and_students_evaluate_with_one_compilation_each(mtg_run, phantom_cache, tmp_path):
    test = CacheDataset(phantom_cache, engine.load_splits(mtg_run, CacheDataset(phantom_cache))["test"])
    method, graphdefs, models, config = engine.load_trained(mtg_run, stage="teacher")
    assert set(models) == {"encoders", "predictor"}
    summary = evaluate(method, graphdefs, models, test, config.eval, tmp_path / "t", predictions="none", progress=False)
    assert all(row["served"] for row in summary["subsets"]) and summary["mean"]["rows"] == 15
    assert json.loads((tmp_path / "t" / "eval_settings.json").read_text())["compilations"] == 1
    method, graphdefs, models, config = engine.load_trained(mtg_run)  # the last stage: the students
    assert set(models) == {"students"}
    summary = evaluate(method, graphdefs, models, test, config.eval, tmp_path / "s", predictions="none", progress=False)
    served = {subset_index(s) for s in ("t1ce", "flair")}
    assert {i for i, row in enumerate(summary["subsets"]) if row["served"]} == served
    assert json.loads((tmp_path / "s" / "eval_settings.json").read_text())["compilations"] == 1
    with pytest.raises(JaxbratsError, match="--stage train: method mind_the_gap has the stages teacher, students"):
        engine.load_trained(mtg_run, stage="train")


def test_cli_eval_of_the_teacher(mtg_run, phantom_cache, tmp_path, capsys):
    from jaxbrats.cli import main

    assert main(["eval", "--workdir", str(mtg_run), "--data", str(phantom_cache), "--out", str(tmp_path / "e"),
                 "--stage", "teacher", "--predictions", "none"]) == 0
    table = capsys.readouterr().out
    assert "15/15 rows" in table  # the teacher serves every subset
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert [row["name"] for row in summary["subsets"]] == list(SUBSET_NAMES)


# --- settings ------------------------------------------------------------------------------------------

def test_settings_are_checked():
    with pytest.raises(ConfigError, match="method.anchor must be one of"):
        mtg_config("method.anchor='uniform'")
    with pytest.raises(ConfigError, match="method.kd must be one of"):
        mtg_config("method.kd='fitnet'")
    with pytest.raises(ConfigError, match="'t5' is not a subset"):
        mtg_config("method.students=['t5']")
    with pytest.raises(ConfigError, match="latent_channels .12. must be divisible by model.groups"):
        mtg_config("method.latent_channels=12")
    with pytest.raises(ConfigError, match="clip_norm must be 0"):
        mtg_config("stages.students.optimizers.students.clip_norm=1.0")
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['train'\]"):
        mtg_config("stages.train.steps=3")
    assert mtg("method.students='all'").subsets == tuple(range(15))
    assert [u.group for u in mtg("method.kd='smunet'").updates("students")] == ["students", "discriminator"]
