"""The device mesh and every sharding rule of a run, in one place.

The mesh has three named axes, ``("data", "model", "space")``:

- "data" splits the batch (each device trains on its part of the samples);
- "model" splits a *family* of models (the leading axis of stacked students
  and of their discriminators, `networks.family`): with M devices on it,
  each holds K / M members, their optimiser states and their gradients, and
  computes only their losses; everything else (the teacher, a U-Net, the
  optimiser state of non-family models) is replicated;
- "space" is 1 until volume sharding splits the crops' depth over it.

Rules: a batch array is split along "data" on its first axis; a state leaf
(model variable or optimiser slot) under a family's name whose first axis
is the family size is split along "model" on that axis; any other leaf is
replicated. The same rules give the shardings of abstract states
(`jax.ShapeDtypeStruct`), so checkpoints restore straight into place.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbrats.config import MeshConfig
from jaxbrats.errors import ConfigError

AXES = ("data", "model", "space")


def make_mesh(cfg: MeshConfig | None = None, devices=None) -> Mesh:
    """A ("data", "model", "space") mesh: `mesh.data` x `mesh.model` x 1 devices (data 0: all the rest)."""
    cfg = cfg or MeshConfig()
    devices = jax.devices() if devices is None else devices
    model = cfg.model
    data = cfg.data or max(len(devices) // model, 1)
    if data * model > len(devices):
        raise ConfigError(f"train.mesh: data {data} x model {model} needs {data * model} devices, "
                          f"but {len(devices)} are visible")
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model, 1), AXES)


def check_families(mesh: Mesh, families: dict[str, int]) -> None:
    """Each family's size must split evenly over the "model" axis."""
    m = mesh.shape["model"]
    for name, size in families.items():
        if size % m:
            raise ConfigError(f"train.mesh.model = {m} must divide the {size} members of {name} "
                              f"(choose a divisor of {size}, or change method.students)")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def place_batch(batch: dict, mesh: Mesh) -> dict:
    """Host batch (this process's part) -> global arrays split along the mesh's data axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def _family_of(path, families: dict[str, int]) -> str | None:
    for entry in path:
        name = getattr(entry, "key", None)
        if isinstance(name, str) and name in families:
            return name
    return None


def state_shardings(state, mesh: Mesh, families: dict[str, int]):
    """The sharding of every leaf of a train state (concrete or abstract), by the rules above."""
    family_spec = NamedSharding(mesh, P("model"))
    replicate = replicated(mesh)

    def rule(path, leaf):
        name = _family_of(path, families)
        shape = getattr(leaf, "shape", ())
        if name is not None and len(shape) >= 1 and shape[0] == families[name]:
            return family_spec
        return replicate

    return jax.tree_util.tree_map_with_path(rule, state)


def shard_state(state, mesh: Mesh, families: dict[str, int]):
    """Put a train state on the mesh: family members split along "model", the rest replicated."""
    return jax.device_put(state, state_shardings(state, mesh, families))


def with_shardings(abstract, shardings):
    """Abstract leaves (ShapeDtypeStruct) that carry the sharding a restore should produce."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
