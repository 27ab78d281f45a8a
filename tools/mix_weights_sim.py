"""What Mind the Gap's P_mix weights do over a whole teacher stage, on fixed latents.

    python3 tools/mix_weights_sim.py                                  # the BraTS 2018 config, 300 epochs
    python3 tools/mix_weights_sim.py --config configs/mind_the_gap_phantom.toml
    python3 tools/mix_weights_sim.py --set "method.mix_target='mixture'"
    python3 tools/mix_weights_sim.py --set "stages.teacher.optimizers.teacher.model_lr={mix=1e-2}"
    python3 tools/mix_weights_sim.py --decay-weights                  # weight decay on the weights too (as before)

The weights learn from the alignment term alone (never from segmentation), so
this runs exactly what the teacher's update does to them: the method's own
`alignment` (`losses.alignment.mix_weights` + `mix_alignment`, the config's
mix_target, mix_floor, mix_sum, anchor) and the config's teacher optimiser
(`engine.stage_optimizers`: its learning rate, or `model_lr.mix`, schedule,
weight decay and its exemption of the weights) for the config's stage length
(epochs x train cases / batch). The latents are fixed: Z_j = B + s_j E_j with
B and E_j standard normal, s_j the per-modality scale (`--scales`, in the
order flair t1ce t1 t2), so modality j's residual is about s_k^2 + s_j^2 with
the prior target (k the anchor) and grows with s_j with the mixture. The
encoders, which shrink the residuals as they align, are left out: what this
shows is how far and where the optimiser can move the weights, not where a
real run ends. Prints the weights at `--points` steps in the paper's order
(T1 T2 T1ce FLAIR), then the paper's reported values.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = {"t1": 0.7759, "t2": 0.8977, "t1ce": 2.2055, "flair": 0.3055}  # Sec. IV-C, learned P_mix weights
ORDER = ("t1", "t2", "t1ce", "flair")  # the paper's order


def simulate(
    config, train_cases: int, scales, steps: int = 0, decay_weights: bool = False, seed: int = 0, shape=(1, 8, 8, 8, 8)
) -> dict:
    """{"steps", "lr": (steps,), "weights": (steps + 1, J) in MODALITIES order, "optimizer": OptimizerConfig}."""
    from jaxbrats import engine
    from jaxbrats.losses.alignment import mix_weights
    from jaxbrats.methods import get_method
    from jaxbrats.methods.mind_the_gap import MixWeights
    from jaxbrats.modalities import MODALITIES

    method = get_method("mind_the_gap")(config)
    o = method.options
    if o.anchor != "mix":
        raise SystemExit("method.anchor must be 'mix' (P_mix) for its weights to exist")
    stage = config.stages.get("teacher")
    batch = (stage.batch_size if stage else 0) or config.data.batch_size
    total = steps or method.stage_length(config, "teacher", max(train_cases // batch, 1))
    cfg = method.optimizer("teacher", "teacher")
    if decay_weights:
        optimizer = engine.make_optimizer(cfg, total)
    else:
        optimizer = engine.stage_optimizers(method, "teacher", total)["teacher"]
    schedule = engine.make_schedule(dataclasses.replace(cfg, lr=cfg.model_lr.get("mix", cfg.lr)), total)

    rng = np.random.default_rng(seed)
    j = len(MODALITIES)
    base = rng.normal(size=shape)
    noise = rng.normal(size=(j, *shape))
    latents = jnp.asarray(
        base[None] + np.asarray(scales, np.float64).reshape(j, *[1] * len(shape)) * noise, jnp.float32
    )
    graphdef, state = nnx.split(MixWeights(j))
    params = {"mix": state}

    def loss(p):
        terms, _ = method.alignment({"mix": nnx.merge(graphdef, p["mix"])}, {"latent": latents})
        return o.align_weight * jnp.sum(terms)

    def weights_of(p):
        return mix_weights(p["mix"]["raw"][...], o.mix_floor, o.mix_sum)

    @jax.jit
    def run(params):
        def step(carry, _):
            p, s = carry
            updates, s = optimizer.update(jax.grad(loss)(p), s, p)
            p = optax.apply_updates(p, updates)
            return (p, s), weights_of(p)

        _, trajectory = jax.lax.scan(step, (params, optimizer.init(params)), None, length=total)
        return jnp.concatenate([weights_of(params)[None], trajectory])

    return {
        "steps": total,
        "weights": np.asarray(run(params)),
        "lr": np.asarray(jax.vmap(schedule)(jnp.arange(total))),
        "optimizer": cfg,
    }


def main(argv=None) -> int:
    from jaxbrats.methods import get_method, load_config
    from jaxbrats.modalities import MODALITIES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "mind_the_gap_brats2018.toml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (TOML value)")
    p.add_argument(
        "--train-cases",
        type=int,
        default=200,
        help="training cases, for a stage length in epochs (200: BraTS 2018 in ProtoKD's split)",
    )
    p.add_argument("--steps", type=int, default=0, help="steps instead of the config's stage length")
    p.add_argument(
        "--scales",
        type=float,
        nargs=len(MODALITIES),
        default=(1.3, 0.7, 1.1, 1.0),
        metavar="S",
        help=f"per-modality latent spread, in the order {' '.join(MODALITIES)}",
    )
    p.add_argument("--points", type=int, default=14, help="rows of the trajectory (geometrically spaced steps)")
    p.add_argument("--decay-weights", action="store_true", help="let weight decay act on the weights (no exemption)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    config = load_config(args.config, args.set)
    out = simulate(config, args.train_cases, args.scales, args.steps, args.decay_weights, args.seed)
    o = get_method("mind_the_gap").parse_options(config)
    cfg = out["optimizer"]
    w, total = out["weights"], out["steps"]
    index = {m: MODALITIES.index(m) for m in ORDER}
    print(f"{os.path.relpath(args.config)}{''.join(' --set ' + s for s in args.set)}")
    print(
        f"  target {o.mix_target} (anchor {o.anchor_modality}), floor {o.mix_floor}, sum {o.mix_sum}; "
        f"{cfg.name} lr {cfg.model_lr.get('mix', cfg.lr):g} for the weights ({cfg.schedule}), "
        f"weight decay {cfg.weight_decay:g} {'ON the weights' if args.decay_weights else 'not on the weights'}; "
        f"{total} steps; scales " + " ".join(f"{m} {s:g}" for m, s in zip(MODALITIES, args.scales))
    )
    print(f"  {'step':>6} {'lr':>9}  " + " ".join(f"{m:>6}" for m in ORDER) + "  T1ce share")
    rows = sorted({0, total, *np.geomspace(1, total, max(args.points - 1, 2)).round().astype(int).tolist()})
    for s in rows:
        lr = out["lr"][min(s, total - 1)]
        share = w[s, index["t1ce"]] / w[s].sum()
        print(f"  {s:6d} {lr:9.2e}  " + " ".join(f"{w[s, index[m]]:6.3f}" for m in ORDER) + f"  {share:.3f}")
    paper_share = PAPER["t1ce"] / sum(PAPER.values())
    print(f"  {'paper':>6} {'':>9}  " + " ".join(f"{PAPER[m]:6.3f}" for m in ORDER) + f"  {paper_share:.3f}")
    shares = w[:, index["t1ce"]] / w.sum(axis=1)
    reached = np.flatnonzero(shares >= paper_share)
    print(
        f"  T1ce share reaches the paper's {paper_share:.3f} "
        + (f"at step {reached[0]} of {total}" if reached.size else f"never (largest {shares.max():.3f})")
        + f"; range of a weight [{o.mix_floor:g}, {o.mix_sum - (len(MODALITIES) - 1) * o.mix_floor:g}]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
