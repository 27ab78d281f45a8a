"""Step times of the shared backbone in JAX and in PyTorch, side by side (`jaxbrats bench`).

    jaxbrats bench --size 64 --batch 2 --vs torch --json bench.json

For one model (the residual 3D U-Net that M3AE and RIRN share, by default 16,
32, 64, 128 channels with 1, 2, 2, 4 blocks per level, with region outputs),
batch, crop size and dtype, three things are timed:

- ``train_step``: forward, region Dice + BCE loss, backward and an Adam
  update. JAX runs the engine's own jitted, donated step
  (`engine.step.make_train_step` with the baseline method); PyTorch the usual
  zero_grad / forward / backward / step on the same weights.
- ``forward``: region probabilities of a batch, gradients off.
- ``eval_15_subsets``: one case scored under all 15 modality subsets, sliding
  windows with Gaussian blending, threshold, Dice counts. JAX runs the
  evaluation's one jitted program (`evaluation.program.make_case_program`); PyTorch
  the usual Python loop over subsets and windows, on the same window grid.

Times are medians over ``--repeats`` calls after ``--warmup`` calls, the
frameworks alternating call by call so that a slower phase of the machine
hits both. Each JAX call ends in `block_until_ready`, each PyTorch call in a
device synchronise. With ``bfloat16``, JAX computes in bfloat16 with float32
parameters and PyTorch runs autocast (AMP) with float32 parameters. With
``--vs torch`` and ``torch.compile`` available, the compiled PyTorch model is
a second PyTorch row.

FLOPs are XLA's cost analysis of the lowered JAX program (a multiply-add
counts 2; convolutions dominate): the lowered program, because on GPU the
compiled one hands convolutions to cuDNN custom calls, which its analysis may
not count. ``jax_tflops`` is that count over the JAX time, and ``mfu``
divides it by the device's dense peak for the precision the step computes in
(``peak``: "bf16" for bfloat16; "tf32" for float32 on a GPU, where JAX's
default precision and PyTorch's ``cudnn.allow_tf32`` both run float32
convolutions as TF32), or by ``--peak-tflops``.

On CUDA the PyTorch side runs with ``cudnn.benchmark`` (cuDNN picks its
algorithms per shape, as XLA autotunes) and the model and inputs in
``channels_last_3d`` (the layout AMP's tensor-core kernels want): the fair
eager / AMP baseline. On CPU it keeps PyTorch's default NCDHW.

``--method NAME`` evaluates another method (``--what eval`` only; only the
baseline has a PyTorch twin, so other methods have no PyTorch rows): the row
gets ``gflop_per_window`` (the 15-subset program's FLOPs per window) and
``gflop_per_subset`` (one subset's predict per window), from
`evaluation.cost.window_flops`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbrats import files
from jaxbrats.errors import JaxbratsError
from jaxbrats.inference.windows import blend_weights, window_starts
from jaxbrats.labels import regions_of
from jaxbrats.modalities import SUBSET_MASKS
from jaxbrats.runtime.devices import announce_platform

#: Dense (not 2:4-sparse) tensor-core peaks in TFLOP/s by (device kind substring, precision),
#: for the MFU column, from NVIDIA's datasheets (H100 and H200 SXM: TF32 494.7, BF16 989.4;
#: H100 PCIe: 378, 756; A100 SXM/PCIe: 156, 312), whose headline figures are the sparse ones,
#: twice these. The first matching substring wins: "H100 PCIe" before "H100".
PEAK_TFLOPS = {
    ("H100 PCIe", "tf32"): 378.0,
    ("H100 PCIe", "bf16"): 756.0,
    ("H100", "tf32"): 494.7,
    ("H100", "bf16"): 989.4,
    ("H200", "tf32"): 494.7,
    ("H200", "bf16"): 989.4,
    ("A100", "tf32"): 156.0,
    ("A100", "bf16"): 312.0,
}
LR = 3e-4


def machine(with_torch: bool = True) -> dict:
    """The CPU, JAX's devices and versions; PyTorch's version, threads and device `with_torch` (a
    JAX-only benchmark skips it: importing torch alone takes seconds)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "backend": jax.default_backend(),
        "accelerator": ", ".join(sorted({d.device_kind for d in jax.devices()})),
        "jax": jax.__version__,
    }
    if not with_torch:
        return info
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["torch_device"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def alternating_medians(calls: dict, repeats: int, warmup: int) -> tuple[dict[str, float], dict[str, str]]:
    """(median seconds per call, errors) of each function, the functions called in turn each round.

    A function that raises during warm-up (say torch.compile failing on some
    shape) is dropped and its error returned, so one failure costs one row.
    """
    errors = {}
    for name, fn in list(calls.items()):
        try:
            for _ in range(max(warmup, 1)):
                fn()
        except Exception as e:  # noqa: BLE001 - reported in the row, the other rows still run
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    calls = {name: fn for name, fn in calls.items() if name not in errors}
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}, errors


# --- JAX side ------------------------------------------------------------------


class JaxSide:
    """A method's models (the baseline's by default), jitted train step, forward and 15-subset evaluation."""

    def __init__(self, args, remat: bool, crop=None, method: str = "baseline"):
        from jaxbrats.engine.state import init_state
        from jaxbrats.methods import get_method, load_config

        self.method_name = method
        window = eval_window(args)
        overrides = [
            f"method.name='{method}'",
            f"model.dtype='{args.dtype}'",
            f"model.conv_impl='{args.conv_impl}'",
            f"model.remat={str(remat).lower()}",
            f"data.crop_size={list(crop or (window,) * 3)}",
            f"eval.window=[{window},{window},{window}]",
            f"eval.window_batch={args.window_batch}",
            "eval.hd95=false",
        ]
        # Widths and blocks only when given: each method's own defaults (the papers') otherwise.
        overrides += [f"model.widths={list(args.widths)}"] if args.widths else []
        overrides += [f"model.blocks={list(args.blocks)}"] if args.blocks else []
        self.config = load_config(None, overrides)
        self.method = get_method(method)(self.config)
        self.stage = args.stage or eval_stage(self.method)
        self.optimizers = {group: optax.adam(LR) for group in self.method.groups(self.stage)}
        self.graphdefs, self.state = init_state(self.method, self.stage, 0, self.optimizers)

    def model_state(self):
        return self.state["models"]["unet"]

    def unet_config(self):
        from jaxbrats.networks.factory import unet_config

        return unet_config(self.config, self.method.out_channels(), self.method.options.deep_supervision)

    def train_step(self, image, labels):
        from jaxbrats.engine.step import make_train_step

        n, d, h, w, _ = image.shape
        batch = {
            "image": jnp.asarray(image),
            "label": jnp.asarray(labels),
            "valid": jnp.ones((n, d, h, w), bool),
            "modality_mask": jnp.ones((n, 1, 4), bool),
        }
        step = jax.jit(make_train_step(self.method, "train", self.graphdefs, self.optimizers), donate_argnums=0)
        holder = {"state": jax.tree.map(jnp.copy, self.state)}  # the step donates its state: keep ours intact
        lowered = step.lower(holder["state"], batch)
        compiled = lowered.compile()
        self.compiled_text = compiled.as_text()  # for tools/profile_step.py

        def call():
            holder["state"], metrics = compiled(holder["state"], batch)
            metrics["loss"].block_until_ready()

        return call, lowered_flops(lowered)

    def forward(self, image):
        from flax import nnx

        graphdef = self.graphdefs["unet"]
        mask = jnp.ones((image.shape[0], 4), bool)
        fn = jax.jit(lambda s, x: self.method.predict({"unet": nnx.merge(graphdef, s)}, x, mask))
        x = jnp.asarray(image)
        lowered = fn.lower(self.model_state(), x)
        compiled = lowered.compile()
        return (lambda: compiled(self.model_state(), x).block_until_ready()), lowered_flops(lowered)

    def evaluation(self, image, labels):
        """(call, FLOPs of one case or None, the row's extra keys: the FLOPs per window and per subset)."""
        from jaxbrats.evaluation.program import make_case_program
        from jaxbrats.inference.segment import case_locator

        names = self.method.inference_models(self.stage) or tuple(self.state["models"])
        graphdefs = {n: g for n, g in self.graphdefs.items() if n in names}
        models = {n: s for n, s in self.state["models"].items() if n in names}
        self.method.serve(self.stage)
        program = make_case_program(self.method, graphdefs, self.config.eval)
        shape = labels.shape
        args = (models, jnp.asarray(image), jnp.asarray(labels), jnp.ones(shape, bool), case_locator(shape, (0, 0, 0)))
        compiled = program.lower(*args).compile()
        # The program's own cost analysis sees its subset loop (lax.map) once: FLOPs per window
        # come from `evaluation.cost`, which lowers one window's programs, times the case's windows.
        extra, flops = {"method": self.method_name, "stage": self.stage}, None
        try:
            from jaxbrats.evaluation.cost import window_flops
        except ImportError as e:  # an older tree without the evaluation's cost model: times only
            extra["flops_error"] = f"{type(e).__name__}: {e}"
        else:
            cost = window_flops(self.method, graphdefs, models, self.config.eval)
            extra.update({k: cost[k] for k in EVAL_COST_KEYS if k in cost})
            windows = len(window_starts(shape, self.config.eval.window, self.config.eval.overlap))
            extra["windows"] = windows
            flops = cost["gflop_per_window"] * 1e9 * windows
        return (lambda: jax.block_until_ready(compiled(*args))), flops, extra


#: What `evaluation.cost.window_flops` reports that an evaluation row keeps.
EVAL_COST_KEYS = ("gflop_per_window", "gflop_per_subset", "gflop_shared", "necessary_gflop", "subsets", "ratio")


def eval_stage(method) -> str:
    """The stage `--what eval` scores by default: the first whose models segment (M3AE's fine-tuning;
    Mind the Gap's teacher, which serves all 15 subsets; `--stage students` for its students)."""
    return next(s for s in method.stages if method.can_predict(s))


def eval_window(args) -> int:
    """`--eval-window`, else the first `--size`, else 128 (see `--size`'s help)."""
    return args.eval_window or (args.size[0] if args.size else 128)


def eval_shape(args) -> tuple[int, int, int]:
    """`--eval-shape`, else one window when `--size` sets the window, else a full 240x240x155 case."""
    if args.eval_shape:
        return tuple(args.eval_shape)
    return (eval_window(args),) * 3 if args.size and not args.eval_window else (240, 240, 155)


def lowered_flops(lowered) -> float | None:
    """XLA's FLOP count of a lowered (not compiled) program: on GPU the compiled program's
    convolutions are cuDNN custom calls, which its cost analysis may count as nothing."""
    try:
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    except (KeyError, TypeError, IndexError, AttributeError):
        return None


# --- PyTorch side ----------------------------------------------------------------


class TorchSide:
    """The PyTorch reference with the JAX side's weights; eager, or compiled with torch.compile."""

    def __init__(self, jax_side: JaxSide, dtype: str, compiled: bool):
        import torch

        from jaxbrats.interop.torch_unet import TorchUNet, torch_state_dict

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        jax_state = jax_side.model_state()
        model = TorchUNet(jax_side.unet_config())
        model.load_state_dict(torch_state_dict(jax_state))
        self.model = model.to(self.device)
        # The fair GPU baseline: cuDNN picks its kernels per shape (as XLA autotunes), and AMP's
        # tensor-core kernels get the channels-last layout they want. On CPU, PyTorch's default
        # layout (oneDNN reorders into its own blocked one).
        self.layout = torch.contiguous_format
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            self.layout = torch.channels_last_3d
            self.model = self.model.to(memory_format=self.layout)
        if compiled:
            # Static shapes, and a fresh start: after a first size, dynamo would otherwise recompile
            # with symbolic shapes, which Inductor 2.13 failed to lower at 128^3 (ValueRangeError).
            torch._dynamo.reset()
            self.run = torch.compile(self.model, dynamic=False)
        else:
            self.run = self.model
        self.dtype = dtype
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)

    def _autocast(self):
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.dtype == "bfloat16")

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _tensor(self, array):
        """Channels-last numpy (N, D, H, W, C) -> an NCDHW tensor on the device, in the side's layout."""
        tensor = self.torch.from_numpy(np.ascontiguousarray(np.moveaxis(array, -1, 1))).to(self.device)
        return tensor.contiguous(memory_format=self.layout) if tensor.dim() == 5 else tensor

    def region_loss(self, logits, target):
        """Soft Dice per sample and region + BCE, as `losses.region_loss` with nothing padded."""
        F = self.torch.nn.functional
        logits = logits.float()
        p = self.torch.sigmoid(logits)
        dims = (2, 3, 4)
        dice = 1 - (2 * (p * target).sum(dims) + 1e-5) / (p.sum(dims) + target.sum(dims) + 1e-5)
        return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)

    def train_step(self, image, labels):
        x = self._tensor(image)
        target = self._tensor(regions_of(labels).astype(np.float32))

        def call():
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                logits = self.run(x)["logits"]
            loss = self.region_loss(logits, target)
            loss.backward()
            self.optimizer.step()
            self._sync()

        return call

    def forward(self, image):
        x = self._tensor(image)

        def call():
            with self.torch.inference_mode(), self._autocast():
                self.torch.sigmoid(self.run(x)["logits"].float())
            self._sync()

        return call

    def evaluation(self, image, labels, window: int, overlap: float, window_batch: int):
        """The usual loop: for each subset, zero the missing channels, slide, blend, threshold, count."""
        torch = self.torch
        x = self._tensor(image[None])[0]
        truth = self._tensor(regions_of(labels)[None])[0]
        shape = image.shape[:3]
        size = (window,) * 3
        starts = window_starts(shape, size, overlap)
        weights = torch.from_numpy(blend_weights(size, "gaussian")).to(self.device)

        def call():
            dice = []
            with torch.inference_mode(), self._autocast():
                for mask in SUBSET_MASKS:
                    seen = x * torch.tensor(mask, device=self.device, dtype=x.dtype).view(4, 1, 1, 1)
                    total = torch.zeros((3,) + shape, device=self.device)
                    norm = torch.zeros(shape, device=self.device)
                    for i in range(0, len(starts), window_batch):
                        group = starts[i : i + window_batch]
                        boxes = [tuple(slice(int(s), int(s) + window) for s in corner) for corner in group]
                        patches = torch.stack([seen[(slice(None),) + box] for box in boxes])
                        patches = patches.contiguous(memory_format=self.layout)
                        probs = torch.sigmoid(self.run(patches)["logits"].float())
                        for box, p in zip(boxes, probs):
                            total[(slice(None),) + box] += p * weights
                            norm[box] += weights
                    regions = total / norm > 0.5
                    inter = (regions & truth).sum((1, 2, 3))
                    dice.append((2 * inter) / (regions.sum((1, 2, 3)) + truth.sum((1, 2, 3))).clamp(min=1))
                torch.stack(dice).cpu()
            self._sync()

        return call


# --- the runs -------------------------------------------------------------------------


def _inputs(shape, batch: int | None, seed: int = 0):
    rng = np.random.default_rng(seed)
    lead = (batch,) if batch else ()
    image = rng.normal(size=lead + tuple(shape) + (4,)).astype(np.float32)
    labels = rng.integers(0, 4, lead + tuple(shape)).astype(np.uint8)
    return image, labels


def _row(what, size, batch, dtype, times: dict, flops, peak, torch_kind=None, error=None) -> dict:
    row = {"what": what, "size": list(size), "batch": batch, "dtype": dtype, "jax_s": round(times["jax"], 4)}
    if error:
        row["torch"], row["torch_error"] = torch_kind, error
    elif torch_kind:
        row["torch"] = torch_kind
        row["torch_s"] = round(times[torch_kind], 4)
        row["ratio_torch_over_jax"] = round(times[torch_kind] / times["jax"], 3)
    if flops:
        row["gflop"] = round(flops / 1e9, 3)
        row["jax_tflops"] = round(flops / times["jax"] / 1e12, 4)
        precision, tflops = peak
        row["peak"] = precision
        if tflops:
            row["peak_tflops"] = tflops
            row["mfu"] = round(flops / times["jax"] / 1e12 / tflops, 4)
    return row


def precision(dtype: str, backend: str | None = None) -> str:
    """The arithmetic the convolutions run in: "bf16"; "tf32" for float32 on a GPU (JAX's default
    precision and PyTorch's `cudnn.allow_tf32`, both on by default); else "fp32"."""
    if dtype == "bfloat16":
        return "bf16"
    return "tf32" if (backend or jax.default_backend()) in ("gpu", "cuda", "rocm") else "fp32"


def _peak(dtype: str, given: float | None) -> tuple[str, float | None]:
    """(the precision the peak is for, dense peak TFLOP/s or None where unknown)."""
    name = precision(dtype)
    if given:
        return name, given
    kinds = " ".join(d.device_kind for d in jax.devices())
    return name, next((v for (k, p), v in PEAK_TFLOPS.items() if k in kinds and p == name), None)


def _torch_sides(jax_side, dtype, vs_torch: bool, compile_torch: bool) -> dict:
    if not vs_torch or jax_side.method_name != "baseline":  # only the baseline has a PyTorch twin
        return {}
    sides = {"eager": TorchSide(jax_side, dtype, compiled=False)}
    if compile_torch:
        import torch

        if hasattr(torch, "compile"):
            sides["compile"] = TorchSide(jax_side, dtype, compiled=True)
    return sides


def _check(args) -> None:
    if args.vs_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise JaxbratsError(
                "--vs torch needs PyTorch: pip install torch==2.13.0, then pip install 'jaxbrats[torch]'"
            )
    if args.method != ["baseline"] and set(args.what) - {"eval"}:
        raise JaxbratsError(
            f"--method {' '.join(args.method)} times the evaluation only (--what eval); "
            "tools/bench_engine.py times every method's train step"
        )


def run(args) -> dict:
    _check(args)
    device = machine(with_torch=args.vs_torch)
    result = {"device": device, "date": time.strftime("%Y-%m-%d"), "command": args.command_line, "runs": []}
    print(json.dumps(result["device"]))
    peak = _peak(args.dtype, args.peak_tflops)

    def record(what, size, batch, jax_call, flops, torch_calls, **extra):
        times, errors = alternating_medians({"jax": jax_call, **torch_calls}, args.repeats, args.warmup)
        if "jax" in errors:
            raise JaxbratsError(f"the JAX {what} failed: {errors['jax']}")
        rows = [
            _row(what, size, batch, args.dtype, times, flops, peak, kind, errors.get(kind)) for kind in torch_calls
        ] or [_row(what, size, batch, args.dtype, times, flops, peak)]
        for row in rows:
            row.update(extra)
            if args.vs_torch and not torch_calls:
                row["torch_note"] = f"no PyTorch twin of {row.get('method')}: JAX only"
            result["runs"].append(row)
            print(_describe(row))
        if args.json:  # after every measurement, so a long run that stops keeps what it measured
            files.write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")

    for size in train_sizes(args) if set(args.what) - {"eval"} else ():
        for batch in args.batch:
            jax_side = JaxSide(args, args.remat, crop=(size,) * 3)
            sides = _torch_sides(jax_side, args.dtype, args.vs_torch, not args.no_compile)
            image, labels = _inputs((size,) * 3, batch)
            if "train" in args.what:
                call, flops = jax_side.train_step(image, labels)
                torch_calls = {k: s.train_step(image, labels) for k, s in sides.items()}
                record("train_step", (size,) * 3, batch, call, flops, torch_calls)
            if "forward" in args.what:
                call, flops = jax_side.forward(image)
                record("forward", (size,) * 3, batch, call, flops, {k: s.forward(image) for k, s in sides.items()})
    for method in args.method if "eval" in args.what else ():
        window, shape = eval_window(args), eval_shape(args)
        jax_side = JaxSide(args, remat=False, method=method)
        sides = _torch_sides(jax_side, args.dtype, args.vs_torch, not args.no_compile)
        image, labels = _inputs(shape, None, seed=1)
        call, flops, extra = jax_side.evaluation(image, labels)
        overlap = jax_side.config.eval.overlap
        torch_calls = {k: s.evaluation(image, labels, window, overlap, args.window_batch) for k, s in sides.items()}
        record("eval_15_subsets", shape, 1, call, flops, torch_calls, window=[window] * 3, **extra)
    print()
    print(markdown_table(result))
    if args.json:
        print(f"wrote {args.json}")
    return result


def train_sizes(args) -> list[int]:
    return args.size or [64]


def markdown_table(result: dict) -> str:
    """The runs as a Markdown table (times in ms), for docs/benchmarks/README.md and papers' supplements."""
    lines = [
        "| what | size | batch | dtype | JAX ms | PyTorch | PyTorch ms | torch / jax | JAX TFLOP/s | MFU (peak) |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in result["runs"]:
        what = row["what"] + (f" ({row['method']})" if row.get("method", "baseline") != "baseline" else "")
        size = "x".join(map(str, row["size"])) + (f" (window {row['window'][0]}^3)" if "window" in row else "")
        torch_ms = f"{row['torch_s'] * 1e3:.1f}" if "torch_s" in row else ("failed" if "torch_error" in row else "")
        ratio = f"{row['ratio_torch_over_jax']:.2f}" if "torch_s" in row else ""
        tflops = f"{row['jax_tflops']:.3f}" if "jax_tflops" in row else ""
        mfu = f"{row['mfu']:.1%} ({row['peak']})" if "mfu" in row else ""
        lines.append(
            f"| {what} | {size} | {row['batch']} | {row['dtype']} | {row['jax_s'] * 1e3:.1f} | "
            f"{row.get('torch', '')} | {torch_ms} | {ratio} | {tflops} | {mfu} |"
        )
    return "\n".join(lines)


def _describe(row: dict) -> str:
    size = "x".join(map(str, row["size"]))
    text = f"{row['what']:16s} {size:>11s} batch {row['batch']} {row['dtype']:8s} jax {row['jax_s'] * 1e3:9.1f} ms"
    if "torch_s" in row:
        text += f"  torch[{row['torch']}] {row['torch_s'] * 1e3:9.1f} ms  torch/jax {row['ratio_torch_over_jax']:.2f}"
    elif "torch_error" in row:
        text += f"  torch[{row['torch']}] failed: {row['torch_error'][:80]}"
    if "jax_tflops" in row:
        mfu = f", MFU {row['mfu']:.1%} of {row['peak']}" if "mfu" in row else ""
        text += f"  ({row['jax_tflops']:.3f} TFLOP/s{mfu})"
    if "gflop_per_window" in row:
        text += f"  {row['gflop_per_window']:.2f} GFLOP per window, {row['gflop_per_subset']:.2f} per subset"
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size",
        type=int,
        nargs="+",
        help="cubic crop size(s) of train and forward (default 64); with --what eval and no --eval-window, the "
        "first size is also the evaluation window, and without --eval-shape the case is that one window "
        "(--size 32: 32^3 windows on a 32^3 case); without --size the evaluation scores a 240x240x155 case "
        "with 128^3 windows",
    )
    parser.add_argument(
        "--method",
        nargs="+",
        default=["baseline"],
        metavar="NAME",
        help="the method(s) whose evaluation is timed, one row each, with its FLOPs per window and per subset "
        "(--what eval; only the baseline has PyTorch rows)",
    )
    parser.add_argument("--stage", help="the stage whose models are evaluated (default: the first that segments)")
    parser.add_argument("--batch", type=int, nargs="+", default=[2])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--vs", choices=["torch"], help="also time the PyTorch reference (eager and torch.compile)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--what", nargs="+", choices=["train", "forward", "eval"], default=["train", "forward", "eval"])
    parser.add_argument(
        "--eval-shape",
        type=int,
        nargs=3,
        help="case shape of the 15-subset evaluation (default: a full 240x240x155 BraTS volume; see --size)",
    )
    parser.add_argument("--eval-window", type=int, help="cubic evaluation window (default: 128; see --size)")
    parser.add_argument("--window-batch", type=int, default=1, help="windows per forward pass in the evaluation")
    parser.add_argument("--conv-impl", choices=["auto", "native", "depth2d"], default="auto")
    parser.add_argument("--remat", action="store_true", help="activation checkpointing of each residual block (JAX)")
    parser.add_argument("--widths", type=int, nargs="+", help="U-Net widths (default: the method's, the paper's)")
    parser.add_argument("--blocks", type=int, nargs="+", help="residual blocks per level (default: the method's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--peak-tflops", type=float, help="device peak for the MFU column, when not in the built-in table"
    )
    parser.add_argument("--json", help="write the results here")


def main(args) -> int:
    args.vs_torch = args.vs == "torch"
    announce_platform()
    run(args)
    return 0
