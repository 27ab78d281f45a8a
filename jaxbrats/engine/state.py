"""The train state: models split from their NNX graphs, optimiser states, step and key.

Also its abstract templates (ShapeDtypeStructs, nothing initialised), which restores read into.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbrats.methods import Method


def trainable_part(state: nnx.State, trainable_filter):
    return nnx.split_state(state, trainable_filter, ...)


def optimizer_states(method: Method, stage: str, optimizers: dict, models: dict, init=None) -> dict:
    """One optax state per update group, over the variables that group trains."""
    init = init or (lambda opt, params: opt.init(params))
    opt = {}
    for update in method.updates(stage):
        trainable = {n: trainable_part(models[n], f)[0] for n, f in update.trainable.items()}
        opt[update.group] = init(optimizers[update.group], trainable)
    return opt


def init_models(method: Method, stage: str, seed: int, compiled: bool | None = None):
    """(graph definitions, model states) of a stage's fresh models.

    `compiled` (default: on an accelerator): one compiled program draws every value, the same keys
    through the same initialisers as op by op (tested), instead of each initialiser of each shape
    compiled and dispatched on its own (about 30 s for the papers' networks on a GPU, whatever the
    crop: no parameter depends on it). On CPU op by op stays the default: its small per-op programs
    are reused by every later model of a process (the test suite builds hundreds), where each new
    model would otherwise compile a program of its own.
    """
    if compiled is None:
        compiled = jax.default_backend() != "cpu"
    graphdefs = {}

    def fresh_models():  # the name the compile logs show
        states = {}
        for name, model in method.init_models(stage, nnx.Rngs(seed)).items():
            graphdefs[name], states[name] = nnx.split(model)
        return states

    if not compiled:
        return graphdefs, fresh_models()
    lowered = jax.jit(fresh_models).lower()
    # XLA:CPU's LLVM optimisation of the hundreds of random-number fusions is most of the compile
    # (the baseline's U-Net on a loaded 2-core CPU: 44.5 s optimised, 5.4 s not; it runs once).
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return graphdefs, lowered.compile(compiler_options=options)()


def init_state(method: Method, stage: str, seed: int, optimizers: dict, previous: dict | None = None):
    """(graph definitions, train state) of a stage; `previous` models are carried over."""
    graphdefs, states = init_models(method, stage, seed)
    if previous:
        states = method.carry(stage, states, previous)
    opt = optimizer_states(method, stage, optimizers, states)
    state = {"models": states, "opt": opt, "step": jnp.zeros((), jnp.int32), "key": jax.random.PRNGKey(seed)}
    return graphdefs, state


def abstract_models(method: Method, stage: str, names: tuple[str, ...] | None = None):
    """(graph definitions, model states of ShapeDtypeStructs) of a stage's models (`names`: only
    those), nothing initialised."""
    abstract = nnx.eval_shape(lambda: method.init_models(stage, nnx.Rngs(0)))
    graphdefs, states = {}, {}
    for name, model in abstract.items():
        if names is None or name in names:
            graphdefs[name], states[name] = nnx.split(model)
    return graphdefs, states


def abstract_state(method: Method, stage: str, optimizers: dict):
    """(graph definitions, train state of ShapeDtypeStructs): a restore template, nothing initialised."""
    graphdefs, states = abstract_models(method, stage)
    opt = optimizer_states(method, stage, optimizers, states, lambda o, p: jax.eval_shape(o.init, p))
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    return graphdefs, {"models": states, "opt": opt, "step": jax.ShapeDtypeStruct((), jnp.int32), "key": key}
