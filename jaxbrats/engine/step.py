"""The train step of a stage: the method's updates in order, their gradients and metrics; compiled once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxbrats.engine.state import trainable_part
from jaxbrats.errors import ConfigError
from jaxbrats.methods import Method
from jaxbrats.runtime import compilation
from jaxbrats.runtime.sharding import replicated, state_shardings


def _loss_output(out):
    """A loss returns (loss, parts) or (loss, parts, shared step context)."""
    loss, parts, *shared = out
    return loss, (parts, shared[0] if shared else {})


def make_train_step(method: Method, stage: str, graphdefs: dict, optimizers: dict):
    """The pure train step ``(state, batch) -> (state, metrics)``, to be jitted once.

    The updates run in order; each sees the models as the updates before it left
    them and the *step context*: the step number ("step", counted from 0 in the
    stage) and what earlier updates shared (their third output), with gradients
    stopped. Metrics are named ``<group>/<part>`` when a stage has
    several updates (no group name is special to the engine). With
    `train.grad_norms`, each named loss term an update logs also gets
    ``grad_norm/<term>``: the norm of that term's own gradient over the update's
    trainable variables (`term_grad_norms`).
    """
    updates = method.updates(stage)
    wanted = tuple(method.config.train.grad_norms)

    def step(state, batch):
        step.traces += 1  # runs at trace time only (XLA compilations: `jaxbrats.runtime.compilation`)
        models = dict(state["models"])
        opt = dict(state["opt"])
        key = jax.random.fold_in(state["key"], state["step"])
        metrics, context = {}, {"step": state["step"]}  # a ramp (SMU-Net's consistency) reads the step
        found = set()
        for i, update in enumerate(updates):
            split = {n: trainable_part(models[n], f) for n, f in update.trainable.items()}
            frozen = {n: s[1] for n, s in split.items()}

            def loss_fn(trainable, models=models, context=context, update=update, i=i):
                live = {
                    n: nnx.merge(g, trainable[n], frozen[n]) if n in trainable else nnx.merge(g, models[n])
                    for n, g in graphdefs.items()
                }
                return _loss_output(update.loss(live, batch, jax.random.fold_in(key, i), context))

            trainable = {n: s[0] for n, s in split.items()}
            (loss, (parts, shared)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
            prefix = "" if len(updates) == 1 else f"{update.group}/"
            terms = [t for t in wanted if t in parts]
            if terms:  # before this update changes the models: the gradients `grads` was taken with
                norms = term_grad_norms(lambda t, loss_fn=loss_fn: loss_fn(t)[1][0], trainable, terms)
                metrics.update({f"{prefix}grad_norm/{t}": v for t, v in norms.items()})
                found.update(terms)
            context = {**context, **jax.lax.stop_gradient(shared)}
            changes, opt[update.group] = optimizers[update.group].update(grads, opt[update.group], trainable)
            trainable = optax.apply_updates(trainable, changes)
            for n in trainable:
                models[n] = nnx.merge_state(trainable[n], frozen[n])
            metrics[prefix + "loss"] = loss
            metrics.update({prefix + k: v for k, v in parts.items()})
            metrics[prefix + "grad_norm"] = optax.tree.norm(grads)
        missing = [t for t in wanted if t not in found]
        if missing:  # a typo for a one-stage method; another stage's term (M3AE's consistency) otherwise
            logged = sorted({k.split("/")[-1] for k in metrics if "grad_norm" not in k})
            step.unlogged = (
                f"train.grad_norms: {', '.join(missing)} is not a loss term of stage {stage} "
                f"(its logged terms: {', '.join(logged)})"
            )
            if len(method.stages) == 1:
                raise ConfigError(step.unlogged)
        new_state = {"models": models, "opt": opt, "step": state["step"] + 1, "key": state["key"]}
        return new_state, metrics

    step.traces = 0
    step.unlogged = ""  # set at trace time: requested gradient norms this stage does not have
    step.__name__ = step.__qualname__ = step_name(stage)  # JAX reports its compilations as jit(<name>)
    return step


def term_grad_norms(parts_fn, trainable, terms: list[str]) -> dict:
    """{term: the global norm of d part[term] / d trainable}: one reverse pass per term over one
    shared forward pass (`jax.jacrev` of the terms as a vector). A term is taken as the loss logs it,
    before its weight in the total (RIRN's CRR before `crr_weight`)."""
    jac = jax.jacrev(lambda t: jnp.stack([jnp.asarray(parts_fn(t)[name], jnp.float32) for name in terms]))(trainable)
    squares = sum(
        jnp.sum(jnp.square(leaf.astype(jnp.float32)), axis=tuple(range(1, leaf.ndim))) for leaf in jax.tree.leaves(jac)
    )
    return {name: jnp.sqrt(squares[k]) for k, name in enumerate(terms)}


def loss_keys(method: Method, stage: str) -> list[str]:
    """The metric names of each update group's loss (``loss``, or ``<group>/loss`` for several)."""
    groups = [u.group for u in method.updates(stage)]
    return ["loss"] if len(groups) == 1 else [f"{g}/loss" for g in groups]


def step_name(stage: str) -> str:
    return f"train_step_{stage}"


def compile_step(step_fn, state, batch, mesh, families) -> tuple:
    """(the step compiled ahead of time for these shapes, ``{"compiled": n, "loaded": n}``: its XLA
    compilations and loads from the persistent compilation cache, `jaxbrats.runtime.compilation`).

    A batch of other shapes is then refused, never compiled again. The state is donated; the new
    state keeps the input state's shardings (`families`' members stay split along "model"); the
    metrics come back replicated.
    """
    compilation.watch()
    before = compilation.counts(step_fn.__name__)
    shardings = state_shardings(state, mesh, families)
    jitted = jax.jit(step_fn, donate_argnums=0, out_shardings=(shardings, replicated(mesh)))
    with jax.set_mesh(mesh):  # layers see whether the depth is split (networks.layers.space_shards)
        compiled = jitted.lower(state, batch).compile()
    after = compilation.counts(step_fn.__name__)
    return compiled, {k: after[k] - before[k] for k in ("compiled", "loaded")}
