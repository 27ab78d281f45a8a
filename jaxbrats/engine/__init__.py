"""The training engine: a run's stages, each one jitted step over sharded batches.

`trainer` runs the stages (`train`) and the steps of each (`StageLoop`), `resume` decides where a
stage starts (its checkpoint, the stage before, another run, fresh models), `step` builds and
compiles the train step, `state` the train state, `optim` the optimisers, `metrics_log` writes
metrics.jsonl and TensorBoard and stops a diverged run, and `workdir` prepares a run's folder
(lock, config record, splits) and decides what a resume may change.
"""

from jaxbrats.faces import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "train": "trainer",
        "Trainer": "trainer",
        "TrainingDiverged": "trainer",
        "StageStarts": "resume",
        "make_train_step": "step",
        "compile_step": "step",
        "loss_keys": "step",
        "term_grad_norms": "step",
        "init_state": "state",
        "abstract_state": "state",
        "abstract_models": "state",
        "make_optimizer": "optim",
        "make_schedule": "optim",
        "stage_optimizers": "optim",
        "MetricsLog": "metrics_log",
        "PendingMetrics": "metrics_log",
        "load_splits": "workdir",
        "read_preprocessing": "workdir",
    },
)
