"""ACDIS: the MFSB against a numpy reference of eqs. 5-9 (per-modality weights, zeros for missing
modalities), the stacked mono encoders = four separate encoders, eq. 12's terms (its six
segmentation outputs each recomputed, `term_reduce` against a hand reduction), the schedule's
start epochs and what an epoch is, no gradient into E_aux through ACCT, L_syn's gradient options
(each cuts its own path) and one MFSB pass per step, inference without the auxiliary parts, exact
resume, one compilation for training and for the 15-subset evaluation, every ablation switch and
its parameter count, AFEB's head count checked with the config, a step split along "space" and
"model" equal to one device's (a subprocess with 4 fake CPU devices).

The ACCT, distillation and synthesis losses themselves are checked against numpy in
test_consistency_losses.py; RFNet's criterion in test_losses.py.
"""

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, run_on_cpu_devices
from flax import nnx
from helpers import synthetic_batch

from jaxbrats import engine
from jaxbrats.cli import main
from jaxbrats.config import ConfigError
from jaxbrats.data.cache import CacheDataset
from jaxbrats.evaluation.program import evaluate
from jaxbrats.inference.trained import load_trained
from jaxbrats.losses.consistency import acct_loss
from jaxbrats.losses.segmentation import rfnet_loss
from jaxbrats.methods import get_method, load_config
from jaxbrats.methods.acdis import INFERENCE_MODELS
from jaxbrats.modalities import MODALITIES
from jaxbrats.networks import family
from jaxbrats.networks.acdis import AFEB, MFSB, FeatureCompletion, MonoEncoder, mfsb_forward, shared_pass
from jaxbrats.networks.factory import unet_config

M = len(MODALITIES)
#: A 2-level 8-channel backbone for every encoder and decoder, the mono encoders vmapped (one copy
#: of their program to compile); the schedule starts at step 2 (an epoch: one pass over the
#: training split, 2 steps).
ACDIS = TINY + [
    "method.name='acdis'",
    "model.widths=[8,8]",
    "model.blocks=[1,1]",
    "model.family_map='vmap'",
    "method.acct_start_epoch=0",
    "method.synthesis_start_epoch=1",
    "method.iterations_per_epoch=0",
    "stages.train.steps=4",
]
BRATS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "acdis_brats2020.toml"
STEPS_PER_EPOCH = 2


def acdis_config(*extra):
    return load_config(None, ACDIS + list(extra))


def acdis(*extra):
    method = get_method("acdis")(acdis_config(*extra))
    method.steps_per_epoch = STEPS_PER_EPOCH  # what `setup` derives from the training cases
    return method


@pytest.fixture(scope="module")
def built():
    """(method, its models) of the config above, made once: the tests that take them only read them."""
    method = acdis()
    return method, method.init_models("train", nnx.Rngs(0))


def built_with(built, *extra):
    """`built` when the settings `extra` leave the method's options and model as they are (e.g. a
    default set again), else a method and models made anew."""
    method = acdis(*extra)
    if method.options == built[0].options and method.config.model == built[0].config.model:
        return built
    return method, method.init_models("train", nnx.Rngs(0))


def batch_with_masks(seed, masks=((True, False, True, False), (False, False, False, True))):
    batch = jax.tree.map(jnp.asarray, synthetic_batch(seed))
    return {**batch, "modality_mask": jnp.asarray(masks)[:, None]}


def context(step):
    return {"step": jnp.asarray(step, jnp.int32)}


# --- MFSB: eqs. 5-9 ---------------------------------------------------------------------------------


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def mfsb_reference(f_ava, p):
    """Eqs. 5-9 for each target modality m, float64; f_ava (N, D, H, W, M*C)."""
    out = []
    for m in range(M):
        gap = f_ava.mean(axis=(1, 2, 3))  # (N, 4C)
        prior = sigmoid(gap @ p["w1"][m] + p["b1"][m])  # eq. 5
        cha = (f_ava * prior[:, None, None, None, :]) @ p["w2"][m] + p["b2"][m]  # eq. 6
        alpha = sigmoid(cha @ p["w3"][m] + p["b3"][m])  # eq. 7
        beta = sigmoid(cha @ p["w4"][m] + p["b4"][m])  # eq. 8
        out.append((1 + alpha) * cha + beta)  # eq. 9
    return np.stack(out)


def random_mfsb(channels, seed=0):
    block = MFSB(channels, M, "float32", nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    params = {}
    for name in ("w1", "b1", "w2", "b2", "w3", "b3", "w4", "b4"):
        value = rng.normal(size=getattr(block, name)[...].shape) * 0.3  # nonzero biases too
        getattr(block, name)[...] = jnp.asarray(value, jnp.float32)
        params[name] = value
    return block, params


def test_mfsb_is_eqs_5_to_9_with_one_set_of_weights_per_modality():
    c = 3
    block, params = random_mfsb(c)
    f_ava = np.random.default_rng(1).normal(size=(2, 4, 4, 2, M * c))
    out = np.asarray(block(jnp.asarray(f_ava, jnp.float32)))
    assert out.shape == (M, 2, 4, 4, 2, c)
    np.testing.assert_allclose(out, mfsb_reference(f_ava, params), rtol=2e-5, atol=2e-5)
    for m in range(1, M):  # per-modality weights: four different syntheses of one input
        assert np.abs(out[m] - out[0]).max() > 1e-3


def test_completion_fills_missing_slots_from_the_present_features_only():
    c = 3
    block, params = random_mfsb(c, seed=2)
    completion = FeatureCompletion((c,), M, True, unet_config(acdis_config(), 4), nnx.Rngs(0))
    completion.blocks[0] = block
    rng = np.random.default_rng(3)
    f = rng.normal(size=(M, 2, 4, 4, 2, c))
    mask = np.array([[True, False, True, False], [False, False, False, True]])
    comp, _ = completion([jnp.asarray(f, jnp.float32)], jnp.asarray(mask))
    comp = np.asarray(comp[0]).reshape(2, 4, 4, 2, M, c)
    for n in range(2):
        f_ava = np.concatenate([f[m, n] * mask[n, m] for m in range(M)], axis=-1)  # zeros where missing
        expected = mfsb_reference(f_ava[None], params)[:, 0]
        for m in range(M):
            want = f[m, n] if mask[n, m] else expected[m]
            np.testing.assert_allclose(comp[n, ..., m, :], want, rtol=2e-5, atol=2e-5)
    # the schedule's switch off: the missing slots stay zero, the present ones unchanged
    off = np.asarray(completion([jnp.asarray(f, jnp.float32)], jnp.asarray(mask), synthesise=False)[0][0]).reshape(
        comp.shape
    )
    np.testing.assert_allclose(off[0, ..., 1, :], 0.0)
    np.testing.assert_allclose(off[0, ..., 0, :], f[0, 0], rtol=1e-6)


def test_without_mfsb_a_convolution_fills_the_missing_slots():
    """`mfsb_conv = "fill"`: a 3x3x3 convolution 4C -> C of f_ava in each missing slot, the present
    slots kept; "full": a 4C -> 4C convolution of f_ava is all of f_comp."""
    c = 3
    cfg = unet_config(acdis_config(), 4)
    rng = np.random.default_rng(5)
    f = jnp.asarray(rng.normal(size=(M, 2, 4, 4, 2, c)), jnp.float32)
    mask = np.array([[True, False, True, False], [False, False, False, True]])
    f_ava = np.concatenate([np.asarray(f[m]) * mask[:, m, None, None, None, None] for m in range(M)], axis=-1)
    fill = FeatureCompletion((c,), M, False, cfg, nnx.Rngs(0))
    assert fill.blocks[0].kernel.shape == (3, 3, 3, M * c, c)
    comp, synthesised = fill([f], jnp.asarray(mask))
    assert synthesised is None
    conv = np.asarray(fill.blocks[0](jnp.asarray(f_ava)))
    comp = np.asarray(comp[0]).reshape(2, 4, 4, 2, M, c)
    for n, m in np.ndindex(2, M):
        want = np.asarray(f[m, n]) if mask[n, m] else conv[n]
        np.testing.assert_allclose(comp[n, ..., m, :], want, rtol=1e-6, atol=1e-6)
    # Before the schedule's synthesis start the missing slots stay zero, as with the MFSB.
    early = np.asarray(fill([f], jnp.asarray(mask), synthesise=jnp.asarray(False))[0][0]).reshape(2, 4, 4, 2, M, c)
    for n, m in np.ndindex(2, M):
        want = np.asarray(f[m, n]) if mask[n, m] else np.zeros_like(conv[n])
        np.testing.assert_allclose(early[n, ..., m, :], want, rtol=1e-6, atol=1e-6)
    full = FeatureCompletion((c,), M, False, cfg, nnx.Rngs(0), conv="full")
    assert full.blocks[0].kernel.shape == (3, 3, 3, M * c, M * c)
    np.testing.assert_allclose(full([f], jnp.asarray(mask))[0][0], full.blocks[0](jnp.asarray(f_ava)), rtol=1e-6)


def test_one_mfsb_pass_gives_the_gradient_of_a_second_pass_on_stopped_features():
    """`shared_pass`: (y, y_w) from one forward pass; y_w's gradient reaches the weights only, as
    a second pass on gradient-stopped features would (what L_syn with syn_grad_encoders = false reads)."""
    c = 3
    block, _ = random_mfsb(c, seed=4)
    weights = block.weights()
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(2, 4, 4, 2, M * c)), jnp.float32)
    r1, r2 = (jnp.asarray(rng.normal(size=(M, 2, 4, 4, 2, c)), jnp.float32) for _ in range(2))

    def shared(w, x):
        y, y_w = shared_pass(lambda w, x: mfsb_forward(w, x, jnp.float32), w, x)
        return jnp.sum(y * r1) + jnp.sum(jnp.square(y_w) * r2)

    def twice(w, x):
        y, y_w = mfsb_forward(w, x, jnp.float32), mfsb_forward(w, jax.lax.stop_gradient(x), jnp.float32)
        return jnp.sum(y * r1) + jnp.sum(jnp.square(y_w) * r2)

    (got, got_grads), (want, want_grads) = (jax.value_and_grad(f, argnums=(0, 1))(weights, x) for f in (shared, twice))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    y, y_w = block.two_heads(x)
    np.testing.assert_array_equal(y, y_w)
    np.testing.assert_array_equal(y, block(x))


# --- the mono encoders -----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["vmap", "unroll"])
def test_stacked_mono_encoders_equal_four_separate_encoders(how, built):
    method, models = built_with(built, f"model.family_map='{how}'")
    assert family.size(models["mono"]) == M and method.families("train") == {"mono": M}
    image = jnp.asarray(synthetic_batch(0)["image"])
    stacked = jax.jit(lambda x: method.encode(models, x))(image)
    for m in range(M):
        alone = family.member(models["mono"], m)(image[..., m : m + 1])
        for key in ("raw", "enhanced"):
            for level in range(2):
                np.testing.assert_allclose(stacked[key][level][m], alone[key][level], rtol=1e-5, atol=1e-5)
    # member m is the encoder made from its own key
    root = jax.random.split(nnx.Rngs(0).params(), 6)[0]
    own = MonoEncoder(
        unet_config(method.config, 4, in_channels=1), method.afeb_levels, True, nnx.Rngs(jax.random.fold_in(root, 2))
    )
    np.testing.assert_array_equal(own.encoder.stem.kernel[...], models["mono"].encoder.stem.kernel[...][2])


# --- the objective ------------------------------------------------------------------------------------------


def hand_completion(models, features, mask):
    """f_comp per level, built here from the pieces (docs/methods/acdis.md): f_ava = the present
    modalities' enhanced features, zeros elsewhere; the level's MFSB on it; each missing slot takes
    its synthesis, each present slot its own feature. Returns (f_comp, f_hat) per level."""
    present = [mask[:, m].reshape(-1, 1, 1, 1, 1) for m in range(M)]
    comp, synthesised = [], []
    for block, f in zip(models["completion"].blocks, features):
        f_hat = block(jnp.concatenate([jnp.where(present[m], f[m], 0.0) for m in range(M)], axis=-1))
        comp.append(jnp.concatenate([jnp.where(present[m], f[m], f_hat[m]) for m in range(M)], axis=-1))
        synthesised.append(f_hat)
    return comp, synthesised


def test_the_loss_is_eq12_with_six_segmentation_outputs(built):
    """Eq. 12 = L_seg's six outputs (each recomputed from its decoder here) + L_ACCT + L_syn; L_ACCT
    and L_syn reduced over their per-term values as `term_reduce` says: "mean" averages ACCT over
    (level, modality) and L_syn over levels, "sum" sums them (L_syn is a mean over the missing
    modalities either way)."""
    method, models = built
    summed = acdis("method.term_reduce='sum'")  # the same models: the option changes no parameter
    batch = batch_with_masks(1)
    levels = len(method.config.model.widths)

    @jax.jit
    def both(batch):
        key, ctx = jax.random.PRNGKey(0), context(3)
        loss, parts, _ = method.loss(models, batch, key, ctx)
        loss_sum, parts_sum, _ = summed.loss(models, batch, key, ctx)
        image, label, valid, mask = batch["image"], batch["label"], batch["valid"], batch["modality_mask"][:, 0]
        mono = method.encode(models, image)
        seg_mono = sum(
            rfnet_loss(models["aux_decoder"]([f[m] for f in mono["raw"]])[0], label, valid)[0] for m in range(M)
        )
        aux = models["aux_encoder"](image)
        seg_aux = rfnet_loss(models["fuse_decoder"]([jnp.concatenate([a] * M, axis=-1) for a in aux]), label, valid)[0]
        comp, synthesised = hand_completion(models, mono["enhanced"], mask)
        seg_fuse = rfnet_loss(models["fuse_decoder"](comp), label, valid)[0]
        # ACCT per (level, modality): each modality's feature against E_aux's alone (4^3 windows).
        acct = [[acct_loss(f[m], a, 4, 4) for m in range(M)] for f, a in zip(mono["enhanced"], aux)]
        acct = jnp.asarray([[t["var"] + t["covar"] for t in row] for row in acct])  # (levels, M)
        hand = {"seg_mono": seg_mono, "seg_aux": seg_aux, "seg_fuse": seg_fuse, "acct": acct}
        return loss, parts, loss_sum, parts_sum, hand, synthesised, mono["enhanced"]

    loss, parts, loss_sum, parts_sum, hand, synthesised, features = both(batch)
    for name in ("seg_mono", "seg_aux", "seg_fuse"):
        np.testing.assert_allclose(float(parts[name]), float(hand[name]), rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(float(parts_sum[name]), float(hand[name]), rtol=1e-4, err_msg=name)
    assert float(parts["acct_on"]) == 1.0 and float(parts["synthesis_on"]) == 1.0
    np.testing.assert_allclose(float(parts["distill"]), float(parts["var"] + parts["covar"]), rtol=1e-5)
    # L_syn per level by hand: the squared error of f_hat against f over the missing (modality,
    # sample) pairs, / their number of elements (the text's MSE).
    missing = ~np.asarray(batch["modality_mask"][:, 0]).T  # (M, N)
    syn = np.asarray(
        [
            np.sum(np.square(np.asarray(h, np.float64) - np.asarray(f, np.float64))[missing])
            / (missing.sum() * f[0, 0].size)
            for h, f in zip(synthesised, features)
        ]
    )
    acct = np.asarray(hand["acct"], np.float64)
    assert acct.shape == (levels, M) and syn.shape == (levels,)
    for got, reduce in ((parts, np.mean), (parts_sum, np.sum)):
        np.testing.assert_allclose(float(got["distill"]), reduce(acct), rtol=1e-5)
        np.testing.assert_allclose(float(got["syn"]), reduce(syn), rtol=1e-5)
    for got, value in ((parts, loss), (parts_sum, loss_sum)):
        total = got["seg_mono"] + got["seg_aux"] + got["seg_fuse"] + got["distill"] + got["syn"]
        np.testing.assert_allclose(float(value), float(total), rtol=1e-5)
    assert float(loss_sum) > float(loss) + 1.0  # the sum weighs L_ACCT 8x here: a visible difference


def test_the_start_epochs_switch_the_terms_on_without_recompiling():
    method = acdis("method.acct_start_epoch=1", "method.synthesis_start_epoch=2")
    models = method.init_models("train", nnx.Rngs(0))
    batch = batch_with_masks(2)
    graphdef, completion = nnx.split(models["completion"])

    def loss(state, step):
        return method.loss(
            {**models, "completion": nnx.merge(graphdef, state)}, batch, jax.random.PRNGKey(0), context(step)
        )[:2]

    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    seen = []
    for step in (0, 2, 4):  # epochs 0, 1, 2
        (value, parts), grads = run(completion, step)
        seen.append(
            (
                float(parts["acct_on"]),
                float(parts["synthesis_on"]),
                max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)),
            )
        )
        expected = parts["seg_mono"] + parts["seg_aux"] + parts["seg_fuse"]
        expected = expected + parts["distill"] * parts["acct_on"] + parts["syn"] * parts["synthesis_on"]
        np.testing.assert_allclose(float(value), float(expected), rtol=1e-5)
    assert [s[:2] for s in seen] == [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)]
    assert seen[0][2] == 0.0 and seen[1][2] == 0.0 and seen[2][2] > 0.0  # MFSB learns from its start only
    assert run._cache_size() == 1  # the step is data: one program


def test_no_gradient_reaches_the_auxiliary_encoder_through_acct(built):
    method, models = built
    image = batch_with_masks(3)["image"]
    aux_graph, aux_state = nnx.split(models["aux_encoder"])
    mono_graph, mono_state = nnx.split(models["mono"])

    def distill(aux_s, mono_s):
        live = {**models, "aux_encoder": nnx.merge(aux_graph, aux_s), "mono": nnx.merge(mono_graph, mono_s)}
        return method.distillation(method.encode(live, image), live["aux_encoder"](image))[0]

    to_aux, to_mono = jax.jit(jax.grad(distill, argnums=(0, 1)))(aux_state, mono_state)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(to_aux))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(to_mono)) > 0.0


@pytest.mark.parametrize(
    "settings, to_mono",
    [
        (["method.syn_grad_target=false"], True),  # through f_ava only: what syn_grad_encoders decides
        (["method.syn_grad_encoders=false", "method.syn_grad_target=false"], False),
    ],
)
def test_the_synthesis_losses_gradient_reaches_the_encoders_unless_switched_off(settings, to_mono):
    """With f_m a fixed label (`syn_grad_target = false`) the synthesis losses reach the mono
    encoders' parameters through the MFSB's input f_ava alone: `syn_grad_encoders` decides whether
    they do (the defaults' two paths: the next test); either way they train the MFSB."""
    method = acdis("method.synthesis=['syn','var','covar']", *settings)
    models = method.init_models("train", nnx.Rngs(0))
    batch = batch_with_masks(8)
    graphs = {name: nnx.split(models[name]) for name in ("mono", "completion")}

    def synthesis(states):
        live = {**models, **{n: nnx.merge(graphs[n][0], s) for n, s in states.items()}}
        return method.loss(live, batch, jax.random.PRNGKey(0), context(4))[1]["synthesis"]

    grads = jax.jit(jax.grad(synthesis))({n: g[1] for n, g in graphs.items()})
    assert (max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["mono"])) > 0.0) == to_mono
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["completion"])) > 0.0


SYN_PATHS = {  # (syn_grad_encoders, syn_grad_target) -> settings
    (True, True): [],  # the defaults: eq. 12's plain sum
    (True, False): ["method.syn_grad_target=false"],
    (False, True): ["method.syn_grad_encoders=false"],
    (False, False): ["method.syn_grad_encoders=false", "method.syn_grad_target=false"],
}


def test_each_synthesis_gradient_option_cuts_its_own_path(built):
    """The synthesis losses' gradient w.r.t. the enhanced mono features (what the mono encoders
    receive: zero there is zero for every encoder parameter), through the method's loss: it has
    two paths, into the MFSB's input f_ava (`syn_grad_encoders`) and into the target f_m
    (`syn_grad_target`); each option cuts its own, so the defaults' gradient is the sum of the two
    one-path gradients, and with both off none is left."""
    _, models = built  # these options change no parameter
    batch = batch_with_masks(8)
    features = jax.jit(lambda x: built[0].encode(models, x))(batch["image"])

    def synthesis_grad(settings):
        method = acdis("method.synthesis=['syn','var','covar']", *settings)

        def synthesis(enhanced):
            method.encode = lambda models, image: {"raw": features["raw"], "enhanced": enhanced}
            return method.loss(models, batch, jax.random.PRNGKey(0), context(4))[1]["synthesis"]

        return jax.grad(synthesis)(features["enhanced"])

    grads = jax.jit(lambda: {path: synthesis_grad(settings) for path, settings in SYN_PATHS.items()})()
    largest = {path: max(float(jnp.abs(g).max()) for g in grads[path]) for path in SYN_PATHS}
    assert largest[(False, False)] == 0.0
    assert all(largest[path] > 1e-4 for path in SYN_PATHS if path != (False, False)), largest
    for both, f_ava, target in zip(grads[(True, True)], grads[(True, False)], grads[(False, True)]):
        np.testing.assert_allclose(both, f_ava + target, rtol=1e-4, atol=1e-6 * largest[(True, True)])
    # the paths differ: neither alone is the whole gradient
    assert float(jnp.abs(grads[(True, False)][0] - grads[(True, True)][0]).max()) > 1e-3 * largest[(True, True)]
    assert float(jnp.abs(grads[(False, True)][0] - grads[(True, True)][0]).max()) > 1e-3 * largest[(True, True)]


def _dot_operand_shapes(jaxpr):
    """The operand shapes of every dot_general in a jaxpr and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(sorted(tuple(v.aval.shape) for v in eqn.invars)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found.extend(_dot_operand_shapes(inner))
    return found


@pytest.mark.parametrize("to_encoders", [True, False])
def test_the_mfsb_runs_once_per_step(to_encoders, built):
    """The train step's gradient program has one eq. 5 product GAP(f_ava) W1 per level: f_comp and the
    synthesis losses share the MFSB's pass, whichever way L_syn's gradient goes."""
    method, models = built_with(built, f"method.syn_grad_encoders={str(to_encoders).lower()}")
    batch = batch_with_masks(9)
    graphs = {name: nnx.split(models[name]) for name in ("mono", "completion")}

    def loss(states):
        live = {**models, **{n: nnx.merge(graphs[n][0], s) for n, s in states.items()}}
        return method.loss(live, batch, jax.random.PRNGKey(0), context(4))[0]

    program = jax.make_jaxpr(jax.value_and_grad(loss))({n: g[1] for n, g in graphs.items()})
    n, widths = batch["image"].shape[0], method.config.model.widths
    eq5 = [tuple(sorted([(n, M * w), (M, M * w, M * w)])) for w in widths]
    found = _dot_operand_shapes(program.jaxpr)
    assert sum(found.count(shapes) for shapes in set(eq5)) == len(widths)


def test_inference_uses_no_auxiliary_part_and_ignores_missing_modalities(built):
    method, models = built
    served = {name: models[name] for name in INFERENCE_MODELS}
    assert set(method.inference_models("train")) == {"mono", "completion", "fuse_decoder"}
    image = batch_with_masks(4)["image"]
    mask = jnp.asarray([True, True, False, False])
    predict = jax.jit(lambda x: method.predict(served, x, mask))
    before = predict(image)
    assert before.shape == image.shape[:4] + (3,)
    np.testing.assert_array_equal(predict(image.at[..., 2:].add(5.0)), before)  # the missing ones change nothing
    assert float(jnp.abs(predict(image.at[..., 0].add(5.0)) - before).max()) > 1e-5


# --- ablation switches ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        [
            "method.afeb=false",
            "method.distill='kl'",
            "method.mfsb=false",
            "method.synthesis=[]",
        ],  # Tables 2 and 3, w/o blocks
        [
            "method.synthesis=['adv','syn','var','covar']",
            "method.syn_norm='l2'",
            "method.acct_pooled=true",
            "method.afeb_levels=[1]",
            "method.distill='mse'",
        ],  # Table 3's losses together
    ],
)
def test_every_ablation_trains_one_step(settings):
    method = acdis("method.synthesis_start_epoch=0", *settings)
    optimizers = engine.stage_optimizers(method, "train", 10)
    graphdefs, state = engine.init_state(method, "train", 0, optimizers)
    adversarial = "adv" in method.options.synthesis
    assert set(state["opt"]) == ({"model", "discriminator"} if adversarial else {"model"})
    step = jax.jit(engine.make_train_step(method, "train", graphdefs, optimizers))
    state, metrics = step(state, batch_with_masks(5))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    if adversarial:
        assert float(metrics["model/adv"]) > 0.0 and float(metrics["discriminator/adv_d"]) > 0.0
    if adversarial:
        assert all(float(metrics[f"model/{k}"]) > 0.0 for k in ("syn", "syn_var", "syn_covar", "mse"))
    else:
        assert "syn" not in metrics and float(metrics["kl"]) > 0.0


def parameter_counts(*settings) -> dict:
    """Parameters per model of the BraTS config with `settings`, from shapes alone (nnx.eval_shape)."""
    method = get_method("acdis")(load_config(BRATS_CONFIG, list(settings)))
    models = nnx.eval_shape(lambda: method.init_models("train", nnx.Rngs(0)))
    return {
        name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        for name, model in models.items()
    }


def test_each_ablation_keeps_the_parameter_count_within_5_percent():
    """The paper replaces a block by a 3x3x3 convolution "to maintain the invariance of parameter
    counts"; our tolerance: 5 % of the full model, counted over every trained model (the models
    that predict + E_aux + D_aux) and over the models that predict alone, at the BraTS config."""
    full = parameter_counts()
    assert set(full) == {*INFERENCE_MODELS, "aux_encoder", "aux_decoder"}
    assert sum(full.values()) == 27_589_032  # README's count

    def totals(counts):
        return sum(counts.values()), sum(counts[name] for name in INFERENCE_MODELS)

    for settings in (
        ["method.afeb=false"],
        ["method.mfsb=false", "method.synthesis=[]"],
        ["method.afeb=false", "method.mfsb=false", "method.synthesis=[]"],
    ):
        for got, want in zip(totals(parameter_counts(*settings)), totals(full)):
            assert abs(got / want - 1) < 0.05, (settings, got, want)
    # the other reading of the MFSB's place, a 4C -> 4C convolution: +27 %
    trained, _ = totals(parameter_counts("method.mfsb=false", "method.synthesis=[]", "method.mfsb_conv='full'"))
    assert trained / sum(full.values()) > 1.25


def test_an_afeb_width_its_heads_do_not_divide_is_a_config_error(tmp_path, capsys):
    """AFEB's C // 16 heads must divide C: 56 channels (3 heads) is refused when the config is read,
    in one line naming model.widths, not in a reshape at the first step."""
    with pytest.raises(ConfigError, match=r"model.widths: AFEB splits a level.s 56 channels into 56 // 16 = 3 "):
        load_config(BRATS_CONFIG, ["model.widths=[16,32,56,128]"])
    load_config(BRATS_CONFIG, ["model.widths=[16,32,48,128]"])  # 3 heads of 16
    load_config(BRATS_CONFIG, ["model.widths=[16,32,56,128]", "method.afeb_levels=[0,1,3]"])  # no AFEB at 56
    load_config(BRATS_CONFIG, ["model.widths=[16,32,56,128]", "method.afeb=false"])
    with pytest.raises(ValueError, match="3 attention heads"):  # the block itself, outside a config
        AFEB(56, 1, unet_config(acdis_config(), 4), nnx.Rngs(0))
    code = main(
        [
            "train",
            "--config",
            BRATS_CONFIG,
            "--workdir",
            tmp_path / "run",
            "--data",
            tmp_path / "cache",
            "--set",
            "model.widths=[16,32,56,128]",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "model.widths: AFEB" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_an_epoch_is_rfnets_150_iterations_unless_set_to_the_data():
    """The schedule's and the stage's epochs: 150 steps by default (RFNet's training script: 500
    epochs = 75,000 steps, synthesis from step 3,000); 0: one pass over the split (219 cases at
    batch 2: 109 steps, synthesis from step 2,180)."""
    config = load_config(BRATS_CONFIG)
    method = get_method("acdis")(config)
    assert method.options.iterations_per_epoch == 150 and method.start_step(20) == 3_000  # no `setup` needed
    method.setup(range(219))
    assert method.start_step(20) == 3_000 and method.stage_length(config, "train", 109) == 75_000
    config = load_config(BRATS_CONFIG, ["method.iterations_per_epoch=0"])
    method = get_method("acdis")(config)
    method.setup(range(219))
    assert method.start_step(20) == 2_180 and method.stage_length(config, "train", 109) == 54_500


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="method.distill must be one of"):
        acdis_config("method.distill='l1'")
    with pytest.raises(ConfigError, match="method.synthesis must be one of"):
        acdis_config("method.synthesis=['gan']")
    with pytest.raises(ConfigError, match=r"method.synthesis must be \[\] with method.mfsb = false"):
        acdis_config("method.mfsb=false")
    with pytest.raises(ConfigError, match=r"method.afeb_levels: no encoder level \[2\]"):
        acdis_config("method.afeb_levels=[2]")
    with pytest.raises(ConfigError, match="method.acct_window must be"):
        acdis_config("method.acct_window=1")
    with pytest.raises(ConfigError, match="class_weights needs seg_loss = 'label'"):
        acdis_config("method.class_weights=[1,1,1,1]")
    with pytest.raises(ConfigError, match=r"method.acct_stride must be 0 \(the window\) or at most method.acct_window"):
        acdis_config("method.acct_stride=5")
    with pytest.raises(ConfigError, match="method.mfsb_conv must be one of"):
        acdis_config("method.mfsb_conv='none'")
    with pytest.raises(ConfigError, match="method.iterations_per_epoch must be"):
        acdis_config("method.iterations_per_epoch=-1")


# --- resume, compilation, evaluation --------------------------------------------------------------------


@pytest.fixture(scope="module")
def acdis_run(phantom_cache, tmp_path_factory):
    """(work directory, trainer) of the config above trained through the engine: 4 steps, checkpoints at 2 and 4."""
    workdir = tmp_path_factory.mktemp("acdis")
    return workdir, engine.train(acdis_config(), workdir, phantom_cache)


def test_trains_and_evaluates_with_one_compilation_each(acdis_run, phantom_cache, tmp_path):
    workdir, trainer = acdis_run
    assert sum(trainer.compilations["train"].values()) == 1  # compiled, or loaded from the suite's cache
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    synthesis = [r["synthesis_on"] for r in rows if "synthesis_on" in r]
    assert synthesis[0] == 0.0 and synthesis[-1] == 1.0  # 4 cases / batch 2: epoch 1 starts at step 2
    test = CacheDataset(phantom_cache, engine.load_splits(workdir, CacheDataset(phantom_cache))["test"])
    method, graphdefs, models, config = load_trained(workdir)
    assert set(models) == set(INFERENCE_MODELS)  # E_aux, D_aux are not loaded
    summary = evaluate(
        method, graphdefs, models, test, config.eval, tmp_path / "eval", predictions="none", progress=False
    )
    assert all(row["served"] for row in summary["subsets"]) and summary["mean"]["rows"] == 15
    settings = json.loads((tmp_path / "eval" / "eval_settings.json").read_text())
    assert settings["compilations"] + settings["loaded_from_cache"] == 1
    assert settings["decoding"] == "argmax"  # RFNet's evaluation, which ACDIS follows


def test_resume_mid_stage_is_bit_for_bit(acdis_run, phantom_cache, tmp_path):
    """Resumed through the engine at step 2 (the synthesis switches on at step 2, after the resume):
    the losses and the final train state are the uninterrupted run's, bit for bit. The run resumed is
    a copy of the uninterrupted one without its checkpoint at step 4: the checkpoint at step 2 is the
    one a run stopped there writes (the same save), without training the first half again; stopping
    itself is tests/test_engine.py's."""
    from test_engine import assert_bitwise_equal, final_state, logged_steps

    whole_dir, whole = acdis_run
    workdir = tmp_path / "run"
    shutil.copytree(whole_dir, workdir)
    shutil.rmtree(workdir / "checkpoints" / "train" / "4")
    rest = engine.train(acdis_config(), workdir, phantom_cache)
    assert [(step, loss) for _, step, loss in rest.losses] == [(step, loss) for _, step, loss in whole.losses[2:]]
    assert [step for _, step, _ in rest.losses] == [3, 4]
    assert logged_steps(workdir) == {"train": [1, 2, 3, 4]}  # the rows after step 2 redone, once
    assert_bitwise_equal(final_state(workdir, acdis_config()), final_state(whole_dir, acdis_config()))


# --- meshes: "space" and "model" --------------------------------------------------------------------------


def test_a_step_split_along_space_and_model_equals_one_devices(tmp_path):
    """Two train steps (SGD) of the config above on a mesh of 4 fake CPU devices, each crop's depth
    split over 2 ("space": halo exchanges) and the four mono encoders over 2 ("model": two per
    device), against one device in the same process (tests/support/acdis_mesh.py): every logged
    term and every parameter agree."""
    script = Path(__file__).resolve().parent / "support" / "acdis_mesh.py"
    run_on_cpu_devices([sys.executable, str(script), str(tmp_path), "2", json.dumps(ACDIS), "1,1,1", "1,2,2"], 4)
    one, split = (json.loads((tmp_path / f"{mesh}.json").read_text()) for mesh in ("1x1x1", "1x2x2"))
    assert one["stem_shard"][0] == M and split["stem_shard"][0] == M // 2 and "model" in split["stem_spec"]
    assert not one["collectives"] and Counter(op for op, _ in split["collectives"])["collective-permute"] > 0
    assert len(one["metrics"]) == len(split["metrics"]) == 2
    for step, (want, got) in enumerate(zip(one["metrics"], split["metrics"])):
        assert set(got) == set(want) and {"seg_fuse", "distill", "syn"} <= set(want)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=f"{key} step {step}")
    with np.load(tmp_path / "1x1x1.npz") as want, np.load(tmp_path / "1x2x2.npz") as got:
        assert set(got.files) == set(want.files) and len(want.files) > 50
        for name in want.files:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)
