"""The device mesh and every sharding rule of a run, in one place.

The mesh has three named axes, ``("data", "model", "space")``:

- "data" splits the batch (each device trains on its part of the samples);
- "model" splits a *family* of models (the leading axis of stacked students
  and of their discriminators, `networks.family`): with M devices on it,
  each holds K / M members, their optimiser states and their gradients, and
  computes only their losses; everything else (the teacher, a U-Net, the
  optimiser state of non-family models) is replicated;
- "space" splits each volume's depth (its first spatial axis): a device
  holds a slab of every crop and of every activation of the U-Net, and a
  3x3x3 convolution exchanges one boundary slice with each neighbour
  (`networks.layers.halo_conv3d`); reductions (GroupNorm statistics, losses)
  are all-reduced by XLA, so they are the whole volume's. Programs that
  split volumes are traced under the mesh (`jax.set_mesh`): that is how a
  layer knows the depth is split.

Rules: a batch array is split along "data" on its first axis and, when it
is a volume (N, D, H, W[, C]), along "space" on its depth; a state leaf
(model variable or optimiser slot) under a family's name whose first axis
is the family size is split along "model" on that axis; a leaf of a
volume-sized model (`SPACE_MODELS`: M3AE's substitute image x_sub,
(D, H, W, C)) is split along "space" on its first axis; any other leaf is
replicated. The same rules give the shardings of abstract states
(`jax.ShapeDtypeStruct`), so checkpoints restore straight into place.

Devices are laid out data-major: with several processes, each process's
devices hold whole (space x model) groups, so a process feeds only its own
samples (`place_batch`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbrats.config import EvalConfig, MeshConfig
from jaxbrats.errors import ConfigError

AXES = ("data", "model", "space")
SPACE_AXIS = "space"  # the axis that splits a volume's depth
#: Models whose variables are volumes (D, H, W, C): split along "space" like the crops.
SPACE_MODELS = ("x_sub",)


def make_mesh(cfg: MeshConfig | None = None, devices=None, where: str = "train.mesh") -> Mesh:
    """A ("data", "model", "space") mesh of `data` x `model` x `space` devices (data 0: all the rest).

    Neighbouring shards of a volume are neighbouring devices (space is the fastest-varying axis).
    """
    cfg = cfg or MeshConfig()
    devices = jax.devices() if devices is None else devices
    model, space = cfg.model, cfg.space
    data = cfg.data or max(len(devices) // (model * space), 1)
    needed = data * model * space
    if needed > len(devices):
        raise ConfigError(
            f"{where}: data {data} x space {space} x model {model} needs {needed} devices, "
            f"but {len(devices)} are visible"
        )
    processes = jax.process_count()
    if processes > 1 and (data % processes or needed != len(devices)):
        raise ConfigError(
            f"{where}: with {processes} processes the mesh must use all {len(devices)} devices and "
            f"data ({data}) must be a multiple of {processes} (each process feeds its own samples)"
        )
    return Mesh(np.asarray(devices[:needed]).reshape(data, model, space), AXES)


def space_shards() -> int:
    """Devices splitting a volume's depth in the mesh of the current trace (`jax.set_mesh`; 1: none)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or SPACE_AXIS not in mesh.axis_names else mesh.shape[SPACE_AXIS]


def check_families(mesh: Mesh, families: dict[str, int]) -> None:
    """Each family's size must split evenly over the "model" axis."""
    m = mesh.shape["model"]
    for name, size in families.items():
        if size % m:
            raise ConfigError(
                f"train.mesh.model = {m} must divide the {size} members of {name} "
                f"(choose a divisor of {size}, or change method.students)"
            )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Samples along "data"; a volume's depth (axis 1 of (N, D, H, W[, C])) along "space"."""
    return NamedSharding(mesh, P("data", "space") if ndim >= 4 else P("data"))


def place_batch(batch: dict, mesh: Mesh) -> dict:
    """Host batch (this process's samples) -> global arrays split along "data" (and volumes along "space")."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value, shape)
    return out


def _family_of(path, names) -> str | None:
    """The first key on `path` that is one of `names` (a family's or a volume model's name)."""
    for entry in path:
        name = getattr(entry, "key", None)
        if isinstance(name, str) and name in names:
            return name
    return None


def state_shardings(state, mesh: Mesh, families: dict[str, int]):
    """The sharding of every leaf of a train state (concrete or abstract), by the rules above."""
    family_spec = NamedSharding(mesh, P("model"))
    space_spec = NamedSharding(mesh, P("space"))
    replicate = replicated(mesh)
    space = mesh.shape["space"]

    def rule(path, leaf):
        name = _family_of(path, families)
        shape = getattr(leaf, "shape", ())
        if name is not None and len(shape) >= 1 and shape[0] == families[name]:
            return family_spec
        if _family_of(path, SPACE_MODELS) and len(shape) == 4 and shape[0] % space == 0:
            return space_spec
        return replicate

    return jax.tree_util.tree_map_with_path(rule, state)


def shard_state(state, mesh: Mesh, families: dict[str, int]):
    """Put a train state on the mesh: family members split along "model", the rest replicated."""
    return jax.device_put(state, state_shardings(state, mesh, families))


def with_shardings(abstract, shardings):
    """Abstract leaves (ShapeDtypeStruct) that carry the sharding a restore should produce."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# --- evaluation: volumes split while one program segments a case -------------------------------


def eval_mesh(cfg: EvalConfig) -> Mesh | None:
    """The evaluation's mesh (`eval.mesh`: space splits each window's depth, data a window batch);
    None for one device, the default."""
    m = dataclasses.replace(cfg.mesh, data=cfg.mesh.data or 1)
    if m.data * m.space * m.model == 1:
        return None
    return make_mesh(m, where="eval.mesh")


def split_windows(x):
    """A batch of windows (B, D, H, W, C) split along "data" and their depth along "space", when the
    trace runs under a mesh (`OnMesh`); unchanged otherwise."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, P("data", "space"))


class OnMesh:
    """A jitted function traced and run under `mesh` (`jax.set_mesh`), its arguments replicated on
    the mesh's devices; with `mesh` None, the function as it is. Keeps `lower` for benchmarks."""

    def __init__(self, jitted, mesh: Mesh | None):
        self.jitted, self.mesh = jitted, mesh

    def _placed(self, args):
        return args if self.mesh is None else jax.device_put(args, replicated(self.mesh))

    def __call__(self, *args):
        if self.mesh is None:
            return self.jitted(*args)
        with jax.set_mesh(self.mesh):
            return self.jitted(*self._placed(args))

    def lower(self, *args):
        if self.mesh is None:
            return self.jitted.lower(*args)
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*self._placed(args))
