"""Mind the Gap: per-modality encoders mapped over the modality axis = separate encoders, the
teacher's objective (eq. 7, padding masked; `teacher_seg` "each", "combined", "both"), P_N's sample
in training and mean at inference, its inference rule (as C* was trained) for evaluation and for the
students alike, P_mix's weights (their own rate, no weight decay, the paper's values in reach), the
teacher's views (`teacher_view`), stacked students = each alone, the teacher's checkpoint handed
over to frozen-teacher students (and a students-only run from it = the two-stage run), students of
another run's plain U-Net (Table I's "Original Method"), exact resume in each stage, one
compilation per stage and for each evaluation.

The anchors and KD losses themselves are checked against numpy in test_alignment_losses.py and
test_distillation_losses.py.
"""

import dataclasses
import json
import sys
from pathlib import Path

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
from jaxbrats.evaluation.program import evaluate
from jaxbrats.inference.trained import load_trained
from jaxbrats.labels import region_probs_from_label_probs
from jaxbrats.losses import label_loss
from jaxbrats.losses.distillation import label_logits_from_region_logits, style_features
from jaxbrats.methods import get_method, load_config
from jaxbrats.methods.mind_the_gap import TEACHER_SEG, MindTheGapOptions, MixWeights, teacher_seg_terms
from jaxbrats.modalities import MODALITIES, SUBSET_MASKS, SUBSET_NAMES, subset_index
from jaxbrats.networks import family
from jaxbrats.networks.latent_encoder import LatentEncoder, encode_modalities

#: A 2-level 8-channel U-Net (what is checked here does not depend on the depth; each level more
#: adds a third to every program), 8-channel latents, two students, a few steps per stage.
MTG = [s for s in TINY if not s.startswith("stages.train")] + [
    "method.name='mind_the_gap'",
    "model.widths=[8,8]",
    "model.blocks=[1,1]",
    "method.students=['t1ce','flair']",
    "stages.teacher.steps=2",
    "stages.students.steps=2",
    "stages.teacher.optimizers.teacher.lr=3e-3",
    "stages.students.optimizers.students.lr=3e-3",
]


def mtg_config(*extra):
    return load_config(None, MTG + list(extra))


def mtg(*extra):
    return get_method("mind_the_gap")(mtg_config(*extra))


ROOT = Path(__file__).resolve().parents[1]
PAPER_WEIGHTS = {"t1": 0.7759, "t2": 0.8977, "t1ce": 2.2055, "flair": 0.3055}  # Sec. IV-C


# --- encoders ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["vmap", "unroll"])
def test_per_modality_encoders_equal_separate_encoders(how):
    method = mtg()
    encoders = method.init_models("teacher", nnx.Rngs(0))["encoders"]
    assert family.size(encoders) == len(MODALITIES)
    image = jnp.asarray(synthetic_batch(0)["image"])
    stacked = jax.jit(lambda img: encode_modalities(encoders, img, shared=False, how=how)["latent"])(image)
    for j in range(len(MODALITIES)):
        alone = family.member(encoders, j)(image[..., j : j + 1])["latent"]
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
        np.testing.assert_allclose(latents[j], encoder(image[..., j : j + 1])["latent"], rtol=1e-5, atol=1e-5)


# --- the teacher -------------------------------------------------------------------------------------


def test_the_teacher_loss_is_eq7_summed_over_modalities():
    """`teacher_seg`: "each" (eq. 7) = sum_j L(C*(Z_j)); "combined" = L(C* on the latents' mean);
    "both" = their sum; each plus the alignment terms."""
    methods = {mode: mtg("method.anchor='modality'", f"method.teacher_seg='{mode}'") for mode in TEACHER_SEG}
    method = methods["each"]
    models = method.init_models("teacher", nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, synthetic_batch(2))

    @jax.jit
    def run(batch):  # the method's losses, and eq. 7 written out modality by modality
        out = {mode: m.teacher_loss(models, batch, jax.random.PRNGKey(0)) for mode, m in methods.items()}
        latents = method.encode(models, batch["image"])["latent"]
        seg = [
            label_loss(models["predictor"](latents[j])["logits"], batch["label"], batch["valid"])[0]
            for j in range(len(MODALITIES))
        ]
        mean = jnp.mean(latents, axis=0)
        combined = label_loss(models["predictor"](mean)["logits"], batch["label"], batch["valid"])[0]
        v = batch["valid"][..., None].astype(jnp.float32)  # padding voxels count in no term
        align = [
            jnp.sum(jnp.square(latents[j] - latents[1]) * v) / (jnp.sum(v) * latents.shape[-1])
            for j in range(len(MODALITIES))
        ]  # T1ce is k
        return out, sum(seg), combined, sum(align)

    out, seg, combined, align = run(batch)
    seg, combined, align = float(seg), float(combined), float(align)
    assert float(out["each"][1]["align/t1ce"]) == 0.0
    assert abs(seg - 4 * combined) > 1e-3 * seg  # the terms differ: each mode's sum names what it trained
    expected = {"each": {"seg_each": seg}, "combined": {"seg_combined": combined}}
    expected["both"] = {**expected["each"], **expected["combined"]}
    for mode, (loss, parts) in out.items():
        assert {k for k in parts if k.startswith("seg_")} == set(expected[mode]), mode
        for k, value in expected[mode].items():
            np.testing.assert_allclose(float(parts[k]), value, rtol=1e-4, err_msg=f"{mode} {k}")
        np.testing.assert_allclose(float(parts["seg"]), sum(expected[mode].values()), rtol=1e-4, err_msg=mode)
        np.testing.assert_allclose(float(parts["align"]), align, rtol=1e-4, err_msg=mode)
        np.testing.assert_allclose(float(loss), sum(expected[mode].values()) + align, rtol=1e-4, err_msg=mode)


@pytest.mark.parametrize("rule", ["each", "mean_latent"])
def test_the_teacher_predicts_from_the_present_latents_only(rule):
    """ "each": the present C*(Z_j)'s softmax averaged; "mean_latent": C* on the present latents' mean.
    The students distil from the same teacher output (`teacher_view_output`) that eval scores."""
    method = mtg(f"method.teacher_inference='{rule}'")
    method.serve("teacher")
    models = method.init_models("teacher", nnx.Rngs(0))
    image = jnp.asarray(synthetic_batch(3)["image"])
    mask = jnp.asarray([True, True, False, False])  # FLAIR and T1ce
    predict = jax.jit(lambda img: method.predict(models, img, mask))
    before = predict(image)
    np.testing.assert_array_equal(predict(image.at[..., 2:].add(7.0)), before)  # T1, T2 change nothing
    assert float(jnp.abs(predict(image.at[..., 0].add(7.0)) - before).max()) > 1e-4

    @jax.jit
    def reference(image):  # written out, and what the students distil from (`teacher_view_output`)
        latents = method.encode(models, image)["mean"]
        if rule == "each":
            probs = jnp.mean(
                jnp.stack([jax.nn.softmax(models["predictor"](latents[j])["logits"], -1) for j in (0, 1)]), 0
            )
        else:
            probs = jax.nn.softmax(models["predictor"](jnp.mean(latents[:2], axis=0))["logits"], -1)
        teacher = method.teacher_view_output(models, method.teacher_basis(models, image), mask)
        return probs, jax.nn.softmax(teacher["logits"], -1)

    probs, students_see = reference(image)
    np.testing.assert_allclose(before, region_probs_from_label_probs(probs, xp=jnp), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(students_see, probs, rtol=1e-4, atol=1e-5)
    assert method.served_subsets() == tuple(range(15))


def test_the_inference_rule_follows_how_the_predictor_was_trained():
    assert mtg().options.teacher_inference == "auto" and mtg().inference_rule == "each"  # eq. 7's "each"
    assert mtg("method.teacher_seg='combined'").inference_rule == "mean_latent"
    assert mtg("method.teacher_seg='both'").inference_rule == "mean_latent"
    assert mtg("method.teacher_seg='each'", "method.teacher_inference='mean_latent'").inference_rule == "mean_latent"


@pytest.mark.parametrize("anchor", ["none", "mix", "mix-mixture"])  # "normal": the test below
def test_every_anchor_trains(anchor):
    anchor, _, target = anchor.partition("-")
    method = mtg(f"method.anchor='{anchor}'", f"method.mix_target='{target or 'prior'}'")
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
        if not target:  # the prior (T1ce) is the target: its own term is 0
            assert float(parts["align/t1ce"]) == 0.0


def test_p_n_samples_its_latents_in_training_and_predicts_from_their_mean():
    """P_N: C* trains on mu + sigma eps, eps ~ N(0, 1) drawn from the step's key (`normal_sample`;
    false: on mu); the engine's train step draws it; inference reads mu and draws nothing."""
    method = mtg("method.anchor='normal'")
    fixed = mtg("method.anchor='normal'", "method.normal_sample=false")
    models = method.init_models("teacher", nnx.Rngs(0))
    assert models["encoders"].head.kernel.shape[-1] == 2 * method.latent_channels  # mean + log variance
    batch = jax.tree.map(jnp.asarray, synthetic_batch(4))

    @jax.jit
    def run(batch, key):
        parts, on_mean = method.teacher_loss(models, batch, key)[1], fixed.teacher_loss(models, batch, key)[1]
        encoded = method.encode(models, batch["image"], key)
        eps = (encoded["latent"] - encoded["mean"]) * jnp.exp(-0.5 * encoded["log_var"])
        sample = teacher_seg_terms(method.options, models["predictor"], encoded["latent"], batch)["seg_each"]
        mean = teacher_seg_terms(method.options, models["predictor"], encoded["mean"], batch)["seg_each"]
        return parts, on_mean, eps, sample, mean

    parts, on_mean, eps, sample, mean = run(batch, jax.random.PRNGKey(1))
    parts2, _, eps2, _, _ = run(batch, jax.random.PRNGKey(2))
    np.testing.assert_allclose(float(parts["seg_each"]), float(sample), rtol=1e-5)  # C* saw the sample
    np.testing.assert_allclose(float(on_mean["seg_each"]), float(mean), rtol=1e-5)
    assert abs(float(sample) - float(mean)) > 1e-4 and float(parts2["seg_each"]) != float(parts["seg_each"])
    assert float(parts["align"]) > 0.0
    eps, eps2 = np.asarray(eps, np.float64).ravel(), np.asarray(eps2, np.float64).ravel()
    assert eps.size > 2e5  # eps ~ N(0, 1): mean, variance, 4th moment within ~5 standard errors; new per key
    assert abs(eps.mean()) < 0.01 and abs(eps.std() - 1.0) < 0.01 and abs(np.mean(eps**4) - 3.0) < 0.1
    assert abs(np.corrcoef(eps, eps2)[0, 1]) < 0.01

    def draws(m):  # the engine's train step, traced on abstract values (nothing compiled)
        optimizers = engine.stage_optimizers(m, "teacher", 10)
        graphdefs, state = engine.abstract_state(m, "teacher", optimizers)
        batch_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
        return str(jax.make_jaxpr(engine.make_train_step(m, "teacher", graphdefs, optimizers))(state, batch_shapes))

    assert "erf_inv" in draws(method)  # the train step draws eps (a normal draw: erf_inv of uniform bits)
    image, mask = batch["image"], jnp.ones(4, bool)
    assert "random_bits" not in str(jax.make_jaxpr(lambda i: method.predict(models, i, mask))(image))


def test_p_mix_follows_the_written_loss_by_default():
    """Sec. III-B writes P_mix's loss against a prior modality's latent: the default target."""
    assert MindTheGapOptions().mix_target == "prior" and MindTheGapOptions().anchor_modality == "t1ce"
    for name in ("mind_the_gap_phantom.toml", "mind_the_gap_brats2018.toml"):
        assert get_method("mind_the_gap").parse_options(load_config(ROOT / "configs" / name)).mix_target == "prior"


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "adam-model_lr"])
def test_weight_decay_leaves_the_p_mix_weights_alone(optimizer):
    """With weight_decay > 0 the weights' update equals the update without decay; the other models decay."""
    name, _, model_lr = optimizer.partition("-")
    extra = [f"stages.teacher.optimizers.teacher.name='{name}'"]
    if model_lr:
        extra.append("stages.teacher.optimizers.teacher.model_lr={mix=5e-2}")
    params = {"mix": nnx.state(MixWeights(4), nnx.Param), "predictor": {"w": jnp.full((3,), 2.0)}}
    params["mix"]["raw"][...] = jnp.asarray([0.5, 1.5, -0.5, -1.0])
    grads = jax.tree.map(lambda a: jnp.full_like(a, 0.01), params)

    def update(decay):
        method = mtg("method.anchor='mix'", f"stages.teacher.optimizers.teacher.weight_decay={decay}", *extra)
        opt = engine.stage_optimizers(method, "teacher", 10)["teacher"]
        return opt.update(grads, opt.init(params), params)[0]

    with_decay, without = update(0.5), update(0.0)
    np.testing.assert_array_equal(with_decay["mix"]["raw"][...], without["mix"]["raw"][...])
    assert float(jnp.abs(with_decay["predictor"]["w"] - without["predictor"]["w"]).max()) > 0  # the rest decays
    assert mtg("method.anchor='modality'").undecayed("teacher", "teacher") == ()


def _simulate(config, **kw):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from mix_weights_sim import simulate
    finally:
        sys.path.pop(0)
    return simulate(config, 8, (1.3, 0.7, 1.1, 1.0), **kw)


def test_the_papers_weights_are_in_reach_on_the_phantom_schedule():
    """tools/mix_weights_sim.py (the method's alignment + the configured optimiser on fixed latents):
    with the phantom config's own rate for the weights the T1ce share passes the paper's 2.2055 of
    4.1846 within the 400 steps (at the teacher group's rate it does not); under the prior target
    the anchor's weight only grows."""
    t1ce = MODALITIES.index("t1ce")
    paper_share = PAPER_WEIGHTS["t1ce"] / sum(PAPER_WEIGHTS.values())
    config = load_config(ROOT / "configs" / "mind_the_gap_phantom.toml")
    assert config.stages["teacher"].optimizers["teacher"].model_lr == {"mix": 5e-3}
    out = _simulate(config)
    w = out["weights"]
    assert out["steps"] == 400 and w.shape == (401, 4)
    np.testing.assert_allclose(w.sum(axis=1), 4.1846, rtol=1e-5)
    assert (np.diff(w[:, t1ce]) >= -1e-6).all()
    assert w[-1, t1ce] / w[-1].sum() > paper_share
    group_rate = _simulate(
        load_config(ROOT / "configs" / "mind_the_gap_phantom.toml", ["stages.teacher.optimizers.teacher.model_lr={}"])
    )["weights"]
    assert group_rate[-1, t1ce] / group_rate[-1].sum() < paper_share
    mixture = _simulate(
        load_config(ROOT / "configs" / "mind_the_gap_phantom.toml", ["method.mix_target='mixture'"]), steps=20
    )["weights"]
    np.testing.assert_allclose(mixture.sum(axis=1), 4.1846, rtol=1e-5)  # both targets run


# --- the students ---------------------------------------------------------------------------------------


def test_a_student_sees_only_its_subset_and_the_teacher_gets_no_gradient():
    """A student sees its subset; the teacher it distils from all four modalities (`teacher_view =
    "full"`) or the student's own ("subset"); no gradient reaches the teacher."""
    method = mtg("method.kd='kdnet'")
    subset_view = mtg("method.kd='kdnet'", "method.teacher_view='subset'")
    models = method.init_models("students", nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, synthetic_batch(5))
    context = {"step": jnp.asarray(0)}

    @jax.jit
    def per_student(b):  # each view's per-student terms
        return [m.students_loss(models, b, jax.random.PRNGKey(0), context)[1] for m in (method, subset_view)]

    before, subset_before = per_student(batch)
    t1, subset_t1 = per_student({**batch, "image": batch["image"].at[..., 2].add(3.0)})  # T1: no student's
    _, subset_flair = per_student({**batch, "image": batch["image"].at[..., 0].add(3.0)})  # FLAIR: one student's
    for name in ("t1ce", "flair"):
        np.testing.assert_allclose(t1[f"{name}/seg"], before[f"{name}/seg"], rtol=1e-6)
        assert abs(float(t1[f"{name}/kd"]) - float(before[f"{name}/kd"])) > 1e-7  # the full teacher saw it
        for key in ("seg", "kd"):  # the subset teacher did not
            np.testing.assert_allclose(subset_t1[f"{name}/{key}"], subset_before[f"{name}/{key}"], rtol=1e-6)
    np.testing.assert_allclose(subset_flair["t1ce/kd"], subset_before["t1ce/kd"], rtol=1e-6)  # T1ce's: T1ce alone
    assert abs(float(subset_flair["flair/kd"]) - float(subset_before["flair/kd"])) > 1e-7
    assert abs(float(subset_before["flair/kd"]) - float(before["flair/kd"])) > 1e-7  # two different teachers
    graphdef, predictor = nnx.split(models["predictor"])

    def loss(state):
        return method.students_loss(
            {**models, "predictor": nnx.merge(graphdef, state)}, batch, jax.random.PRNGKey(0), context
        )[0]

    grads = jax.jit(jax.grad(loss))(predictor)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("view", ["full", "subset"])
def test_smunet_discriminator_reads_the_teacher_view_of_the_kd_term(view):
    method = mtg("method.kd='smunet'", f"method.teacher_view='{view}'")
    models = method.init_models("students", nnx.Rngs(0))
    batch = jax.tree.map(jnp.asarray, synthetic_batch(7))

    @jax.jit
    def run(batch):
        _, _, shared = method.students_loss(models, batch, jax.random.PRNGKey(0), {"step": jnp.asarray(0)})
        basis = method.teacher_basis(models, batch["image"])
        views = [
            style_features(method.teacher_view_output(models, basis, jnp.asarray(SUBSET_MASKS[s])))
            for s in method.subsets
        ]
        full = style_features(method.teacher_view_output(models, basis, jnp.ones(4, bool)))
        loss = method.discriminator_loss(models, batch, None, shared)[0]
        return shared["teacher_style"], views, full, loss

    real, views, full, loss = run(batch)
    if view == "subset":  # one "real" per student: its own subset teacher's, as its KD term
        assert real.shape == (len(method.subsets), *full.shape)
        for k, expected in enumerate(views):
            np.testing.assert_allclose(real[k], expected, rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(real[0] - full).max()) > 1e-4
    else:
        np.testing.assert_allclose(real, full, rtol=1e-5, atol=1e-6)
    assert np.isfinite(float(loss))


def _one_student_step(kd, students, *extra):
    """(method, train state after one step on a fixed batch, metrics) with the students `students`."""
    method = mtg(
        f"method.kd='{kd}'",
        f"method.students={students}",
        "method.teacher_view='subset'",
        "method.ramp_steps=10",
        *extra,
    )
    optimizers = engine.stage_optimizers(method, "students", 10)
    graphdefs, state = engine.init_state(method, "students", 0, optimizers)
    assert set(state["opt"]) == ({"students", "discriminator"} if kd == "smunet" else {"students"})
    step = jax.jit(engine.make_train_step(method, "students", graphdefs, optimizers))
    state, metrics = step(state, jax.tree.map(jnp.asarray, synthetic_batch(6)))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    return method, jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("kd", ["none", "protokd"])  # smunet: below; pmkl: the end-to-end run (the config's)
def test_every_kd_loss_runs_one_student_step(kd):
    _, _, metrics = _one_student_step(kd, ["t2"])
    assert ("t2/kd" in metrics) == (kd != "none")


def _adam_moments(opt_state, name):
    """(mu, nu) of the model `name` in an optax state: the first step's are (0.1 g, 0.001 g^2)."""
    adam = next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu"))
    return jax.tree.leaves(adam.mu[name]), jax.tree.leaves(adam.nu[name])


def test_stacked_students_train_as_each_would_alone():
    """SMU-Net's KD (two updates: the students, then their discriminators, each "real" the student's
    own subset teacher): one step of the T2 student in slot 1 of two = its step alone (slot 0): its
    losses, its and its discriminator's gradients (Adam's moments) and updated weights. The two
    vmapped, as accelerators map a family (a third less to compile here than unrolled, CPU's way)."""
    _, alone, alone_metrics = _one_student_step("smunet", ["t2"])
    _, stacked, metrics = _one_student_step("smunet", ["t1ce", "t2"], "model.family_map='vmap'")
    for key in ("seg", "kd", "content_mse", "style_gram", "consistency_mse", "adv_s", "loss"):
        np.testing.assert_allclose(metrics[f"students/t2/{key}"], alone_metrics[f"students/t2/{key}"], rtol=1e-5)
    assert metrics["students/t1ce/seg"] != metrics["students/t2/seg"]  # the slots differ: not trivially equal
    for name, group in (("students", "students"), ("discriminators", "discriminator")):
        together, own = _adam_moments(stacked["opt"][group], name), _adam_moments(alone["opt"][group], name)
        for moments, alone_moments in zip(together, own, strict=True):  # the gradients, to 1e-6 of the largest
            atol = 1e-6 * max(float(np.abs(b).max()) for b in alone_moments)  # (rounding: ~1e-9 against 0.08)
            for a, b in zip(moments, alone_moments, strict=True):
                np.testing.assert_allclose(a[1], b[0], rtol=1e-4, atol=atol, err_msg=name)
        weights = zip(jax.tree.leaves(stacked["models"][name]), jax.tree.leaves(alone["models"][name]), own[0])
        compared = []
        for a, b, mu in weights:  # where the gradient is rounding (biases before GroupNorm), Adam's step is too
            kept = np.abs(mu[0]) > 1e-7
            np.testing.assert_allclose(a[1][kept], b[0][kept], rtol=1e-4, atol=1e-6, err_msg=name)
            compared.append((kept.sum(), kept.size))
        assert np.sum(compared, axis=0) @ [1, -0.9] > 0, name  # 90 % of the weights compared (95 % here)


@pytest.mark.parametrize("stage", ["teacher", "students"])
def test_resume_mid_stage_is_bit_for_bit(stage, tmp_path):
    assert_resume_is_bit_for_bit(mtg(), stage, [synthetic_batch(s) for s in range(4)], tmp_path)


# --- both stages end to end: handover, frozen teacher, one compilation, evaluation ---------------------


@pytest.fixture(scope="module")
def mtg_run(phantom_cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mind_the_gap")
    trainer = engine.train(mtg_config(), workdir, phantom_cache)
    assert {stage: sum(n.values()) for stage, n in trainer.compilations.items()} == {"teacher": 1, "students": 1}
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


def test_a_students_only_run_from_the_teacher_checkpoint(mtg_run, phantom_cache, tmp_path):
    """`train --stage students --set stages.students.init_from="'RUN/checkpoints/teacher'"` in a fresh
    work directory: no teacher stage; the students' stage equals the two-stage run's bit for bit (the
    same teacher, seeds train.seed + 1 and data stream)."""
    from jaxbrats.cli import main

    config, workdir = tmp_path / "mtg.toml", tmp_path / "students"
    config.write_text("")  # the settings: MTG's, as `mtg_config` gives them
    init_from = f"stages.students.init_from='{mtg_run / 'checkpoints' / 'teacher'}'"
    sets = [a for s in [*MTG, init_from] for a in ("--set", s)]
    args = ["train", "--config", str(config), "--workdir", str(workdir), "--data", str(phantom_cache)]
    assert main([*args, "--stage", "students", *sets]) == 0
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["students"]
    ours, theirs = _checkpoint(workdir, "students"), _checkpoint(mtg_run, "students")
    assert set(ours["models"]) == {"encoders", "predictor", "mix", "students"} and set(ours["opt"]) == {"students"}
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(a, b)


def test_teacher_and_students_evaluate_with_one_compilation_each(mtg_run, phantom_cache, tmp_path):
    test = CacheDataset(phantom_cache, engine.load_splits(mtg_run, CacheDataset(phantom_cache))["test"])
    method, graphdefs, models, config = load_trained(mtg_run, stage="teacher")
    assert set(models) == {"encoders", "predictor"}
    summary = evaluate(method, graphdefs, models, test, config.eval, tmp_path / "t", predictions="none", progress=False)
    assert all(row["served"] for row in summary["subsets"]) and summary["mean"]["rows"] == 15
    settings = json.loads((tmp_path / "t" / "eval_settings.json").read_text())
    assert settings["compilations"] + settings["loaded_from_cache"] == 1  # compiled, or loaded from the cache
    method, graphdefs, models, config = load_trained(mtg_run)  # the last stage: the students
    assert set(models) == {"students"}
    summary = evaluate(method, graphdefs, models, test, config.eval, tmp_path / "s", predictions="none", progress=False)
    served = {subset_index(s) for s in ("t1ce", "flair")}
    assert {i for i, row in enumerate(summary["subsets"]) if row["served"]} == served
    settings = json.loads((tmp_path / "s" / "eval_settings.json").read_text())
    assert settings["compilations"] + settings["loaded_from_cache"] == 1
    with pytest.raises(JaxbratsError, match="--stage train: method mind_the_gap has the stages teacher, students"):
        load_trained(mtg_run, stage="train")


def test_cli_eval_of_the_teacher(mtg_run, phantom_cache, tmp_path, capsys):
    from jaxbrats.cli import main

    assert (
        main(
            [
                "eval",
                "--workdir",
                str(mtg_run),
                "--data",
                str(phantom_cache),
                "--out",
                str(tmp_path / "e"),
                "--stage",
                "teacher",
                "--predictions",
                "none",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "15/15 rows" in table  # the teacher serves every subset
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert [row["name"] for row in summary["subsets"]] == list(SUBSET_NAMES)


# --- Table I's "Original Method": students of another run's plain U-Net (teacher_from) ---------------

#: `train --config configs/mind_the_gap_phantom.toml --stage students` made tiny, to match `trained_run`'s U-Net.
TINY_STUDENTS = [
    "model.widths=[8,8,8,8]",
    "model.blocks=[1,1,1,1]",
    "data.crop_size=[16,16,16]",
    "data.split_ratios=[0.67,0.0,0.33]",
    "data.workers=0",
    "stages.students.steps=2",
    "method.students=['t1ce']",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.progress=false",
    "eval.window=[16,16,16]",
    "eval.bucket_multiple=8",
]


def test_students_of_a_baseline_run_train_in_a_fresh_workdir(trained_run, phantom_cache, tmp_path):
    """The contract: `jaxbrats train --config configs/mind_the_gap_phantom.toml --stage students
    --set method.teacher_from='"RUN_DIR"'`, RUN_DIR a baseline run's work directory, in a fresh work
    directory (no teacher stage); the baseline's U-Net is the frozen teacher, its sigmoid region head
    read in the students' label convention; the students then evaluate."""
    from jaxbrats.cli import main

    workdir = tmp_path / "original"
    args = [
        "train",
        "--config",
        str(ROOT / "configs" / "mind_the_gap_phantom.toml"),
        "--workdir",
        str(workdir),
        "--data",
        str(phantom_cache),
        "--stage",
        "students",
        "--set",
        f'method.teacher_from="{trained_run}"',
    ]
    assert main(args + [a for s in TINY_STUDENTS for a in ("--set", s)]) == 0
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["students"]
    students = _checkpoint(workdir, "students")
    assert set(students["models"]) == {"teacher", "students"} and set(students["opt"]) == {"students"}
    baseline = _checkpoint(trained_run, "train")["models"]["unet"]
    for a, b in zip(jax.tree.leaves(baseline), jax.tree.leaves(students["models"]["teacher"]), strict=True):
        np.testing.assert_array_equal(a, b)  # the baseline's U-Net, frozen
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    kd = [r["t1ce/kd"] for r in rows if "t1ce/kd" in r]
    assert len(kd) == 2 and all(np.isfinite(v) and v > 0 for v in kd)

    method, graphdefs, models, config = load_trained(workdir)
    assert method.stages == ("students",) and method.teacher_run().output == "regions"
    test = CacheDataset(phantom_cache, engine.load_splits(workdir, CacheDataset(phantom_cache))["test"])
    summary = evaluate(method, graphdefs, models, test, config.eval, tmp_path / "e", predictions="none", progress=False)
    assert [i for i, row in enumerate(summary["subsets"]) if row["served"]] == [subset_index("t1ce")]


def test_a_teacher_from_run_is_read_in_the_students_convention(trained_run, tmp_path):
    config = mtg_config(*TINY_STUDENTS, f"method.teacher_from='{trained_run}'")
    method = get_method("mind_the_gap")(config)
    run = method.teacher_run()
    assert (run.checkpoints, run.model, run.output) == (trained_run / "checkpoints" / "train", "unet", "regions")
    same = get_method("mind_the_gap")(
        mtg_config(*TINY_STUDENTS, f"method.teacher_from='{trained_run}/checkpoints/train'")
    )
    assert same.teacher_run() == run  # a checkpoints/<stage> folder names the same run
    models = method.init_models("students", nnx.Rngs(0))
    assert set(models) == {"teacher", "students"} and "encoders" not in method.families("students")
    image = jnp.asarray(synthetic_batch(8)["image"])
    mask = jnp.asarray([False, True, False, False])
    out = method.teacher_view_output(models, {"image": image}, mask)  # the teacher on T1ce alone, zero-filled
    regions = models["teacher"](image.at[..., jnp.asarray([0, 2, 3])].set(0.0))["logits"]
    np.testing.assert_allclose(out["logits"], label_logits_from_region_logits(regions), rtol=1e-5, atol=1e-5)
    method._teacher_run = dataclasses.replace(run, output="labels")  # a "labels" baseline: used as it is
    plain = method.teacher_view_output(models, {"image": image}, mask)["logits"]
    np.testing.assert_allclose(plain, regions, rtol=1e-6)  # (the head's values, whatever their width)


def test_a_bad_teacher_from_is_one_line(trained_run, tmp_path):
    def refusal(path, *extra):
        method = get_method("mind_the_gap")(mtg_config(*TINY_STUDENTS, *extra, f"method.teacher_from='{path}'"))
        with pytest.raises(ConfigError) as e:
            method.teacher_run()
        assert "\n" not in str(e.value) and str(e.value).startswith("method.teacher_from: ")
        return str(e.value)

    assert "neither a run's work directory" in refusal(tmp_path / "nowhere")
    assert "model.widths = (8, 8, 8, 8), this run's (8, 16, 8, 8)" in refusal(trained_run, "model.widths=[8,16,8,8]")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"method": {"name": "acdis"}, "model": {"widths": [8, 8, 8, 8]}}))
    assert "is a run of method acdis; the teacher must be the plain U-Net of a baseline or rirn run" in refusal(other)


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
    with pytest.raises(ConfigError, match=r"method.mix_sum must exceed 4 x method.mix_floor = 0.4, got 0.4"):
        mtg_config("method.mix_sum=0.4")
    with pytest.raises(ConfigError, match="method.teacher_inference must be one of"):
        mtg_config("method.teacher_inference='vote'")
    with pytest.raises(ConfigError, match="method.mix_target must be one of"):
        mtg_config("method.mix_target='mean'")
    with pytest.raises(ConfigError, match="clip_norm must be 0"):
        mtg_config("stages.students.optimizers.students.clip_norm=1.0")
    with pytest.raises(ConfigError, match="discriminator.clip_norm must be 0: .*stacked discriminators"):
        mtg_config("stages.students.optimizers.discriminator.clip_norm=1.0")
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['train'\]"):
        mtg_config("stages.train.steps=3")
    assert mtg("method.students='all'").subsets == tuple(range(15))
    assert [u.group for u in mtg("method.kd='smunet'").updates("students")] == ["students", "discriminator"]


def test_the_phantom_configs_weight_rate_serves_every_table_iv_anchor():
    """configs/mind_the_gap_phantom.toml gives the P_mix weights their own rate; the other anchors
    have no weights, and their rows run from the same file."""
    from pathlib import Path

    from jaxbrats import engine

    path = Path(__file__).resolve().parents[1] / "configs" / "mind_the_gap_phantom.toml"
    for anchor in ("mix", "none", "normal", "modality"):
        method = get_method("mind_the_gap")(load_config(path, [f"method.anchor='{anchor}'"]))
        assert ("mix" in method.optimizer("teacher", "teacher").model_lr) == (anchor == "mix")
        engine.stage_optimizers(method, "teacher", 10)  # refused before: model_lr names an untrained model


def test_a_student_run_refuses_a_subset_no_student_serves():
    method = mtg("method.students=['t1ce']")
    models = method.init_models("students", nnx.Rngs(0))
    image, mask = jnp.zeros((1, 16, 16, 16, 4)), jnp.ones((1, 4), bool)
    with pytest.raises(JaxbratsError, match="mind_the_gap has no student for flair .*its students: t1ce"):
        method.predict(models, image, mask, subset_index("flair"))
    traced = jax.jit(lambda s: method.predict(models, image, mask, s))
    assert np.isnan(np.asarray(traced(jnp.int32(subset_index("flair"))))).all()  # never student 0's output
    assert np.isfinite(np.asarray(traced(jnp.int32(subset_index("t1ce"))))).all()
