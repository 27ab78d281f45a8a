"""A trained run loaded for inference: the method, its graphs and the predicting models' states."""

from __future__ import annotations

from pathlib import Path

from jaxbrats.engine.state import abstract_models
from jaxbrats.errors import JaxbratsError
from jaxbrats.methods import get_method
from jaxbrats.runtime import checkpoints
from jaxbrats.runtime.rundir import RunDir


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
    stages = [stage] if stage else [s for s in reversed(method.stages) if method.can_predict(s)]
    for name in stages:
        manager = checkpoints.existing_manager(workdir, name)
        if manager is None or manager.latest_step() is None:
            continue
        graphdefs, abstract = abstract_models(method, name, method.inference_models(name))
        state, _, _ = checkpoints.restore_newest_readable(
            manager, {"models": checkpoints.on_first_device(abstract)}, partial=True
        )
        method.serve(name)
        return method, graphdefs, state["models"], config
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


def served_step(workdir, method) -> int:
    """The step of the newest checkpoint of the stage `load_trained` served (0 when it has none)."""
    manager = checkpoints.existing_manager(Path(workdir), method.serving)
    return (manager.latest_step() or 0) if manager else 0
