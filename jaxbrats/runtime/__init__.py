"""Runtime: where programs run and what survives them.

- `sharding`: the ("data", "model", "space") mesh and every sharding rule (batches, families, x_sub);
- `processes`: multi-host start and stop, process 0's writes, broadcasts;
- `locks`: one writer per work directory or cache;
- `compilation`: the persistent XLA cache and counts of compiles and cache loads;
- `rundir`: the run folder's layout (`RunDir`), the one place its file names are spelled;
- `checkpoints`: Orbax managers, saves and restores (newest readable, partial, on one device);
- `devices`: the one line naming the backend and devices that `train`, `eval` and `bench` start with.
"""

from jaxbrats.faces import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "make_mesh": "sharding",
        "place_batch": "sharding",
        "shard_state": "sharding",
        "state_shardings": "sharding",
        "eval_mesh": "sharding",
        "split_windows": "sharding",
        "OnMesh": "sharding",
        "SPACE_AXIS": "sharding",
        "lead": "processes",
        "start_distributed": "processes",
        "stop_process": "processes",
        "distributed_settings": "processes",
        "RunDir": "rundir",
        "hold": "locks",
        "watch": "compilation",
        "counts": "compilation",
        "checkpoint_manager": "checkpoints",
        "existing_manager": "checkpoints",
        "save": "checkpoints",
        "restore_newest_readable": "checkpoints",
        "restore_model": "checkpoints",
    },
)
