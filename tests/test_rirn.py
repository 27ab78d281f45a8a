"""RIRN and the teacher/student engine: stacked students train as if alone (one of each subset
size), the teacher learns from its Dice only and runs once per step, each student sees only its
subset, CAR's theta/phi stay fixed, the Table 4 switches remove their terms, each 15-subset row
comes from its own student, exact resume, and the student axis split over 4 devices gives one
device's losses.

The losses themselves are checked against numpy in test_relation_losses.py.
"""

import json
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import TINY, run_on_cpu_devices
from flax import nnx
from helpers import synthetic_batch

from jaxbrats import engine
from jaxbrats.config import ConfigError
from jaxbrats.evaluation.program import evaluate
from jaxbrats.inference.trained import load_trained
from jaxbrats.methods import get_method, load_config
from jaxbrats.modalities import SUBSET_NAMES, subset_index
from jaxbrats.networks import family
from jaxbrats.networks.unet import UNet
from jaxbrats.runtime.checkpoints import restore, save
from jaxbrats.runtime.sharding import make_mesh, shard_state

#: A 2-level narrow U-Net (CAR at its 8^3 bottleneck), two students, the paper's stem dropout. What
#: is checked here does not depend on the depth; RIRN's programs are the largest to compile, and
#: each level more adds a third to them.
RIRN = TINY + ["method.name='rirn'", "model.widths=[8,8]", "model.blocks=[1,1]", "model.stem_dropout=0.2"]


def rirn_config(*extra):
    return load_config(None, RIRN + list(extra))


def rirn(students, *extra):
    return get_method("rirn")(rirn_config(f"method.students={json.dumps(students)}", *extra))


# --- the teacher learns from its Dice only; a student sees only its subset -------------------------


def test_no_student_loss_reaches_the_teacher():
    # Three levels, as before the suite's RIRN went to two: in this program the students' terms
    # give the teacher's gradient exactly 0.0; at two levels XLA leaves float noise of ~1e-8.
    method = rirn(["t1ce", "flair"], "model.widths=[8,8,8]", "model.blocks=[1,1,1]")
    models = method.init_models("train", nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, synthetic_batch(0))
    key = jax.random.PRNGKey(5)
    graphdef, teacher = nnx.split(models["teacher"])

    def full(state):
        return method.model_loss({**models, "teacher": nnx.merge(graphdef, state)}, batch, key)[0]

    def dice_only(state):
        out = nnx.merge(graphdef, state)(batch["image"], dropout_key=jax.random.split(key)[0])
        return method.seg_loss(out["logits"], batch)

    def students_only(state):  # the students' terms of the model update's loss
        return full(state) - dice_only(state)

    @jax.jit
    def check(state, moved):
        return jax.value_and_grad(students_only)(state), students_only(moved), jax.grad(dice_only)(state)

    (value, grads), moved_value, dice_grads = check(teacher, jax.tree.map(lambda a: a * 1.1, teacher))
    # The student terms depend on the teacher (CRR's mask, CAR's matrix, D's input) ...
    assert abs(float(moved_value) - float(value)) > 1e-4
    # ... and yet give it no gradient: the teacher's gradient is its Dice's.
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(dice_grads)) > 0


def _unet_applications(method) -> tuple[dict, dict]:
    """How often the traced train step (eval_shape) applies a U-Net outside the students' family map
    (the teacher) and inside it (a student each when unrolled), and its metrics' shapes: a count at
    trace time, where every application in the program is one Python call (the gradient reuses the
    forward trace)."""
    optimizers = engine.stage_optimizers(method, "train", 10)
    graphdefs, state = engine.abstract_state(method, "train", optimizers)
    step = engine.make_train_step(method, "train", graphdefs, optimizers)
    calls, inside = {"teacher": 0, "students": 0}, []
    unet_call, map_states = UNet.__call__, family.map_states

    def counted_call(self, *args, **kwargs):
        calls["students" if inside else "teacher"] += 1
        return unet_call(self, *args, **kwargs)

    def counted_map(*args, **kwargs):
        inside.append(True)
        try:
            return map_states(*args, **kwargs)
        finally:
            inside.pop()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(UNet, "__call__", counted_call)
        patch.setattr(family, "map_states", counted_map)
        metrics = jax.eval_shape(step, state, jax.tree.map(jnp.asarray, synthetic_batch(0)))[1]
    return calls, metrics


def test_a_student_sees_only_its_subset():
    method = rirn(["t1ce", "flair"])
    models = method.init_models("train", nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, synthetic_batch(1))
    teacher = models["teacher"](batch["image"])
    outputs = jax.jit(lambda b: method.student_terms(models, b, teacher, jax.random.PRNGKey(0))["adversary_input"])
    before = outputs(batch)
    t2 = {**batch, "image": batch["image"].at[..., 3].add(5.0)}  # a modality neither student has
    np.testing.assert_array_equal(outputs(t2), before)
    flair = {**batch, "image": batch["image"].at[..., 0].add(5.0)}
    after = outputs(flair)
    np.testing.assert_array_equal(after[0], before[0])  # the T1ce student
    assert float(jnp.abs(after[1] - before[1]).max()) > 1e-3  # the FLAIR student


# --- stacked = separate; exact resume ------------------------------------------------------------------


def _steps(method, batches, mesh=None, state=None, step=None):
    optimizers = engine.stage_optimizers(method, "train", 10)
    graphdefs, fresh = engine.init_state(method, "train", 0, optimizers)
    mesh = mesh or make_mesh()
    state = shard_state(fresh if state is None else state, mesh, method.families("train"))
    step = step or jax.jit(engine.make_train_step(method, "train", graphdefs, optimizers))
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
    return state, metrics, step


@pytest.fixture(scope="module")
def batches():
    return [synthetic_batch(seed) for seed in range(4)]


#: The stacked students: one of each subset size (4, 1, 2, 3 modalities), none in its slot of the
#: library's order (SUBSETS: 14, 1, 6, 13), so a mix-up of slot and subset shows.
STACKED = ["flair+t1ce+t1+t2", "t1ce", "flair+t2", "t1ce+t1+t2"]


@pytest.fixture(scope="module")
def together(batches):
    """The students of STACKED trained together for 4 steps: (method, final state, metrics, the jitted step)."""
    method = rirn(STACKED)
    state, metrics, step = _steps(method, batches)
    return method, state, metrics, step


#: The terms whose own gradient norms the T1ce student's run logs: a relation term, the adversarial
#: term, the teacher's.
GRAD_NORMS = ["crr", "adv_s", "teacher_dice"]


@pytest.fixture(scope="module")
def t1ce_alone(batches):
    """The T1ce student alone for 2 steps, logging GRAD_NORMS (which changes no update): (method,
    graph definitions, initial state, metrics). `together`'s T1ce reference and the grad_norms run."""
    method = rirn(["t1ce"], f"train.grad_norms={json.dumps(GRAD_NORMS)}")
    optimizers = engine.stage_optimizers(method, "train", 10)
    graphdefs, initial = engine.init_state(method, "train", 0, optimizers)
    step = jax.jit(engine.make_train_step(method, "train", graphdefs, optimizers))  # not donated: `initial` stays
    state, metrics = initial, []
    for batch in batches[:2]:
        state, m = step(state, jax.tree.map(jnp.asarray, batch))
        metrics.append(jax.device_get(m))
    return method, graphdefs, initial, metrics


def test_students_trained_together_give_the_losses_of_each_trained_alone(together, t1ce_alone, batches):
    _, _, metrics, _ = together
    for slot, name in enumerate(STACKED):  # every slot together, slot 0 alone (one compilation each; T1ce's: above)
        alone = t1ce_alone[3] if name == "t1ce" else _steps(rirn([name]), batches[:2])[1]
        for step in range(2):  # step 1's losses follow step 0's update: each student's gradient is its own
            for part in ("model/{}/seg", "model/{}/crr", "model/{}/car", "model/{}/adv_s", "discriminator/{}/adv_d"):
                key = part.format(name)
                np.testing.assert_allclose(metrics[step][key], alone[step][key], rtol=1e-5, err_msg=f"{slot}: {key}")
            np.testing.assert_allclose(
                metrics[step]["model/teacher_dice"], alone[step]["model/teacher_dice"], rtol=1e-6
            )
    # The students differ (their subsets), so equal losses are not trivially equal numbers.
    assert len({float(metrics[1][f"model/{name}/seg"]) for name in STACKED}) == len(STACKED)


def test_car_embeddings_stay_fixed(together):
    """theta/phi (`car_embeddings = "fixed"`): one shared pair, no optimiser state, and after 4 steps
    still the values they were initialised with."""
    method, state, _, _ = together
    assert "embeddings" not in method.families("train")  # one pair, not one per student
    assert all("embeddings" not in u.trainable for u in method.updates("train"))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state["opt"])]
    assert any("'students'" in p for p in paths) and not any("embeddings" in p for p in paths)
    initial = nnx.state(method.init_models("train", nnx.Rngs(0))["embeddings"])  # the engine's seed 0
    final = state["models"]["embeddings"]
    assert final["theta"].shape == (8, 4)  # C -> C/2 at the 8-channel bottleneck, no student axis
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(initial), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(final["theta"][...]).max()) > 0  # the random initialisation, not zeros


def test_resume_mid_run_is_bit_for_bit(together, batches, tmp_path):
    """Two steps, a checkpoint, a restore into the abstract template (no model initialised), two more
    steps: the state equals four uninterrupted steps bit for bit."""
    method, uninterrupted, _, step = together
    half, _, _ = _steps(method, batches[:2], step=step)
    manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    save(manager, half, {"stage": "train"})
    manager.wait_until_finished()
    _, abstract = engine.abstract_state(method, "train", engine.stage_optimizers(method, "train", 10))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(abstract))
    restored, _ = restore(manager, abstract)
    resumed, _, _ = _steps(method, batches[2:], state=restored, step=step)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(a, b)


# --- evaluation: each row from its own student ---------------------------------------------------------


@pytest.fixture(scope="module")
def rirn_run(phantom_cache, tmp_path_factory):
    """A 2-step RIRN run with three students (two singles and a pair)."""
    workdir = tmp_path_factory.mktemp("rirn")
    config = rirn_config("method.students=['t1ce','flair','t1+t2']", "stages.train.steps=2")
    trainer = engine.train(config, workdir, phantom_cache)
    assert sum(trainer.compilations["train"].values()) == 1  # compiled, or loaded from the suite's cache
    return workdir


def test_each_row_comes_from_its_own_student(rirn_run, phantom_cache, tmp_path):
    from jaxbrats.data.cache import CacheDataset

    method, graphdefs, models, config = load_trained(rirn_run)
    assert set(models) == {"students"}  # eval loads neither the teacher nor the discriminators
    test = CacheDataset(phantom_cache, engine.load_splits(rirn_run, CacheDataset(phantom_cache))["test"])
    summary = evaluate(method, graphdefs, models, test, config.eval, tmp_path / "a", predictions="none", progress=False)
    served = {subset_index(s) for s in ("t1ce", "flair", "t1+t2")}
    for i, row in enumerate(summary["subsets"]):
        assert row["served"] == (i in served)
        assert (row["cases"] > 0) == (i in served) and (row["dice"]["WT"] is None) == (i not in served)
    assert summary["mean"]["rows"] == 3
    settings = json.loads((tmp_path / "a" / "eval_settings.json").read_text())
    assert settings["compilations"] + settings["loaded_from_cache"] == 1  # compiled, or loaded from the cache
    assert "| - | - | - |" in (tmp_path / "a" / "summary.md").read_text()
    # Flip the sign of the FLAIR student's head (slot 1): only the FLAIR row changes.
    flipped = jax.tree_util.tree_map_with_path(
        lambda path, a: a.at[1].multiply(-1.0) if "head" in jax.tree_util.keystr(path) else a, models
    )
    evaluate(method, graphdefs, flipped, test, config.eval, tmp_path / "b", predictions="none", progress=False)
    changed = set()
    for case in sorted((tmp_path / "a" / "cases").iterdir()):
        rows_a = json.loads(case.read_text())["subsets"]
        rows_b = json.loads((tmp_path / "b" / "cases" / case.name).read_text())["subsets"]
        changed |= {a["name"] for a, b in zip(rows_a, rows_b) if a["dice"] != b["dice"]}
    assert changed == {"flair"}


def test_predict_refuses_a_case_no_student_serves(rirn_run, phantom_dir, tmp_path):
    from jaxbrats.errors import JaxbratsError
    from jaxbrats.inference.predict import predict_case

    case = next(p for p in sorted(phantom_dir.iterdir()) if p.is_dir())
    only_t1 = tmp_path / case.name
    only_t1.mkdir()
    for f in case.iterdir():
        if "t1n" in f.name:
            (only_t1 / f.name).symlink_to(f)
    with pytest.raises(
        JaxbratsError, match=r"no model for the modalities the case has \(t1\); it segments: t1ce, flair, t1\+t2"
    ):
        predict_case(rirn_run, only_t1, tmp_path / "seg.nii.gz")
    assert not (tmp_path / "seg.nii.gz").exists()


# --- settings ------------------------------------------------------------------------------------------


def test_students_option():
    assert rirn("all").served_subsets() == tuple(range(15))
    assert [SUBSET_NAMES[s] for s in rirn(["t2", "flair+t1ce"]).served_subsets()] == ["t2", "flair+t1ce"]
    with pytest.raises(ConfigError, match="'t3' is not a subset"):
        rirn(["t3"])
    with pytest.raises(ConfigError, match="'t1ce' is listed twice"):
        rirn(["t1ce", "t1ce"])
    with pytest.raises(ConfigError, match="must be 'all' or a non-empty list"):
        rirn([])
    with pytest.raises(ConfigError, match="clip_norm must be 0 for RIRN"):
        rirn_config("stages.train.optimizers.model.clip_norm=1.0")
    with pytest.raises(ConfigError, match="car_level must be in"):
        rirn_config("method.car_level=3")


def test_table4_switches_change_the_models_and_terms():
    method = rirn(["t1ce"], "method.adv=false", "method.car=false")
    assert [u.group for u in method.updates("train")] == ["model"] and method.families("train") == {"students": 1}
    assert set(method.init_models("train", nnx.Rngs(0))) == {"teacher", "students"}  # its terms: below
    # The shipped phantom config sets the discriminator's optimiser: still valid with adv = false.
    shipped = load_config(
        os.path.join(os.path.dirname(__file__), "..", "configs", "rirn_phantom.toml"), ["method.adv=false"]
    )
    assert get_method("rirn")(shipped).groups("train") == ("model",)
    with pytest.raises(ConfigError, match=r"unknown group\(s\) \['critic'\]"):
        rirn_config("stages.train.optimizers.critic.lr=1e-3")
    trained = rirn(["t1ce", "flair"], "method.car_embeddings='trained'")
    assert trained.families("train")["embeddings"] == 2 and "embeddings" in trained.updates("train")[0].trainable
    assert family.size(trained.init_models("train", nnx.Rngs(0))["embeddings"]) == 2


#: The paper's Table 4 rows (docs/methods/rirn.md, for the T1ce student): row -> its switches.
TABLE4 = {
    "baseline student": ["method.crr=false", "method.car=false", "method.adv=false"],
    "+ CRR without MF": ["method.mf=false", "method.car=false", "method.adv=false"],
    "+ CRR": ["method.car=false", "method.adv=false"],
    "CAR alone": ["method.crr=false", "method.adv=false"],
    "CRR + MF + CAR": ["method.adv=false"],
    "RIRN": [],
}


def test_table4_rows_trace_their_terms_and_one_teacher_pass():
    """The rows with CRR or MF off, and RIRN itself: each row's train step traces, logs exactly the
    terms its switches leave on, and applies the teacher once (in both updates)."""
    for row in ("baseline student", "+ CRR without MF", "CAR alone", "RIRN"):
        switches = TABLE4[row]
        method = rirn(["t1ce"], *switches)
        calls, metrics = _unet_applications(method)
        assert calls == {"teacher": 1, "students": 1}, row
        terms = {key.rsplit("/", 1)[-1] for key in metrics}
        for term, switch in (("crr", "crr"), ("crr_pairs", "crr"), ("car", "car"), ("adv_s", "adv"), ("adv_d", "adv")):
            assert (term in terms) == (f"method.{switch}=false" not in switches), (row, term)
        assert {"seg", "teacher_dice"} <= terms and ("model/t1ce/seg" in metrics) == ("adv_d" in terms), row
    # The count sees a second pass: the baseline row's loss with one more teacher application.
    method = rirn(["t1ce"], *TABLE4["baseline student"])
    model_loss = method.model_loss

    def teacher_twice(models, batch, key, context=None):
        models["teacher"](batch["image"])
        return model_loss(models, batch, key, context)

    method.model_loss = teacher_twice
    assert _unet_applications(method)[0] == {"teacher": 2, "students": 1}


def test_table4_rows_without_crr_or_mf_act():
    """The rows' student terms on one model: without CRR the loss is L_SEG (+ L_CAR); without MF, CRR's
    mask is the ground truth alone, whatever the teacher predicts; with MF, only where it predicts."""
    models = rirn(["t1ce"], "method.adv=false").init_models("train", nnx.Rngs(0))  # every row's models
    batch = jax.tree.map(jnp.asarray, synthetic_batch(2))
    teacher = models["teacher"](batch["image"])

    def terms(row, logits=None):
        out = teacher if logits is None else {**teacher, "logits": jnp.full_like(teacher["logits"], logits)}
        return rirn(["t1ce"], *TABLE4[row]).student_terms(models, batch, out, jax.random.PRNGKey(0))

    baseline, car_alone = terms("baseline student"), terms("CAR alone")
    assert set(baseline) == {"loss", "seg", "adversary_input"} and baseline["loss"] == baseline["seg"]
    assert set(car_alone) == {"loss", "seg", "car", "adversary_input"}
    np.testing.assert_allclose(car_alone["loss"], car_alone["seg"] + car_alone["car"], rtol=1e-6)
    assert float(car_alone["car"][0]) > 0
    without_mf, with_mf = terms("+ CRR without MF"), terms("+ CRR")
    assert set(with_mf) == set(without_mf) == {"loss", "seg", "crr", "crr_pairs", "adversary_input"}
    np.testing.assert_allclose(without_mf["loss"], without_mf["seg"] + without_mf["crr"], rtol=1e-6)
    assert float(without_mf["crr_pairs"][0]) == 6  # every region in both samples: 3 x 2 ordered pairs
    assert abs(float(without_mf["crr"][0]) - float(with_mf["crr"][0])) > 1e-4  # MF filters this teacher's mask
    for logits in (-10.0, 10.0):  # a teacher that finds no tumour, one that finds it everywhere
        np.testing.assert_array_equal(terms("+ CRR without MF", logits)["crr"], without_mf["crr"])
    blind, everywhere = terms("+ CRR", -10.0), terms("+ CRR", 10.0)
    assert float(blind["crr"][0]) == 0 and float(blind["crr_pairs"][0]) == 0  # MF: no voxel the teacher misses
    np.testing.assert_allclose(everywhere["crr"], without_mf["crr"], rtol=1e-6)  # MF's mask = GT where all found


# --- the student axis over 4 devices -------------------------------------------------------------------


def test_students_split_over_four_devices_give_the_losses_of_one(together):
    """The four students of `together` and its batches of 2 on a 2 (data) x 2 (model) mesh of 4 fake
    CPU devices, vmapped with the student axis split along "model": the losses of one device
    computing the students one after the other (CPU's "auto"), and two students per device."""
    _, _, one_device, _ = together
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import jax
        from test_rirn import STACKED, _steps, rirn, synthetic_batch
        from jaxbrats.config import MeshConfig
        from jaxbrats.runtime.sharding import make_mesh
        assert jax.device_count() == 4
        method = rirn(STACKED, "model.family_map='vmap'")
        mesh = make_mesh(MeshConfig(data=2, model=2))
        state, metrics, _ = _steps(method, [synthetic_batch(s) for s in range(2)], mesh=mesh)
        kernel = state["models"]["students"]["decoder"]["head"]["kernel"]
        teacher = state["models"]["teacher"]["decoder"]["head"]["kernel"]
        print(json.dumps({{"metrics": [{{k: float(v) for k, v in s.items()}} for s in metrics],
                          "student_shape": list(kernel.addressable_shards[0].data.shape),
                          "spec": str(kernel.sharding.spec), "teacher_spec": str(teacher.sharding.spec)}}))
    """)
    result = json.loads(run_on_cpu_devices([sys.executable, "-c", script], 4).strip().splitlines()[-1])
    assert result["student_shape"][0] == 2 and "model" in result["spec"]  # 4 students, 2 per device
    assert "model" not in result["teacher_spec"] and "data" not in result["teacher_spec"]  # the teacher is replicated
    for one, four in zip(one_device[:2], result["metrics"]):
        assert set(one) == set(four)
        for key in one:
            np.testing.assert_allclose(four[key], float(one[key]), rtol=1e-5, atol=1e-5, err_msg=key)


def test_a_frozen_teacher_from_another_run(rirn_run, trained_run):
    method = rirn(["t1ce"], f"method.teacher_from='{rirn_run / 'checkpoints' / 'train'}'")
    assert "teacher" not in method.updates("train")[0].trainable  # frozen: no optimiser state, no update
    optimizers = engine.stage_optimizers(method, "train", 10)
    teacher = method.start_from("train", lambda: engine.abstract_state(method, "train", optimizers)[1]["models"])[
        "teacher"
    ]
    saved = ocp.CheckpointManager((rirn_run / "checkpoints" / "train").absolute())
    full = saved.restore(saved.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(full["models"]["teacher"])):
        np.testing.assert_array_equal(a, b)
    # A baseline run of another U-Net (4 levels, not 2): refused in one line, nothing half-loaded.
    other = rirn(["t1ce"], f"method.teacher_from='{trained_run / 'checkpoints' / 'train'}'")
    with pytest.raises(ConfigError, match="holds no model teacher or unet shaped like this run's"):
        other.start_from("train", lambda: engine.abstract_state(other, "train", optimizers)[1]["models"])


# --- issue 25: L_SEG's Dice over regions, refusals, per-term gradient norms ---------------------------


def _numpy_region_dice(logits, label, valid):
    """1 - (2 sum(p g) + s) / (sum p + sum g + s) per sample and region (WT, TC, ET), s = 1e-5."""
    p = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    g = np.stack([label > 0, (label == 1) | (label == 3), label == 3], axis=-1).astype(np.float64)
    w = np.asarray(valid, np.float64)[..., None]
    axes = (1, 2, 3)
    dice = 1 - (2 * (p * g * w).sum(axes) + 1e-5) / ((p * w).sum(axes) + (g * w).sum(axes) + 1e-5)
    return dice.mean(axis=0)  # (3,): each region's Dice loss, averaged over the samples


def test_l_seg_sums_the_three_regions_dice_by_default_as_acn():
    batch = synthetic_batch(2)
    logits = np.random.default_rng(0).normal(size=batch["label"].shape + (3,)).astype(np.float32)
    per_region = _numpy_region_dice(logits, batch["label"], batch["valid"])
    summed = float(rirn(["t1ce"]).seg_loss(jnp.asarray(logits), batch))
    averaged = float(rirn(["t1ce"], "method.dice_regions='mean'").seg_loss(jnp.asarray(logits), batch))
    np.testing.assert_allclose(summed, per_region.sum(), rtol=1e-5)
    np.testing.assert_allclose(averaged, per_region.mean(), rtol=1e-5)


def test_a_global_norm_clip_on_the_discriminators_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"stages.train.optimizers.discriminator.clip_norm must be 0 .*discriminators"
    ):
        rirn_config("stages.train.optimizers.discriminator.clip_norm=1.0")


def test_predict_refuses_a_subset_no_student_serves():
    from jaxbrats.errors import JaxbratsError

    method = rirn(["t1ce"])
    models = method.init_models("train", nnx.Rngs(0))
    image = jnp.zeros((1, 16, 16, 16, 4))
    mask = jnp.ones((1, 4), bool)
    with pytest.raises(JaxbratsError, match="rirn has no student for flair .*its students: t1ce"):
        method.predict(models, image, mask, subset_index("flair"))
    with pytest.raises(JaxbratsError, match="no student for flair\\+t1ce\\+t1\\+t2"):
        method.predict(models, image, mask)  # None: the full set
    served = method.predict(models, image, mask, np.int32(subset_index("t1ce")))
    assert np.isfinite(np.asarray(served)).all()
    # Inside a program the subset is data: an unserved one gives NaN, never another student's output.
    traced = jax.jit(lambda s: method.predict(models, image, mask, s))
    assert np.isnan(np.asarray(traced(jnp.int32(subset_index("flair"))))).all()
    assert np.isfinite(np.asarray(traced(jnp.int32(subset_index("t1ce"))))).all()


def test_grad_norms_log_each_terms_own_gradient_norm(t1ce_alone, batches):
    method, graphdefs, state, steps = t1ce_alone
    terms, metrics = GRAD_NORMS, steps[0]
    batch = jax.tree.map(jnp.asarray, batches[0])
    # The same norms by hand: each term's own gradient over the model update's trainable variables.
    key = jax.random.fold_in(jax.random.fold_in(state["key"], 0), 0)
    models = {n: nnx.merge(g, state["models"][n]) for n, g in graphdefs.items()}
    graphs = {n: nnx.split(models[n]) for n in ("teacher", "students")}

    def part(trainable, name):
        live = {**models, **{n: nnx.merge(graphs[n][0], trainable[n]) for n in trainable}}
        return method.model_loss(live, batch, key)[1][name]

    @jax.jit  # one program for the five gradients
    def norms(trainable):
        grads = {name: jax.grad(part)(trainable, name) for name in terms}
        return {name: jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads[name]))) for name in terms}

    by_hand = norms({n: graphs[n][1] for n in graphs})
    for name in terms:
        expected = float(by_hand[name])
        got = float(metrics[f"model/grad_norm/{name}"])
        assert expected > 0, name
        np.testing.assert_allclose(got, expected, rtol=1e-4, err_msg=name)


def test_grad_norms_of_a_term_no_update_logs_is_a_config_error(batches):
    method = rirn(["t1ce"], "train.grad_norms=['crr', 'nosuch']")
    optimizers = engine.stage_optimizers(method, "train", 10)
    graphdefs, state = engine.abstract_state(method, "train", optimizers)
    step = engine.make_train_step(method, "train", graphdefs, optimizers)
    with pytest.raises(ConfigError, match="train.grad_norms: nosuch is not a loss term of stage train .*crr"):
        jax.eval_shape(step, state, jax.tree.map(jnp.asarray, batches[0]))
