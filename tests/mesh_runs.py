"""Train one method for a few steps under several meshes of fake CPU devices; print what each run did.

Run as a script in a process with 8 CPU devices (tests/test_space_sharding.py starts it with
``--xla_force_host_platform_device_count=8``): ``python mesh_runs.py CACHE OUT METHOD:MESH:MESH...``,
each MESH ``data,space,model``; several methods in one process (one start of Python and JAX,
not one per method). Writes OUT/METHOD.json for each method, as soon as its meshes are done: per
mesh, the losses of every step (metrics.jsonl) and the labels the evaluation predicts for a test
case, and the collectives (op, bytes per device) of each stage's compiled train step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: 32x32x16 crops through a 3-level U-Net: the coarsest depth (8) splits over up to 8 devices. The
#: meshes split the depth alone: the last axis at half the depth halves each step's work.
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
    "eval.window=[32,32,32]",
    "eval.bucket_multiple=32",
    "eval.hd95=false",
]
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
    from jaxbrats.inference.trained import load_trained
    from jaxbrats.methods import load_config
    from jaxbrats.runtime import compilation

    data, space, model = (int(v) for v in mesh.split(","))
    path, extra = METHODS[method]
    mesh_set = f"{{data = {data}, space = {space}, model = {model}}}"
    config = load_config(
        path, COMMON + extra + [f"train.mesh={mesh_set}", f"eval.mesh={{data = 1, space = {data * space}}}"]
    )
    workdir = out / f"{method}-{mesh.replace(',', 'x')}"
    collectives = {}
    compile_step = trainer_module.compile_step

    def recording(step_fn, *args):  # each stage's compiled step's collectives, from its HLO
        compiled, counts = compile_step(step_fn, *args)
        collectives[step_fn.__name__.removeprefix("train_step_")] = compilation.collectives(compiled.as_text())
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
    splits = engine.load_splits(workdir, CacheDataset(cache))
    eval_dir = out / f"eval-{workdir.name}"
    evaluate(
        method_obj,
        graphdefs,
        models,
        CacheDataset(cache, splits["test"][:1]),
        config.eval,
        eval_dir,
        predictions="all",
        progress=False,
    )
    labels = {
        p.relative_to(eval_dir).as_posix(): np.asarray(nib.load(p).dataobj).tolist()
        for p in sorted(eval_dir.rglob("*.nii.gz"))
    }
    out = {"losses": losses, "labels": labels, "collectives": collectives}
    if method == "baseline":
        out["gradient"] = gradient(method_obj, graphdefs, models, config).tolist()
    return out


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
