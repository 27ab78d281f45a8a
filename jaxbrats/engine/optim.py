"""The optimisers of a stage: one optax chain per parameter group, its schedule and weight-decay mask."""

from __future__ import annotations

import dataclasses

import jax
import optax

from jaxbrats.config import OptimizerConfig
from jaxbrats.errors import ConfigError
from jaxbrats.methods import Method


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


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int, undecayed: tuple[str, ...] = ()
) -> optax.GradientTransformation:
    """The optimiser of one update group; its parameters are a dict {model name: state}. Weight
    decay leaves the models named in `undecayed` alone (Mind the Gap's P_mix weights)."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    decay_mask = _decayed(undecayed) if undecayed else None
    if not cfg.model_lr:
        return optax.chain(*parts, *_update_rules(cfg, total_steps, decay_mask))
    # One rule per learning rate, chosen by the top-level model name.
    rates = {"": cfg.lr, **cfg.model_lr}
    rules = {
        n: optax.chain(*_update_rules(dataclasses.replace(cfg, lr=lr), total_steps, decay_mask))
        for n, lr in rates.items()
    }

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
            raise ConfigError(
                f"stages.{stage}.optimizers.{update.group}.model_lr: {', '.join(unknown)} "
                f"not trained in this group (trained: {', '.join(update.trainable)})"
            )
        out[update.group] = make_optimizer(cfg, total_steps, tuple(method.undecayed(stage, update.group)))
    return out
