"""The training engine: one jitted step per stage, sharded batches, Orbax checkpoints.

How a run goes (`train`):

1. The work directory is locked (one writer), and the resolved config, the
   train/val/test split and the cache's preprocessing settings are written to
   it (`jaxbrats.workdir`); a resumed run reuses the split and may change only
   settings that leave the checkpoints valid (`workdir.RESUMABLE`), recorded in
   ``config_history.jsonl``.
2. For each of the method's stages, in order: if its newest readable
   checkpoint (`checkpoints.restore_newest_readable`) holds the final step,
   the stage is done; if it holds an earlier step, the models, optimiser
   states, step, rng and the Grain iterator state are restored and training
   continues bit for bit as an uninterrupted run; otherwise the stage starts
   from fresh models with the previous stage's variables carried over
   (`Method.carry`), or from `[stages.<name>] init_from`.
3. The train state is a pytree: ``{"models": {name: nnx.State},
   "opt": {group: optax state}, "step": int32, "key": uint32[2]}``, split
   from the NNX graphs once (restore templates are abstract:
   `abstract_state`, no model is initialised to be overwritten).
   `make_train_step` closes over the graph definitions and optimisers; the
   updates of a step run in order and pass a *step context* (what an update
   computed for later ones, without gradient); it is compiled ahead of time for the first
   batch, with the state donated, so a batch of another shape is refused
   rather than compiled again (the compile, or the load from the persistent
   compilation cache, is reported). The step's rng is ``fold_in(key, step)``,
   so a resumed run draws the same numbers. Nothing in the step talks to the host.
4. Batches are placed on the ("data", "model", "space") mesh of
   `jaxbrats.sharding`, split along "data"; the state is placed by the same
   module's rules (family members split along "model", x_sub along
   "space", the rest replicated), and the step keeps those shardings. With
   "space" > 1 each crop's depth is split and the U-Net's convolutions
   exchange halos (`networks.layers.halo_conv3d`).
5. Metrics stay on the device and are fetched every `log_every` steps (one
   transfer), checked for NaN/Inf, written to `metrics.jsonl` and TensorBoard
   (`tensorboard/`). A checkpoint is written only after the steps before it
   were checked, so a diverged run stops with the last good checkpoint.
6. With several processes (`jaxbrats train --distributed`), each reads its
   own share of the cases; process 0 alone writes the work directory's files
   (metrics, TensorBoard, config, splits, reports) and notes; every process
   takes part in each checkpoint, which holds each one's iterator state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from jaxbrats import compilation, processes
from jaxbrats import workdir as workdir_files
from jaxbrats.checkpoints import (
    checkpoint_manager,
    existing_manager,
    iterator_state,
    on_first_device,
    restore_newest_readable,
    save,
)
from jaxbrats.config import Config, OptimizerConfig, to_dict
from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.pipeline import PipelineConfig, make_loader
from jaxbrats.errors import ConfigError, JaxbratsError
from jaxbrats.methods import Method, get_method
from jaxbrats.processes import lead
from jaxbrats.sharding import (
    check_families,
    make_mesh,
    place_batch,
    replicated,
    shard_state,
    state_shardings,
    with_shardings,
)
from jaxbrats.workdir import load_splits  # noqa: F401  (eval and the demo read a run's splits from here)


class TrainingDiverged(JaxbratsError):
    pass


# --- optimisers ------------------------------------------------------------------------

def make_schedule(cfg: OptimizerConfig, total_steps: int):
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps)
    elif cfg.schedule == "poly":
        main = optax.polynomial_schedule(cfg.lr, 0.0, cfg.poly_power, decay_steps)
    else:
        main = optax.constant_schedule(cfg.lr)
    if not cfg.warmup_steps:
        return main
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def _update_rules(cfg: OptimizerConfig, total_steps: int, decay_mask=None) -> list[optax.GradientTransformation]:
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        return [optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask)]
    rule = optax.adam(schedule) if cfg.name == "adam" else optax.sgd(schedule, momentum=cfg.momentum)
    if cfg.weight_decay:  # PyTorch Adam/SGD weight decay: L2 added to the gradient
        return [optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask), rule]
    return [rule]


def _decayed(undecayed: tuple[str, ...]):
    """optax's weight-decay mask: True on every variable but those of the models in `undecayed`."""
    def mask(params):
        return {n: jax.tree.map(lambda _, keep=n not in undecayed: keep, sub) for n, sub in params.items()}
    return mask


def make_optimizer(cfg: OptimizerConfig, total_steps: int, undecayed: tuple[str, ...] = ()) -> optax.GradientTransformation:
    """The optimiser of one update group; its parameters are a dict {model name: state}. Weight
    decay leaves the models named in `undecayed` alone (Mind the Gap's P_mix weights)."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    decay_mask = _decayed(undecayed) if undecayed else None
    if not cfg.model_lr:
        return optax.chain(*parts, *_update_rules(cfg, total_steps, decay_mask))
    # One rule per learning rate, chosen by the top-level model name.
    rates = {"": cfg.lr, **cfg.model_lr}
    rules = {n: optax.chain(*_update_rules(dataclasses.replace(cfg, lr=lr), total_steps, decay_mask))
             for n, lr in rates.items()}

    def labels(params):
        return {n: jax.tree.map(lambda _, n=n: n if n in cfg.model_lr else "", sub) for n, sub in params.items()}

    return optax.chain(*parts, optax.multi_transform(rules, labels))


def stage_optimizers(method: Method, stage: str, total_steps: int) -> dict:
    """One optax optimiser per update group of a stage."""
    out = {}
    for update in method.updates(stage):
        cfg = method.optimizer(stage, update.group)
        unknown = sorted(set(cfg.model_lr) - set(update.trainable))
        if unknown:
            raise ConfigError(f"stages.{stage}.optimizers.{update.group}.model_lr: {', '.join(unknown)} "
                              f"not trained in this group (trained: {', '.join(update.trainable)})")
        out[update.group] = make_optimizer(cfg, total_steps, tuple(method.undecayed(stage, update.group)))
    return out


# --- state and step ----------------------------------------------------------------------

def trainable_part(state: nnx.State, trainable_filter):
    return nnx.split_state(state, trainable_filter, ...)


def _optimizer_states(method: Method, stage: str, optimizers: dict, models: dict, init=None) -> dict:
    """One optax state per update group, over the variables that group trains."""
    init = init or (lambda opt, params: opt.init(params))
    opt = {}
    for update in method.updates(stage):
        trainable = {n: trainable_part(models[n], f)[0] for n, f in update.trainable.items()}
        opt[update.group] = init(optimizers[update.group], trainable)
    return opt


def init_state(method: Method, stage: str, seed: int, optimizers: dict, previous: dict | None = None):
    """(graph definitions, train state) of a stage; `previous` models are carried over."""
    models = method.init_models(stage, nnx.Rngs(seed))
    graphdefs, states = {}, {}
    for name, model in models.items():
        graphdefs[name], states[name] = nnx.split(model)
    if previous:
        states = method.carry(stage, states, previous)
    opt = _optimizer_states(method, stage, optimizers, states)
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
    opt = _optimizer_states(method, stage, optimizers, states, lambda o, p: jax.eval_shape(o.init, p))
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    return graphdefs, {"models": states, "opt": opt, "step": jax.ShapeDtypeStruct((), jnp.int32), "key": key}


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
        step.traces += 1  # runs at trace time only (XLA compilations: `jaxbrats.compilation`)
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
            step.unlogged = (f"train.grad_norms: {', '.join(missing)} is not a loss term of stage {stage} "
                             f"(its logged terms: {', '.join(logged)})")
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
    squares = sum(jnp.sum(jnp.square(leaf.astype(jnp.float32)), axis=tuple(range(1, leaf.ndim)))
                  for leaf in jax.tree.leaves(jac))
    return {name: jnp.sqrt(squares[k]) for k, name in enumerate(terms)}


def loss_keys(method: Method, stage: str) -> list[str]:
    """The metric names of each update group's loss (``loss``, or ``<group>/loss`` for several)."""
    groups = [u.group for u in method.updates(stage)]
    return ["loss"] if len(groups) == 1 else [f"{g}/loss" for g in groups]


def step_name(stage: str) -> str:
    return f"train_step_{stage}"


# --- logging -----------------------------------------------------------------------------

class MetricsLog:
    """JSON lines plus TensorBoard event files in the work directory.

    Only one process of a multi-process run writes them (`write` False elsewhere: every
    call does nothing), so each row is written once.
    """

    def __init__(self, workdir: Path, write: bool = True):
        self.path = workdir / "metrics.jsonl"
        self.enabled = write
        self.writer = None
        if write:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "tensorboard"))

    def truncate(self, resume_step: dict[str, int]) -> None:
        """Drop the rows of these stages past the step each resumes from: they are about to be redone."""
        if not self.enabled or not self.path.exists():
            return
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if r["step"] <= resume_step.get(r["stage"], r["step"])]
        if len(keep) < len(rows):
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if isinstance(value, float):
                self.writer.add_scalar(f"{row['stage']}/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --- the loop ----------------------------------------------------------------------------

class Trainer:
    """Runs a method's stages for one work directory (see the module docstring)."""

    def __init__(self, config: Config, workdir, data_dir=None, only: tuple[str, ...] = ()):
        self.config = config
        self.workdir = Path(workdir)
        self.method = get_method(config.method_name)(config)
        unknown = sorted(set(only) - set(self.method.stages))
        if unknown:
            raise JaxbratsError(f"--stage {unknown[0]}: not a stage of {config.method_name} (its stages: {', '.join(self.method.stages)})")
        self.only = tuple(only)  # run just these stages; earlier ones are loaded from their checkpoints
        workdir_files.refuse_imported(self.workdir, self.method.stages)
        self.cache = CacheDataset(data_dir or config.data.cache)
        self.mesh = make_mesh(config.train.mesh)
        self.compiled_steps = {}  # stage -> the step function (its `.traces` counts Python traces)
        self.compilations = {}  # stage -> {"compiled": n, "loaded": n}: XLA compilations of its step in this call
        self.losses: list[tuple[str, int, float]] = []  # (stage, step, loss) for every step

    def run(self, stop_after: int | None = None) -> dict:
        """Run (or resume) every stage; `stop_after` steps in this call, then checkpoint and return.

        Process 0 holds the work directory's lock for the whole run (`workdir.single_writer`);
        when it is refused, every process stops with its line (`processes.on_process_0`).
        """
        with contextlib.ExitStack() as held:
            processes.on_process_0(lambda: bool(held.enter_context(workdir_files.single_writer(self.workdir))))
            return self._run(stop_after)

    def _run(self, stop_after: int | None) -> dict:
        self.budget = stop_after
        splits = workdir_files.prepare(self.workdir, self.config, self.cache)
        train_set = CacheDataset(self.cache.cache_dir, splits["train"])
        self.method.setup(train_set)
        resume = {}
        for stage in self.method.stages:
            manager = existing_manager(self.workdir, stage)
            resume[stage] = (manager.latest_step() or 0) if manager else 0
        self.log = MetricsLog(self.workdir, write=lead())  # process 0 writes metrics and TensorBoard
        self.log.truncate(resume)
        try:
            previous = None
            last = max(self.method.stages.index(s) for s in self.only) if self.only else len(self.method.stages) - 1
            for index, stage in enumerate(self.method.stages[: last + 1]):
                steps_per_epoch = max(len(train_set) // self.batch_size(stage), 1)
                total = self.method.stage_length(self.config, stage, steps_per_epoch)
                if self.only and stage not in self.only:
                    previous = self.load_stage(stage, total, previous)
                    continue
                previous = self.run_stage(stage, index, total, train_set, previous)
                if self.budget == 0:
                    break
        finally:
            self.log.close()
        return {"workdir": str(self.workdir), "splits": {k: len(v) for k, v in splits.items()}}

    def batch_size(self, stage: str) -> int:
        """Samples per step of a stage (global), checked against the data-parallel devices."""
        stage_config = self.config.stages.get(stage)
        batch = stage_config.batch_size if stage_config and stage_config.batch_size else self.config.data.batch_size
        if batch % self.mesh.shape["data"]:
            raise JaxbratsError(f"stage {stage}: batch size {batch} is not divisible by the {self.mesh.shape['data']} devices "
                                f"of the mesh's data axis (train.mesh.data)")
        return batch

    def load_stage(self, stage: str, total: int, previous):
        """Models of a stage that is not run now: its checkpoint in this run, or `previous` when it has none."""
        manager = existing_manager(self.workdir, stage)
        if manager is None or manager.latest_step() is None:
            return previous
        state, _, step = restore_newest_readable(manager, self.template(stage, total)[1])
        if step < total:
            raise JaxbratsError(f"stage {stage} stopped at step {step} of {total} in {self.workdir}: "
                                f"finish it first (train without --stage, or with --stage {stage})")
        if lead():
            print(f"stage {stage}: not run now; its models come from its final checkpoint")
        return state["models"]

    def optimizers(self, stage: str, total: int) -> dict:
        return stage_optimizers(self.method, stage, total)

    def template(self, stage: str, total: int):
        """(graph definitions, abstract train state carrying the mesh shardings a restore puts it in)."""
        graphdefs, abstract = abstract_state(self.method, stage, self.optimizers(stage, total))
        return graphdefs, with_shardings(abstract, state_shardings(abstract, self.mesh, self.method.families(stage)))

    def stage_start(self, stage, index, total, previous, manager):
        """(graphdefs, state, optimizers, iterator state or None) of a stage: resumed, carried or fresh."""
        optimizers = self.optimizers(stage, total)
        if manager.all_steps():  # an abstract template: no model is initialised only to be overwritten
            graphdefs, template = self.template(stage, total)
            resumed = restore_newest_readable(manager, template, set_aside=True, iterator=True)
            if resumed is not None:
                state, extra, step = resumed  # a complete stage needs no iterator: any process count reads it
                return graphdefs, state, optimizers, iterator_state(extra, manager, step) if step < total else None
        init_from = self.config.stages[stage].init_from if stage in self.config.stages else ""
        if init_from:
            previous = self._models_from(Path(init_from), stage, index)
        if previous is None and index > 0:
            before = self.method.stages[index - 1]
            raise JaxbratsError(f"stage {stage} starts from stage {before}, which has no checkpoint in {self.workdir}: "
                                f"train {before} first or set stages.{stage}.init_from to a checkpoint directory")
        outside = self.method.start_from(stage, lambda: abstract_models(self.method, stage)[1])
        if outside:
            previous = {**(previous or {}), **outside}
        graphdefs, state = init_state(self.method, stage, self.config.train.seed + index, optimizers, previous)
        return graphdefs, state, optimizers, None

    def _models_from(self, source: Path, stage: str, index: int) -> dict:
        """The models of another run's stage checkpoints in `source`: the stage it names, or the one before `stage`."""
        other = ocp.CheckpointManager(source.absolute(), options=ocp.CheckpointManagerOptions(create=False))
        if other.latest_step() is None:
            raise JaxbratsError(f"{source}: no checkpoint to start stage {stage} from")
        name = source.name if source.name in self.method.stages else self.method.stages[max(index - 1, 0)]
        template = self.template(name, 1)[1]  # the schedule length does not change the layout
        return restore_newest_readable(other, template)[0]["models"]

    def pipeline_config(self, stage: str, index: int) -> PipelineConfig:
        d = self.config.data
        return PipelineConfig(
            crop_size=d.crop_size, batch_size=self.batch_size(stage) // jax.process_count(),
            foreground_oversample=d.foreground_oversample, flip_probability=d.flip_probability,
            intensity_scale=d.intensity_scale, intensity_shift=d.intensity_shift,
            rotation_degrees=d.rotation_degrees, rotation_probability=d.rotation_probability,
            seed=self.config.train.seed + index, workers=d.workers, prefetch=d.prefetch,
            **self.method.pipeline(stage),
        )

    def compile_step(self, stage: str, step_fn, state, batch):
        """The step compiled once for these shapes (a batch of other shapes is refused, never recompiled).

        The new state keeps the input state's shardings (family members stay split along
        "model"); the metrics come back replicated.
        """
        compilation.watch()
        before = compilation.counts(step_fn.__name__)
        start = time.perf_counter()
        shardings = state_shardings(state, self.mesh, self.method.families(stage))
        jitted = jax.jit(step_fn, donate_argnums=0, out_shardings=(shardings, replicated(self.mesh)))
        with jax.set_mesh(self.mesh):  # layers see whether the depth is split (networks.layers.space_shards)
            compiled = jitted.lower(state, batch).compile()
        after = compilation.counts(step_fn.__name__)
        how = "loaded from the compilation cache" if after["loaded"] > before["loaded"] else "compiled"
        if lead():
            print(f"stage {stage}: train step {how} in {time.perf_counter() - start:.1f} s")
            if getattr(step_fn, "unlogged", ""):
                print(f"note: {step_fn.unlogged}; not logged in this stage")
        self.compilations[stage] = {k: after[k] - before[k] for k in ("compiled", "loaded")}
        return compiled

    def run_stage(self, stage: str, index: int, total: int, train_set: CacheDataset, previous) -> dict:
        cfg = self.config
        families = self.method.families(stage)
        check_families(self.mesh, families)
        manager = checkpoint_manager(self.workdir, stage, cfg.train.keep_checkpoints)
        graphdefs, state, optimizers, iterator_state = self.stage_start(stage, index, total, previous, manager)
        start = int(jax.device_get(state["step"]))
        self.log.truncate({stage: start})
        if start >= total:
            if lead():
                print(f"stage {stage}: complete ({start} steps), skipped")
                self.method.on_stage_end(stage, state["models"], self.workdir)  # idempotent: redone if a crash came before it
            return state["models"]
        state = shard_state(state, self.mesh, families)
        step_fn = make_train_step(self.method, stage, graphdefs, optimizers)
        self.compiled_steps[stage] = step_fn

        pipeline = self.pipeline_config(stage, index)
        iterator = iter(make_loader(train_set, pipeline))
        if iterator_state is not None:  # this process's own state (each reads its shard of the cases)
            iterator.set_state(iterator_state.encode())
        schedules = {u.group: make_schedule(self.method.optimizer(stage, u.group), total) for u in self.method.updates(stage)}
        voxels = pipeline.batch_size * jax.process_count() * pipeline.instantiations * int(np.prod(cfg.data.crop_size))
        pending, last_time, last_step = [], time.perf_counter(), start
        bar = tqdm(total=total, initial=start, desc=f"{stage}", unit="step", disable=not (cfg.train.progress and lead()), dynamic_ncols=True)
        if start and lead():
            print(f"stage {stage}: resuming at step {start} of {total}")
        jitted = None
        try:
            for step in range(start, total):
                batch = place_batch(next(iterator), self.mesh)
                if jitted is None:
                    jitted = self.compile_step(stage, step_fn, state, batch)
                    last_time = time.perf_counter()  # the rate excludes compilation
                state, metrics = jitted(state, batch)
                pending.append((step + 1, metrics))
                if self.budget is not None:
                    self.budget -= 1
                last = step + 1 == total or self.budget == 0
                save_now = last or (step + 1) % cfg.train.checkpoint_every == 0
                if save_now or (step + 1) % cfg.train.log_every == 0:
                    now = time.perf_counter()
                    rate = (step + 1 - last_step) / (now - last_time)
                    shown = self._flush(stage, pending, manager, rate, voxels * rate, schedules)
                    bar.set_postfix(**shown, vox_s=f"{voxels * rate:.3g}")
                    bar.update(step + 1 - last_step)
                    pending, last_time, last_step = [], now, step + 1
                if save_now:
                    save(manager, state, {"config": to_dict(cfg), "stage": stage, "total_steps": total,
                                          "processes": jax.process_count()}, iterator)
                if self.budget == 0:
                    break
        finally:
            bar.close()
            manager.wait_until_finished()
        if int(jax.device_get(state["step"])) == total and lead():  # reports: written once
            self.method.on_stage_end(stage, state["models"], self.workdir)
        return state["models"]

    def _flush(self, stage, pending, manager, rate, voxel_rate, schedules) -> dict:
        """Fetch, check and write the pending metrics; each group's latest loss for the progress bar."""
        keys = loss_keys(self.method, stage)
        fetched = jax.device_get([m for _, m in pending])
        for (step, _), metrics in zip(pending, fetched):
            values = {k: float(v) for k, v in metrics.items()}
            bad = [k for k, v in values.items() if not np.isfinite(v)]
            if bad:
                good = manager.latest_step()
                where = f"step {good} in {manager.directory}" if good is not None else "none (no checkpoint yet)"
                raise TrainingDiverged(f"stage {stage}: {', '.join(bad)} became {values[bad[0]]} at step {step}; training stopped. Last good checkpoint: {where}")
            self.losses.append((stage, step, values[keys[0]]))
            row = {"stage": stage, "step": step, **values}
            row.update({f"lr/{group}": float(schedule(step - 1)) for group, schedule in schedules.items()})
            self.log.write(row)
        self.log.write({"stage": stage, "step": pending[-1][0], "steps_per_s": float(rate), "voxels_per_s": float(voxel_rate)})
        return {k.replace("/", "_"): f"{values[k]:.4f}" for k in keys}


def train(config: Config, workdir, data_dir=None, stop_after: int | None = None, only: tuple[str, ...] = ()) -> Trainer:
    trainer = Trainer(config, workdir, data_dir, only)
    trainer.run(stop_after)
    return trainer


def load_trained(workdir, stage: str | None = None, overrides=(), segmenting: bool = False):
    """(method, graph definitions, model states, config) of a trained run, from its latest checkpoint
    of `stage` (default: the last stage whose models segment; `segmenting`: refuse a named stage whose
    models do not segment, as eval and predict need); the method is told which (`Method.serve`).

    Only the models that predict are read (`Method.inference_models`: a teacher,
    discriminators and optimiser states stay on disk), onto the first device.
    `overrides` (``key=value``) change the saved config, e.g. the eval settings.
    """
    from jaxbrats.methods import load_config

    workdir = Path(workdir)
    if not (workdir / "config.json").exists():
        raise JaxbratsError(f"{workdir}: not a jaxbrats run (no config.json); train with `jaxbrats train --workdir {workdir}`")
    config = load_config(workdir / "config.json", overrides)
    method = get_method(config.method_name)(config)
    if stage and stage not in method.stages:
        raise JaxbratsError(f"--stage {stage}: method {method.name} has the stages {', '.join(method.stages)}")
    if stage and segmenting and not method.can_predict(stage):
        raise JaxbratsError(f"--stage {stage}: the models of stage {stage} of {method.name} do not segment")
    stages = [stage] if stage else [s for s in reversed(method.stages) if method.can_predict(s)]
    for name in stages:
        manager = existing_manager(workdir, name)
        if manager is None or manager.latest_step() is None:
            continue
        graphdefs, abstract = abstract_models(method, name, method.inference_models(name))
        state, _, _ = restore_newest_readable(manager, {"models": on_first_device(abstract)}, partial=True)
        method.serve(name)
        return method, graphdefs, state["models"], config
    if stage:
        raise JaxbratsError(f"{workdir}: no checkpoint of stage {stage} (train it with `jaxbrats train --workdir {workdir}`)")
    if any((workdir / "checkpoints" / s).exists() for s in method.stages):
        raise JaxbratsError(f"{workdir}: no checkpoint of a stage that segments ({', '.join(stages)}); "
                            f"train it with `jaxbrats train --workdir {workdir}`")
    raise JaxbratsError(f"{workdir}: no checkpoint found (train first with `jaxbrats train --workdir {workdir}`)")
