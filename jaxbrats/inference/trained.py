"""A trained run loaded for inference: the method, its graphs and the predicting models' states."""

from __future__ import annotations

from pathlib import Path

from jaxbrats.engine.state import abstract_models
from jaxbrats.errors import JaxbratsError
from jaxbrats.methods import get_method
from jaxbrats.runtime import checkpoints
from jaxbrats.runtime.rundir import RunDir


def load_trained(workdir, stage: str | None = None, overrides=(), segmenting: bool = False, checkpoint="latest"):
    """(method, graph definitions, model states, config) of a trained run, from a checkpoint of
    `stage` (default: the last stage whose models segment and have that checkpoint; `segmenting`:
    refuse a named stage whose models do not segment, as eval and predict need); the method is told
    which (`Method.serve`, and `Method.served_checkpoint`: the stage, step and kind read).

    `checkpoint`: "latest" (the newest readable step), "best" (``checkpoints/<stage>/best``, kept
    by validation during training: `evaluation.validation`) or a step number (as an int or string).

    Only the models that predict are read (`Method.inference_models`: a teacher,
    discriminators and optimiser states stay on disk), onto the first device.
    `overrides` (``key=value``) change the saved config, e.g. the eval settings.
    """
    from jaxbrats.methods import load_config

    workdir = Path(workdir)
    run = RunDir(workdir)
    if not run.is_run():
        raise JaxbratsError(
            f"{workdir}: not a jaxbrats run (no {run.config.name}); train with `jaxbrats train --workdir {workdir}`"
        )
    config = load_config(run.config, overrides)
    method = get_method(config.method_name)(config)
    if stage and stage not in method.stages:
        raise JaxbratsError(f"--stage {stage}: method {method.name} has the stages {', '.join(method.stages)}")
    if stage and segmenting and not method.can_predict(stage):
        raise JaxbratsError(f"--stage {stage}: the models of stage {stage} of {method.name} do not segment")
    which = checkpoint_choice(checkpoint)
    stages = [stage] if stage else [s for s in reversed(method.stages) if method.can_predict(s)]
    for name in stages:
        manager = _manager(workdir, name, which)
        if manager is None or manager.latest_step() is None:
            continue
        graphdefs, abstract = abstract_models(method, name, method.inference_models(name))
        template = {"models": checkpoints.on_first_device(abstract)}
        if isinstance(which, int):
            if which not in manager.all_steps():
                steps = ", ".join(map(str, sorted(manager.all_steps())))
                raise JaxbratsError(f"--checkpoint {which}: stage {name} of {workdir} has checkpoints at steps {steps}")
            state, _ = checkpoints.restore(manager, template, which, partial=True)
            step = which
        else:
            state, _, step = checkpoints.restore_newest_readable(manager, template, partial=True)
        method.serve(name)
        method.served_checkpoint = {
            "stage": name,
            "step": int(step),
            "checkpoint": "step" if isinstance(which, int) else which,
        }
        return method, graphdefs, state["models"], config
    if which == "best":
        raise JaxbratsError(
            f"{workdir}: no best checkpoint{f' of stage {stage}' if stage else ''}; it is kept when the run "
            f"validates during training (train.validate_every)"
        )
    if stage:
        raise JaxbratsError(
            f"{workdir}: no checkpoint of stage {stage} (train it with `jaxbrats train --workdir {workdir}`)"
        )
    if any(run.checkpoints(s).exists() for s in method.stages):
        raise JaxbratsError(
            f"{workdir}: no checkpoint of a stage that segments ({', '.join(stages)}); "
            f"train it with `jaxbrats train --workdir {workdir}`"
        )
    raise JaxbratsError(f"{workdir}: no checkpoint found (train first with `jaxbrats train --workdir {workdir}`)")


def checkpoint_choice(text) -> str | int:
    """`--checkpoint`: "latest", "best" or a step number (int); anything else is one line."""
    if isinstance(text, int) or text in ("latest", "best"):
        return text
    if str(text).isdigit():
        return int(text)
    raise JaxbratsError(f"--checkpoint must be latest, best or a step number, got {text!r}")


def _manager(workdir: Path, stage: str, which):
    if which == "best":
        return checkpoints.best_manager(workdir, stage, create=False)
    return checkpoints.existing_manager(workdir, stage)


def served_step(workdir, method) -> int:
    """The step of the checkpoint `load_trained` read (0 when it read none)."""
    return method.served_checkpoint["step"] if method.served_checkpoint else 0
