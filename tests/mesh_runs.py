"""Train one method for a few steps under several meshes of fake CPU devices; print what each run did.

Run as a script in a process with 8 CPU devices (tests/test_space_sharding.py starts it with
``--xla_force_host_platform_device_count=8``): ``python mesh_runs.py CACHE OUT METHOD:MESH:MESH...``,
each MESH ``data,space,model``; several methods in one process (one start of Python and JAX,
not one per method). Writes OUT/METHOD.json for each method, as soon as its meshes are done: per
mesh, the losses of every step (metrics.jsonl), the labels and Dice the evaluation gives a test
case and the labels `predict` writes for it (both on `eval.mesh`; predict where the method serves
all four modalities), the shardings of the window batches they split, the collectives (op, bytes
per device) of each stage's compiled train step and the shardings of M3AE's x_sub and its
optimiser moments in each stage's train state.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: 32x32x16 crops through a 3-level U-Net: the coarsest depth (8) splits over up to 8 devices (an
#: evaluation window's, 4, over 4). The meshes split the depth alone: the last axis at half the
#: depth halves each step's work.
#: SGD, not Adam: Adam divides each gradient by its own magnitude, so the float32 rounding
#: noise of gradients that are exactly 0 in exact arithmetic (a convolution bias followed by
#: GroupNorm) becomes a full-size step whose sign depends on the reduction order.
COMMON = [
    "model.widths=[8,8,8]",
    "model.blocks=[1,1,1]",
    "data.crop_size=[32,32,16]",
    "data.batch_size=2",
    "data.split_ratios=[0.67,0.0,0.33]",
    "train.log_every=1",
    "train.checkpoint_every=100",
    "train.progress=false",
    "eval.window=[16,16,16]",  # a case of the phantom (24^3) in several windows, in batches of 2
    "eval.window_batch=2",
    "eval.bucket_multiple=32",
    "eval.hd95=false",
]
#: `eval.mesh` of the runs on 8 devices: a window batch split along "data", each window's depth along "space".
EVAL_MESH = "{data = 2, space = 4}"
SGD = "{name = 'sgd', lr = 0.01, momentum = 0.9}"
METHODS = {
    "baseline": (None, ["stages.train.steps=4", f"stages.train.optimizers.model={SGD}"]),
    "m3ae": (
        ROOT / "configs" / "m3ae_phantom.toml",
        [
            "method.substitute_shape=[32,32,32]",
            "stages.pretrain.steps=4",
            "stages.finetune.steps=4",
            "stages.finetune.batch_size=2",
            f"stages.pretrain.optimizers.model={SGD}",
            f"stages.finetune.optimizers.model={SGD}",
        ],
    ),
    "rirn": (
        None,
        [
            "method.name='rirn'",
            "method.students=['t1ce','flair']",
            "model.stem_dropout=0.2",
            "stages.train.steps=4",
            f"stages.train.optimizers.model={SGD}",
            f"stages.train.optimizers.discriminator={SGD}",
        ],
    ),
    "mind_the_gap": (
        None,
        [
            "method.name='mind_the_gap'",
            "method.students=['t1ce','flair']",
            "method.kd='smunet'",
            "stages.teacher.steps=4",
            "stages.students.steps=4",
            f"stages.teacher.optimizers.teacher={SGD}",
            f"stages.students.optimizers.students={SGD}",
            f"stages.students.optimizers.discriminator={SGD}",
        ],
    ),
}


def run(cache: Path, out: Path, method: str, mesh: str) -> dict:
    from jaxbrats import engine
    from jaxbrats.data.cache import CacheDataset
    from jaxbrats.engine import trainer as trainer_module
    from jaxbrats.evaluation.program import evaluate
    from jaxbrats.inference.predict import predict_case
    from jaxbrats.inference.trained import load_trained
    from jaxbrats.methods import load_config
    from jaxbrats.modalities import FULL_SUBSET_INDEX
    from jaxbrats.runtime import compilation

    data, space, model = (int(v) for v in mesh.split(","))
    path, extra = METHODS[method]
    mesh_set = f"{{data = {data}, space = {space}, model = {model}}}"
    eval_mesh = "{data = 1, space = 1}" if data * space * model == 1 else EVAL_MESH
    config = load_config(path, COMMON + extra + [f"train.mesh={mesh_set}", f"eval.mesh={eval_mesh}"])
    workdir = out / f"{method}-{mesh.replace(',', 'x')}"
    collectives, substitute = {}, {}
    compile_step = trainer_module.compile_step

    def recording(step_fn, state, *args):  # each stage's compiled step's collectives, from its HLO
        compiled, counts = compile_step(step_fn, state, *args)
        stage = step_fn.__name__.removeprefix("train_step_")
        collectives[stage] = compilation.collectives(compiled.as_text())
        substitute[stage] = substitute_leaves(state, compiled)
        return compiled, counts

    trainer_module.compile_step = recording
    try:
        engine.train(config, workdir, cache)
    finally:
        trainer_module.compile_step = compile_step
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [
        {k: v for k, v in r.items() if k == "step" or k == "stage" or k.endswith("loss")}
        for r in rows
        if any(k.endswith("loss") for k in r)
    ]
    method_obj, graphdefs, models, config = load_trained(workdir)
    test = CacheDataset(cache, engine.load_splits(workdir, CacheDataset(cache))["test"][:1])
    eval_dir = out / f"eval-{workdir.name}"
    windows = {}
    with window_shardings(windows, "eval"):
        evaluate(method_obj, graphdefs, models, test, config.eval, eval_dir, predictions="all", progress=False)
    if FULL_SUBSET_INDEX in method_obj.served_subsets():  # RIRN's students here: not the case's four modalities
        with window_shardings(windows, "predict"):  # jaxbrats predict of the test case's folder, on eval.mesh
            case_dir = Path(next(iter(test.manifests[0]["sources"].values()))).parent
            predict_case(workdir, case_dir, eval_dir / "predict" / f"{case_dir.name}.nii.gz")
    labels = {
        p.relative_to(eval_dir).as_posix(): np.asarray(nib.load(p).dataobj).tolist()
        for p in sorted(eval_dir.rglob("*.nii.gz"))
    }
    dice = {
        p.stem: {row["name"]: row["dice"] for row in json.loads(p.read_text())["subsets"]}
        for p in sorted((eval_dir / "cases").glob("*.json"))
    }
    out = {
        "losses": losses,
        "labels": labels,
        "dice": dice,
        "windows": windows,
        "collectives": collectives,
        "substitute": substitute,
    }
    if method == "baseline":
        out["gradient"] = gradient(method_obj, graphdefs, models, config).tolist()
    if method == "m3ae" and data * space > 1:
        out["adam_substitute"] = adam_substitute_leaves(config.train.mesh)
    return out


def leaf_rows(state, *shardings) -> list[dict]:
    """The volume-shaped (4-D) leaves of a train state under M3AE's x_sub: path, shape, and for each
    sharding tree given (one per leaf of `state`), its spec and the shape of one device's part."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    trees = [jax.tree.leaves(s) for s in shardings]
    assert all(len(t) == len(leaves) for t in trees), (len(leaves), [len(t) for t in trees])
    rows = []
    for i, (path, leaf) in enumerate(leaves):
        where = jax.tree_util.keystr(path)
        if "x_sub" in where and len(leaf.shape) == 4:
            parts = [{"spec": str(t[i].spec), "shard": list(t[i].shard_shape(leaf.shape))} for t in trees]
            rows.append({"path": where, "shape": list(leaf.shape), "shardings": parts})
    return rows


def substitute_leaves(state, compiled) -> list[dict]:
    """x_sub's leaves in a stage's train state as the trainer placed them (and every device's part of
    each), and as the compiled step takes and returns them."""
    import jax

    rows = leaf_rows(
        state,
        jax.tree.map(lambda a: a.sharding, state),
        compiled.input_shardings[0][0],
        compiled.output_shardings[0],
    )
    placed = {jax.tree_util.keystr(p): a for p, a in jax.tree_util.tree_flatten_with_path(state)[0]}
    for row in rows:
        row["device_parts"] = sorted({tuple(s.data.shape) for s in placed[row["path"]].addressable_shards})
    return rows


def adam_substitute_leaves(mesh) -> list[dict]:
    """x_sub's leaves in the pretraining state of the shipped M3AE config (Adam, x_sub's own learning
    rate: its mu and nu), laid out by the trainer's rule on `mesh`. The runs here use SGD (see above)."""
    from jaxbrats.engine.optim import stage_optimizers
    from jaxbrats.engine.state import abstract_state
    from jaxbrats.methods import get_method, load_config
    from jaxbrats.runtime.sharding import make_mesh, state_shardings

    config = load_config(ROOT / "configs" / "m3ae_phantom.toml", ["method.substitute_shape=[32,32,32]"])
    method = get_method(config.method_name)(config)
    _, state = abstract_state(method, "pretrain", stage_optimizers(method, "pretrain", 4))
    return leaf_rows(state, state_shardings(state, make_mesh(mesh), method.families("pretrain")))


@contextlib.contextmanager
def window_shardings(found: dict, program: str):
    """Records in found[program] how the compiled program splits each window batch over the devices
    (`runtime.sharding.split_windows`, seen through `jax.debug.inspect_array_sharding`)."""
    import jax

    from jaxbrats.inference import segment

    split = segment.split_windows
    rows = found.setdefault(program, [])

    def watched(x):
        x = split(x)
        shape = x.shape
        jax.debug.inspect_array_sharding(
            x, callback=lambda s: rows.append({"shape": list(shape), "shard": list(s.shard_shape(shape))})
        )
        return x

    segment.split_windows = watched
    try:
        yield
    finally:
        segment.split_windows = split


def gradient(method, graphdefs, models, config) -> np.ndarray:
    """The loss's gradient w.r.t. every parameter (flattened) on one fixed batch, under the run's mesh."""
    import jax
    from flax import nnx

    from jaxbrats.runtime.sharding import make_mesh, place_batch, replicated

    mesh = make_mesh(config.train.mesh)
    rng = np.random.default_rng(0)
    shape = (2, *config.data.crop_size)
    batch = {
        "image": rng.normal(size=(*shape, 4)).astype(np.float32),
        "label": rng.integers(0, 4, shape).astype(np.uint8),
        "valid": np.ones(shape, bool),
        "modality_mask": np.ones((2, 1, 4), bool),
        "subset": np.full((2, 1), 14, np.int32),
    }
    update = method.updates("train")[0]

    def loss(params, batch):
        return update.loss({"unet": nnx.merge(graphdefs["unet"], params)}, batch, jax.random.PRNGKey(0), {})[0]

    with jax.set_mesh(mesh):
        params = jax.device_put(models["unet"], replicated(mesh))
        grads = jax.jit(jax.grad(loss), out_shardings=replicated(mesh))(params, place_batch(batch, mesh))
    return np.concatenate([np.ravel(g) for g in jax.tree.leaves(jax.device_get(grads))])


if __name__ == "__main__":
    cache, out, *runs = sys.argv[1:]
    for spec in runs:
        method, *meshes = spec.split(":")
        results = {m: run(Path(cache), Path(out), method, m) for m in meshes}
        (Path(out) / f"{method}.json").write_text(json.dumps(results))
