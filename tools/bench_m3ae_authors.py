"""The M3AE authors' own PyTorch network beside jaxbrats' PyTorch port and JAX network, same weights.

    git clone https://github.com/ccarliu/m3ae /some/dir
    python3 tools/bench_m3ae_authors.py --m3ae-repo /some/dir --size 64 --json m3ae_authors.json

Three networks are built:

- ``authors``: ``UNet3D_g`` of the authors' ``model/Unet.py``, imported at run time from the
  folder given (never copied into jaxbrats), with the fine-tuning configuration of their
  ``train_18.py`` / ``run.sh``: 4 inputs, 3 outputs, 16 initial channels, dropout 0.2 (unused by
  its forward), ``--deep_supervised True``; seeded PyTorch initialisation;
- ``port``: `jaxbrats.interop.torch_m3ae` (the ``unet`` part), loaded with the authors'
  state dict, strictly (same keys, same shapes);
- ``jax``: jaxbrats' M3AE fine-tuning U-Net, its parameters converted from the same state dict by
  `jaxbrats.interop.m3ae_import` (the path that imports the authors' checkpoints).

The three are first checked to compute the same logits on one random input (PyTorch eval mode;
the JAX input and output are the public ones with the spatial axes reversed and the channels in
jaxbrats' order, as the import defines). The training-mode deep-supervision heads are compared
too: the authors' upsample them with ``align_corners=True``, jaxbrats with half-pixel centres
(``align_corners=False``), so the JAX heads are compared with the authors' heads upsampled that way
(the plain difference is reported beside it). Then, float32 on the CPU, alternating call by call
(`interop.benchmark.alternating_medians`), median seconds of:

- ``forward``: the region logits of a batch, gradients off (eval mode);
- ``train_step``: training-mode forward (logits and the two upsampled deep-supervision heads),
  soft Dice + BCE summed over the three heads, backward, Adam (lr 3e-4). The JAX step is one
  jitted, donated function; the PyTorch steps the usual zero_grad / forward / backward / step.

The authors' module imports ``model.models`` (only PyTorch is needed); should that import fail,
``model/Unet.py`` is loaded alone with a stand-in for ``model.models.Model`` (unused by
``UNet3D_g``), and the JSON says so.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
import types
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jaxbrats without an install

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402

from jaxbrats.interop import m3ae_import, torch_m3ae  # noqa: E402
from jaxbrats.interop.benchmark import alternating_medians, machine  # noqa: E402
from jaxbrats.methods import config_from_data  # noqa: E402
from jaxbrats.methods.m3ae import M3AE  # noqa: E402

LR = 3e-4
SUBSTITUTE = (8, 8, 8)  # x_sub's public (z, y, x) shape: the import needs one; nothing here reads it
AUTHORS_CONFIG = {"in_channels": 4, "out_channels": 3, "init_channels": 16, "p": 0.2, "deep_supervised": True}


# --- the three networks -------------------------------------------------------------------


def load_authors(repo) -> tuple[types.ModuleType, str]:
    """(the authors' ``model.Unet`` module, how it was imported), from their repository folder."""
    repo = Path(repo).resolve()
    path = repo / "model" / "Unet.py"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; pass --m3ae-repo the folder of a clone of github.com/ccarliu/m3ae")
    sys.path.insert(0, str(repo))
    try:
        module = importlib.import_module("model.Unet")
        if Path(module.__file__).resolve() == path:
            return module, f"sys.path += repository folder; import model.Unet ({path})"
    except ImportError as e:
        reason = f"{type(e).__name__}: {e}"
    else:
        reason = f"another 'model' package came first ({module.__file__})"
    finally:
        sys.path.remove(str(repo))
    # Their Unet.py imports model.models.Model, which UNet3D_g does not use: stand it in, load the file alone.
    saved = {name: sys.modules.pop(name, None) for name in ("model", "model.models")}
    stub = types.ModuleType("model.models")
    stub.Model = None
    sys.modules["model"], sys.modules["model.models"] = types.ModuleType("model"), stub
    try:
        spec = importlib.util.spec_from_file_location("m3ae_authors_unet", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            sys.modules.pop(name, None)
            if old is not None:
                sys.modules[name] = old
    return module, f"model/Unet.py loaded alone with model.models stubbed ({reason})"


def build_networks(repo, size: int, seed: int = 0) -> dict:
    """{"authors", "port": torch modules; "jax": (graphdef, params); "how": import note} with the same weights."""
    module, how = load_authors(repo)
    torch.manual_seed(seed)
    authors = module.UNet3D_g([size] * 3, **AUTHORS_CONFIG)
    public = authors.state_dict()
    port = torch_m3ae.build(SUBSTITUTE, deep_supervised=True).unet
    port.load_state_dict(public, strict=True)  # raises if a key or a shape differs
    state = {f"unet.{k}": v for k, v in public.items()}
    state["limage"] = torch.zeros(1, 4, *SUBSTITUTE)
    transform = m3ae_import.orientation(m3ae_import.BRATS_AXCODES)
    config = config_from_data(m3ae_import.run_config(m3ae_import.ras_shape(SUBSTITUTE, transform)), "bench")
    method = M3AE(config)
    models = m3ae_import.jax_models(method, state, transform, Path("authors' UNet3D_g"))
    graphdefs, _ = m3ae_import.abstract_models(method, m3ae_import.STAGE)
    return {"authors": authors, "port": port, "jax": (graphdefs["unet"], models["unet"]), "how": how}


def to_jax(x: torch.Tensor, channels) -> jax.Array:
    """Public (N, C, z, y, x) -> jaxbrats (N, x, y, z, C) in jaxbrats' channel order."""
    return jnp.asarray(np.ascontiguousarray(x.detach().numpy().transpose(0, 4, 3, 2, 1)[..., channels]))


def authors_logits(out):
    """UNet3D_g returns (logits or [deep 1/4, deep 1/2, logits], style, content)."""
    return out[0]


# --- agreement ----------------------------------------------------------------------------


def agreement(nets: dict, size: int, batch: int = 1, seed: int = 1) -> dict:
    """Max |difference| of the eval-mode logits (and the training-mode deep heads) of the three networks."""
    inputs, outputs = m3ae_import.channel_orders()
    x = torch.from_numpy(np.random.default_rng(seed).normal(size=(batch, 4, size, size, size)).astype(np.float32))
    graphdef, params = nets["jax"]
    heads = {}  # the authors' deep heads before their upsampling (align_corners=True)
    hooks = [
        head.register_forward_hook(lambda m, i, o, k=k: heads.__setitem__(k, o))
        for k, head in enumerate(nets["authors"].ds_out)
    ]
    with torch.no_grad():
        authors = authors_logits(nets["authors"].eval()(x))
        port = nets["port"].eval()(x)
        authors_train = authors_logits(nets["authors"].train()(x))
        port_train = nets["port"].train()(x)
        half_pixel = [F.interpolate(heads[k], scale_factor=f, mode="trilinear") for k, f in ((0, 4), (1, 2))]
    for hook in hooks:
        hook.remove()
    out = nnx.merge(graphdef, params)(to_jax(x, inputs))
    ref = to_jax(authors, outputs)
    scale = float(jnp.max(jnp.abs(ref)))
    deep = [float(torch.max(torch.abs(a - p))) for a, p in zip(authors_train[:2], port_train[:2])]
    jax_deep = [float(jnp.max(jnp.abs(to_jax(a, outputs) - d))) for a, d in zip(authors_train[:2], out["deep"])]
    # jaxbrats upsamples the deep heads with half-pixel centres (align_corners=False): compare like with like too.
    jax_half = [float(jnp.max(jnp.abs(to_jax(a, outputs) - d))) for a, d in zip(half_pixel, out["deep"])]
    return {
        "size": size,
        "logits_max_abs": scale,
        "port_vs_authors": float(torch.max(torch.abs(port - authors))),
        "jax_vs_authors": float(jnp.max(jnp.abs(out["logits"] - ref))),
        "port_vs_authors_train_logits": float(torch.max(torch.abs(port_train[2] - authors_train[2]))),
        "port_vs_authors_deep_heads": deep,
        "jax_vs_authors_deep_heads": jax_deep,
        "jax_vs_authors_deep_heads_align_corners_false": jax_half,
    }


def check(result: dict, tolerance: float) -> list[str]:
    """The comparisons that exceed `tolerance` x max |logit| (empty: the same network)."""
    limit = tolerance * max(1.0, result["logits_max_abs"])
    keys = ("port_vs_authors", "jax_vs_authors", "port_vs_authors_train_logits")
    bad = [f"{k} {result[k]:.3g} > {limit:.3g}" for k in keys if result[k] > limit]
    for key in ("port_vs_authors_deep_heads", "jax_vs_authors_deep_heads_align_corners_false"):
        bad += [f"{key} {d:.3g} > {limit:.3g}" for d in result[key] if d > limit]
    return bad


# --- timed calls ----------------------------------------------------------------------------


def torch_loss(heads, target):
    """Soft Dice per sample and region + BCE with logits, summed over the heads."""
    total = 0
    for logits in heads:
        p = torch.sigmoid(logits)
        dims = (2, 3, 4)
        dice = 1 - (2 * (p * target).sum(dims) + 1e-5) / (p.sum(dims) + target.sum(dims) + 1e-5)
        total = total + dice.mean() + torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    return total


def jax_loss(heads, target):
    total = 0.0
    for logits in heads:
        p = jax.nn.sigmoid(logits)
        dims = (1, 2, 3)
        dice = 1 - (2 * (p * target).sum(dims) + 1e-5) / (p.sum(dims) + target.sum(dims) + 1e-5)
        total = total + dice.mean() + optax.sigmoid_binary_cross_entropy(logits, target).mean()
    return total


def torch_calls(model, x, target, heads_of) -> dict:
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def forward():
        model.eval()
        with torch.inference_mode():
            heads_of(model(x))

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        torch_loss(heads_of(model(x)), target).backward()
        optimizer.step()

    return {"forward": forward, "train_step": train_step}


def jax_calls(graphdef, params, x, target) -> tuple[dict, dict]:
    """({"forward", "train_step"} callables, XLA's FLOP count of each compiled program)."""
    tx = optax.adam(LR)

    def loss_fn(p):
        out = nnx.merge(graphdef, p)(x)
        return jax_loss([*out["deep"], out["logits"]], target)

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(p, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    forward = jax.jit(lambda p, v: nnx.merge(graphdef, p)(v)["logits"]).lower(params, x).compile()
    holder = {"state": jax.tree.map(jnp.copy, (params, tx.init(params)))}
    compiled = step.lower(*holder["state"]).compile()

    def train_step():
        *holder["state"], loss = compiled(*holder["state"])
        loss.block_until_ready()

    flops = {"forward": _flops(forward), "train_step": _flops(compiled)}
    return {"forward": lambda: forward(params, x).block_until_ready(), "train_step": train_step}, flops


def _flops(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) or None


# --- the run --------------------------------------------------------------------------------


def run(args) -> dict:
    load_before = os.getloadavg()
    nets = build_networks(args.m3ae_repo, args.size)
    result = {"date": time.strftime("%Y-%m-%d"), "device": machine(), "command": " ".join(sys.argv)}
    result.update(size=args.size, batch=args.batch, dtype="float32", authors_import=nets["how"])
    result["authors_config"] = AUTHORS_CONFIG
    result["agreement"] = agreement(nets, args.check_size or args.size)
    result["agreement"]["failures"] = check(result["agreement"], args.tolerance)
    print(json.dumps(result["agreement"]))
    inputs, outputs = m3ae_import.channel_orders()
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(args.batch, 4, *(args.size,) * 3)).astype(np.float32))
    target = torch.from_numpy((rng.random((args.batch, 3, *(args.size,) * 3)) < 0.3).astype(np.float32))
    graphdef, params = nets["jax"]
    jax_fns, flops = jax_calls(graphdef, params, to_jax(x, inputs), to_jax(target, outputs))
    sides = {
        "authors": torch_calls(nets["authors"], x, target, lambda out: _heads(authors_logits(out))),
        "port": torch_calls(nets["port"], x, target, _heads),
        "jax": jax_fns,
    }
    result["rows"] = []
    for what in ("forward", "train_step"):
        times, errors = alternating_medians({k: v[what] for k, v in sides.items()}, args.repeats, args.warmup)
        row = {"what": what, **{f"{k}_s": round(t, 4) for k, t in times.items()}, "errors": errors}
        row["jax_gflop"] = round(flops[what] / 1e9, 2) if flops[what] else None
        result["rows"].append(row)
        print(json.dumps(row))
    result["loadavg_before"], result["loadavg_after"] = list(load_before), list(os.getloadavg())
    return result


def _heads(out):
    """A list of heads: the training-mode list, or the eval-mode logits alone."""
    return out if isinstance(out, (list, tuple)) else [out]


def markdown(result: dict) -> str:
    lines = [
        f"{result['size']}^3, batch {result['batch']}, float32, CPU ({result['device']['cpu']}, "
        f"{result['device']['cpu_cores']} cores, torch {result['device'].get('torch')} with "
        f"{result['device'].get('torch_threads')} threads, jax {result['device']['jax']})",
        "",
        "| what | authors' UNet3D_g (PyTorch) ms | jaxbrats port (PyTorch) ms | jaxbrats JAX ms "
        "| port / authors | JAX / authors | JAX GFLOP |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        a, p, j = (row.get(f"{k}_s") for k in ("authors", "port", "jax"))
        ms = [f"{t * 1e3:.0f}" if t else "failed" for t in (a, p, j)]
        ratios = [f"{t / a:.2f}" if t and a else "" for t in (p, j)]
        gflop = f"{row['jax_gflop']:.1f}" if row["jax_gflop"] else ""
        lines.append(f"| {row['what']} | {' | '.join(ms)} | {' | '.join(ratios)} | {gflop} |")
    load = ", ".join(f"{v:.2f}" for v in result["loadavg_before"])
    lines.append("")
    lines.append(f"load average before the run (1, 5, 15 min): {load}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--m3ae-repo",
        default=os.environ.get("JAXBRATS_M3AE_REPO"),
        help="folder of a clone of github.com/ccarliu/m3ae (default: $JAXBRATS_M3AE_REPO)",
    )
    parser.add_argument("--size", type=int, default=64, help="cubic crop edge (a multiple of 8)")
    parser.add_argument("--batch", type=int, default=1, help="the fine-tuning script's default (-b 1)")
    parser.add_argument("--check-size", type=int, help="edge of the agreement check (default: --size)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="allowed |difference| / max(1, max |logit|)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not args.m3ae_repo:
        parser.error("--m3ae-repo (or JAXBRATS_M3AE_REPO) is required: a clone of github.com/ccarliu/m3ae")
    result = run(args)
    table = markdown(result)
    print()
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "table": table}, indent=1) + "\n")
        print(f"wrote {args.json}")
    failures = result["agreement"]["failures"]
    if failures:
        print("the networks disagree: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
