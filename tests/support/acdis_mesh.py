"""ACDIS's train step on meshes of fake CPU devices; writes what each run did.

Run by tests/test_acdis.py in a process with fake CPU devices
(``--xla_force_host_platform_device_count``): ``python acdis_mesh.py OUT STEPS SETTINGS MESH...``,
SETTINGS a JSON list of ``--set`` overrides, each MESH ``data,space,model``. Per mesh the train
step is compiled by the engine (`engine.compile_step`, traced under the mesh as `train` does) and
run for STEPS steps on fixed batches (two subsets, SGD); OUT/<mesh>.json holds every step's
metrics, the compiled step's collectives and the mono encoders' stem kernel's sharding, and
OUT/<mesh>.npz the final parameters.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import synthetic_batch  # noqa: E402

from jaxbrats import engine  # noqa: E402
from jaxbrats.methods import get_method, load_config  # noqa: E402
from jaxbrats.runtime import compilation  # noqa: E402
from jaxbrats.runtime.sharding import make_mesh, place_batch, shard_state  # noqa: E402

#: SGD, not Adam: Adam's first step is about the sign of each gradient, so a gradient that is 0 in
#: exact arithmetic (float32 noise, in another reduction order on a mesh) would move by a full step.
SGD = "{name = 'sgd', lr = 0.01, momentum = 0.9}"
#: Two subsets per batch: the missing modalities' slots are synthesised (L_syn counts).
MASKS = np.asarray([[True, False, True, False], [False, False, False, True]])[:, None]


def run(out: Path, settings: list[str], mesh_spec: str, steps: int) -> None:
    data, space, model = (int(v) for v in mesh_spec.split(","))
    mesh_set = f"train.mesh={{data = {data}, space = {space}, model = {model}}}"
    extra = ["method.synthesis_start_epoch=0", f"stages.train.optimizers.model={SGD}", mesh_set]
    config = load_config(None, settings + extra)
    method = get_method("acdis")(config)
    optimizers = engine.stage_optimizers(method, "train", 10)
    graphdefs, state = engine.init_state(method, "train", 0, optimizers)
    mesh = make_mesh(config.train.mesh)
    families = method.families("train")
    state = shard_state(state, mesh, families)
    batches = [place_batch({**synthetic_batch(s), "modality_mask": MASKS}, mesh) for s in range(steps)]
    train_step = engine.make_train_step(method, "train", graphdefs, optimizers)
    step, _ = engine.compile_step(train_step, state, batches[0], mesh, families)
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    stem = state["models"]["mono"]["encoder"]["stem"]["kernel"]
    name = mesh_spec.replace(",", "x")
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state["models"]))[0]
    np.savez(out / f"{name}.npz", **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat})
    report = {
        "metrics": metrics,
        "collectives": compilation.collectives(step.as_text()),
        "stem_spec": str(stem.sharding.spec),
        "stem_shard": list(stem.addressable_shards[0].data.shape),
    }
    (out / f"{name}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    out, steps, settings, *meshes = sys.argv[1:]
    for mesh in meshes:
        run(Path(out), json.loads(settings), mesh, int(steps))
