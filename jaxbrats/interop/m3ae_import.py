"""Import the official M3AE PyTorch checkpoint into a jaxbrats run directory (`jaxbrats import-m3ae`).

Supported checkpoint: the fine-tuning script of the public code
(github.com/ccarliu/m3ae, ``train_18.py``; read at commit fdb2800) saves
``torch.save({"epoch": int, "state_dict": ..., "optimizer": ...},
"<folder>model_best_<epoch>.pth.tar")``; the state dict is that of
``nn.DataParallel(Unet_missing)``, so every key starts with ``module.``.
Accepted: that dict (other top-level entries ignored), or a bare state dict;
with or without the ``module.`` prefix. Keys and shapes
(`interop.torch_m3ae` fixes them): ``limage`` (1, 4, Z, Y, X), the
substitute image x_sub (BraTS: 155 x 240 x 240); 112 ``unet.*`` tensors of
the 16-32-64-128 residual U-Net with 3 region outputs (4,704,505 values with
the heads below); the 4 deep-supervision
``unet.ds_out.{0,1}.{weight,bias}`` all present (``--deep_supervised True``,
as the public run script) or all absent (then zeros: they act in training
only). A pretraining checkpoint (4 reconstruction outputs) is refused. The
file is read with ``torch.load(weights_only=True)``: nothing in it is
executed; a checkpoint holding other pickled Python objects is refused, and
so is a tensor that is not floating point or holds NaN or Inf.

What is written (`out_dir`, which must not exist or be empty; built in a
hidden sibling folder and renamed into place, so nothing half-written
stays; each file is written atomically too, at its `RunDir` place):
``config.json`` (an M3AE run with the public code's settings:
`run_config`), ``data.json`` (the preprocessing the public code applied:
percentile normalisation, a 1-voxel brain margin), ``import.json`` (what was
imported, from where) and the Orbax checkpoint ``checkpoints/finetune/0``
of the fine-tuning stage's models (``unet``, ``x_sub``) with fresh
optimiser states, through `jaxbrats.runtime.checkpoints`, so ``jaxbrats eval`` and
``jaxbrats predict`` load it (`inference.trained.load_trained`).

How tensors map (public -> jaxbrats):

- channels: inputs (t1, t1ce, t2, flair) -> `modalities.MODALITIES` (flair,
  t1ce, t1, t2), on the stem's input axis and on x_sub; outputs (ET, TC,
  WT) -> `labels.REGIONS` (WT, TC, ET), on the head and the deep heads;
- kernels (O, I, kz, ky, kx) -> (D, H, W, I, O): the public arrays are the
  NIfTI voxel axes reversed (SimpleITK), jaxbrats' are RAS+ (`data.loading`);
  each kernel axis is moved to the RAS+ axis of its voxel axis and *not*
  flipped. The JAX network is then exactly the public network applied to the
  case as jaxbrats holds it (mirrored along the axes the reorientation flips:
  L-R and A-P for BraTS' LPS files). Fine-tuning flipped every axis at
  random (p 0.5 each, x_sub flipped with the image), so the mirrored case is
  one of the inputs it was trained on. Flipping the kernels instead would
  mirror the network but not exactly: a stride-2 convolution (padding 1, even
  size) samples the even voxels, its mirror the odd ones, so every coarse
  feature would sit 1-7 voxels off its skip connection;
- x_sub: (1, 4, Z, Y, X) -> (X, Y, Z) voxel order -> RAS+ (flips included:
  it is an image, it must lie where the image lies) -> channels last. Its
  frame is the source volume's voxel grid: fine-tuning read it at
  ``crop_indexes`` in the uncropped volume (and pretraining learnt it
  there), which is jaxbrats' "template" frame (`transforms.case_corner`:
  box_start + window start). The public test script reads it at window
  coordinates of the brain-cropped volume instead, which is not where the
  weights were trained (a pitfall of the public code: training reads x_sub in
  the original volume's coordinates, testing in the cropped volume's); the
  import keeps the training frame.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbrats.config import save_config, to_dict
from jaxbrats.engine.optim import stage_optimizers
from jaxbrats.engine.state import abstract_models, optimizer_states
from jaxbrats.engine.workdir import write_data_record, write_import_record, write_splits
from jaxbrats.errors import JaxbratsError, require
from jaxbrats.files import mkdtemp
from jaxbrats.labels import REGIONS
from jaxbrats.methods import config_from_data
from jaxbrats.methods.m3ae import M3AE
from jaxbrats.modalities import MODALITIES
from jaxbrats.runtime.checkpoints import checkpoint_manager, save
from jaxbrats.runtime.rundir import RunDir

STAGE = "finetune"
PREFIX = "module."  # nn.DataParallel's, in every key the public scripts save
STEM = "unet.conv1a.weight"
HEADS = ("unet.up1conv.", "unet.ds_out.0.", "unet.ds_out.1.")
DEEP_KEYS = tuple(f"unet.ds_out.{i}.{leaf}" for i in (0, 1) for leaf in ("weight", "bias"))
BRATS_AXCODES = ("L", "P", "S")  # the voxel axes of the BraTS releases' NIfTI files
PUBLIC_CODE = "github.com/ccarliu/m3ae at fdb280034b7c52f3942efc6b11568e25ae2c5c11 (model/Unet.py, train_18.py)"


# --- the run's settings --------------------------------------------------------------------


def run_config(substitute_shape) -> dict:
    """An M3AE run's config with the public code's settings (where they differ from the paper,
    the code's: nearest upsampling, the deep-supervision consistency, independent views), and
    its evaluation: 128^3 windows, overlap 0.5, equal window weights (MONAI's "constant"),
    threshold 0.5, HD95 0 when a region is empty in either map."""
    return {
        "method": {
            "name": "m3ae",
            "mask_ratio": 0.875,
            "patch_size": 16,
            "fill": "x_sub",
            "substitute_shape": list(substitute_shape),
            "substitute_frame": "template",
            "substitute_penalty": "centered_norm",
            "substitute_weight": 0.005,
            "consistency_weight": 0.1,
            "consistency_feature": "deep_quarter",
            "distinct_views": False,
            "seg_balance": "code",
        },
        "model": {
            "widths": [16, 32, 64, 128],
            "blocks": [1, 2, 2, 4],
            "groups": 8,
            "upsample": "nearest",
            "dtype": "float32",
        },
        "data": {
            "crop_size": [128, 128, 128],
            "batch_size": 2,
            "foreground_oversample": 0.0,
            "flip_probability": 0.5,
            "intensity_scale": 0.1,
            "intensity_shift": 0.1,
        },
        "stages": {
            "pretrain": {
                "epochs": 600,
                "optimizers": {
                    "model": {
                        "name": "adam",
                        "lr": 3e-4,
                        "weight_decay": 0.0,
                        "schedule": "cosine",
                        "model_lr": {"x_sub": 5e-3},
                    }
                },
            },
            STAGE: {
                "epochs": 300,
                "batch_size": 1,
                "optimizers": {"model": {"name": "adam", "lr": 3e-4, "weight_decay": 1e-4, "schedule": "cosine"}},
            },
        },
        "eval": {
            "window": [128, 128, 128],
            "overlap": 0.5,
            "blend": "uniform",
            "average": "logits",
            "threshold": 0.5,
            "hd95_empty": "zero",
        },
    }


def orientation(axcodes) -> np.ndarray:
    """nibabel's transform (3, 2) from the source voxel axes (`axcodes`, e.g. L, P, S) to RAS+."""
    codes = tuple(str(c).upper() for c in axcodes)
    pairs = {frozenset(p) for p in ("LR", "AP", "SI")}
    if len(codes) != 3 or {frozenset(p) for p in pairs for c in codes if c in p} != pairs:
        raise JaxbratsError(f"source axes {''.join(codes)!r}: need one of L/R, A/P, S/I each (BraTS: LPS)")
    ornt = require("nibabel.orientations", "importing M3AE weights")
    return ornt.ornt_transform(ornt.axcodes2ornt(codes), ornt.axcodes2ornt("RAS"))


# --- reading the checkpoint ----------------------------------------------------------------


WEIGHTS_ONLY_FAILED = "Weights only load failed"  # how torch's message starts when the safe unpickler refuses
UNPICKLER_REASON = "WeightsUnpickler error:"  # the line of that message giving the reason


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines or [type(error).__name__])[0][:200]


def _refused(path: Path, error: Exception) -> JaxbratsError:
    """The weights-only unpickler's refusal in our words. Torch's own message suggests loading with
    ``weights_only=False`` or allow-listing the class: both run the file's code, so neither is offered."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text)  # the class or function the file would have called
    if found:
        return JaxbratsError(
            f"{path}: holds pickled Python objects ({found.group(1)}: code), not only tensors; refused: "
            f"jaxbrats reads checkpoints with torch.load(weights_only=True) and runs nothing from them"
        )
    reason = [line.strip() for line in text.split(UNPICKLER_REASON, 1)[-1].splitlines() if line.strip()]
    return JaxbratsError(f"{path}: not a PyTorch checkpoint ({(reason or ['unreadable'])[0][:160]})")


def public():
    """`interop.torch_m3ae`: the public network's names, channel orders and shapes (needs PyTorch)."""
    try:
        from jaxbrats.interop import torch_m3ae
    except ImportError:
        raise JaxbratsError("importing an M3AE checkpoint needs PyTorch: pip install 'jaxbrats[torch]'") from None
    return torch_m3ae


def channel_orders() -> tuple[list[int], list[int]]:
    """(public input channel of each jaxbrats modality, public output of each jaxbrats region)."""
    p = public()
    return [p.PUBLIC_MODALITIES.index(m) for m in MODALITIES], [p.PUBLIC_REGIONS.index(r) for r in REGIONS]


def load_checkpoint(path: Path):
    """The unpickled file, read with ``weights_only=True`` (tensors and plain containers only)."""
    if not path.is_file():
        raise JaxbratsError(f"{path}: no such file")
    public()  # a missing PyTorch is one line, not an ImportError
    import torch

    try:
        with warnings.catch_warnings():  # torch warns of a plain pickle's protocol before refusing it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if WEIGHTS_ONLY_FAILED in str(e):
            raise _refused(path, e) from None
        raise JaxbratsError(f"{path}: not a PyTorch checkpoint ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001  zip, pickle and EOF errors all mean "not a torch file"
        raise JaxbratsError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") from None


def state_dict_of(loaded, path: Path) -> tuple[dict, str, object]:
    """(state dict without the ``module.`` prefix, the prefix found, the saved epoch or None)."""
    import torch

    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        state, epoch = loaded["state_dict"], loaded.get("epoch")
    elif isinstance(loaded, Mapping) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        state, epoch = loaded, None
    else:
        what = sorted(map(str, loaded))[:5] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise JaxbratsError(f"{path}: no 'state_dict' of tensors in it ({what})")
    prefix = PREFIX if state and all(str(k).startswith(PREFIX) for k in state) else ""
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise JaxbratsError(f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor")
        out[str(key)[len(prefix) :]] = value
    return out, prefix, epoch


def expected_shapes(volume, deep: bool) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the public network (`interop.torch_m3ae`), built on the meta device (nothing allocated)."""
    import torch

    with torch.device("meta"):
        model = public().build(volume, deep_supervised=deep)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_keys(state: dict, prefix: str, path: Path) -> tuple[tuple[int, int, int], bool]:
    """(x_sub's public volume (Z, Y, X), deep-supervision heads present); one line per problem."""
    channels = len(public().PUBLIC_MODALITIES)
    limage = state.get("limage")
    if limage is None:
        raise JaxbratsError(
            f"{path}: key {prefix}limage (the substitute image x_sub) is missing: "
            f"not a checkpoint of M3AE's Unet_missing"
        )
    if limage.ndim != 5 or tuple(limage.shape[:2]) != (1, channels):
        raise JaxbratsError(f"{path}: key {prefix}limage has shape {tuple(limage.shape)}, M3AE's is (1, 4, Z, Y, X)")
    deep = [k for k in DEEP_KEYS if k in state]
    if deep and len(deep) < len(DEEP_KEYS):
        missing = next(k for k in DEEP_KEYS if k not in state)
        raise JaxbratsError(
            f"{path}: key {prefix}{missing} is missing (the checkpoint has only part of the deep-supervision heads)"
        )
    head = state.get("unet.up1conv.weight")
    if head is not None and head.ndim and head.shape[0] == channels:
        raise JaxbratsError(
            f"{path}: key {prefix}unet.up1conv.weight has shape {tuple(head.shape)}: a pretraining "
            f"checkpoint (4 reconstruction outputs); import the fine-tuned one (3 region outputs)"
        )
    volume = tuple(int(s) for s in limage.shape[2:])
    want = expected_shapes(volume, bool(deep))
    for key in sorted(want):
        if key not in state:
            raise JaxbratsError(f"{path}: key {prefix}{key} is missing: not a checkpoint of M3AE's fine-tuned network")
    for key in sorted(state):
        if key not in want:
            raise JaxbratsError(
                f"{path}: key {prefix}{key} is not part of M3AE's fine-tuned network (16-channel U-Net + limage)"
            )
        have = tuple(state[key].shape)
        if have != want[key]:
            raise JaxbratsError(f"{path}: key {prefix}{key} has shape {have}, M3AE's network has {want[key]}")
    return volume, bool(deep)


def check_values(state: dict, prefix: str, path: Path) -> None:
    """Every tensor is a floating-point weight with finite values. The public network normalises
    with GroupNorm only (model/Unet.py): it has no integer buffers such as BatchNorm's
    ``num_batches_tracked``, so every tensor `check_keys` lets through is loaded as a weight."""
    import torch

    for key in sorted(state):
        value = state[key]
        if not value.is_floating_point():
            dtype = str(value.dtype).removeprefix("torch.")
            raise JaxbratsError(f"{path}: key {prefix}{key} holds {dtype} values; M3AE's weights are floating point")
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            nan, bad = int(torch.isnan(value).sum()), int((~finite).sum())
            raise JaxbratsError(
                f"{path}: key {prefix}{key} holds {nan} NaN and {bad - nan} infinite value(s) of {value.numel()}; "
                f"a network with them predicts nothing usable"
            )


# --- conversion ----------------------------------------------------------------------------


def public_key(model: str, path: tuple) -> str:
    """The public state-dict key (no prefix) of a jaxbrats variable of the finetune stage's models."""
    names = public()
    if model == "x_sub":
        return "limage"
    _, kind, *rest = [str(p) for p in path]  # ("encoder" | "decoder", kind, ...)
    if kind == "stem":
        name = "conv1a"
    elif kind == "head":
        name = "up1conv"
    elif kind == "levels":
        name, rest = names.ENCODER_BLOCKS[int(rest[0])][int(rest[1])], rest[2:]
    else:
        table = {
            "downs": names.DOWNSAMPLINGS,
            "reduce": names.DECODER_REDUCE,
            "blocks": names.DECODER_BLOCKS,
            "ds_heads": names.DEEP_HEADS,
        }[kind]
        name, rest = table[int(rest[0])], rest[1:]
    leaf = {"kernel": "weight", "bias": "bias", "scale": "weight"}[rest[-1]]
    if rest[0].startswith("norm"):  # normK.norm.{scale,bias} -> gnK.{weight,bias}
        return f"unet.{name}.gn{rest[0][4:]}.{leaf}"
    return f"unet.{name}.{'.'.join([*rest[:-1], leaf])}"


def kernel_axes(transform: np.ndarray) -> list[int]:
    """Torch weight dims (O, I, k0, k1, k2 = voxel axes reversed) for jaxbrats' (D, H, W) RAS+ axes."""
    voxel_axis = {int(target): source for source, (target, _) in enumerate(transform)}
    return [2 + (2 - voxel_axis[a]) for a in range(3)]


def ras_shape(volume, transform) -> tuple[int, int, int]:
    """The RAS+ shape of a public (Z, Y, X) volume."""
    shape = [0, 0, 0]
    for source, size in enumerate(volume[::-1]):  # voxel axes X, Y, Z
        shape[int(transform[source][0])] = int(size)
    return tuple(shape)


def convert(key: str, value: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """One public tensor in jaxbrats' layout, channel orders and frame (module docstring)."""
    inputs, outputs = channel_orders()
    if key == "limage":
        voxels = value[0].transpose(3, 2, 1, 0)  # (4, Z, Y, X) -> (X, Y, Z, 4): the NIfTI voxel order
        ornt = require("nibabel.orientations", "importing M3AE weights")
        return np.ascontiguousarray(ornt.apply_orientation(voxels, transform)[..., inputs])
    if key.startswith(HEADS):
        value = value[outputs]
    if key == STEM:
        value = value[:, inputs]
    if value.ndim == 5:  # (O, I, k, k, k) -> (D, H, W, I, O), kernel axes moved, not flipped
        value = value.transpose(*kernel_axes(transform), 1, 0)
    return np.ascontiguousarray(value)


def jax_models(method: M3AE, state: dict, transform: np.ndarray, path: Path) -> dict:
    """{model name: nnx.State} of the finetune stage holding the converted tensors (zeros: absent deep heads)."""
    _, abstract = abstract_models(method, STAGE)
    models = {}
    for name, model_state in abstract.items():
        flat = dict(nnx.to_flat_state(model_state))
        for var_path, variable in flat.items():
            key = public_key(name, var_path)
            abstract_value = variable.get_value()  # a ShapeDtypeStruct: nothing was initialised
            shape, dtype = abstract_value.shape, abstract_value.dtype
            if key in state:
                value = convert(key, state[key].detach().float().numpy(), transform)
            else:
                value = np.zeros(shape, dtype)  # deep-supervision heads of a checkpoint trained without them
            if value.shape != shape:
                raise JaxbratsError(f"{path}: key {key} converts to shape {value.shape}, jaxbrats' M3AE needs {shape}")
            flat[var_path] = variable.replace(value=jnp.asarray(value, dtype))
        models[name] = nnx.from_flat_state(flat)
    return models


def parameter_count(models: dict, name: str) -> int:
    return int(sum(np.prod(v.get_value().shape) for _, v in nnx.to_flat_state(models[name])))


# --- the run directory ---------------------------------------------------------------------


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        what = "is not empty" if out_dir.is_dir() else "is not a folder"
        raise JaxbratsError(f"{out_dir}: exists and {what}; import into a new folder")


def train_state(method: M3AE, models: dict) -> dict:
    """A complete finetune train state (fresh optimiser states, step 0): `init_from` can start from it too."""
    optimizers = stage_optimizers(method, STAGE, 1)
    # The engine's own builder, so the layout is the one a restore template of this stage has.
    opt = optimizer_states(method, STAGE, optimizers, models)
    key = jax.random.PRNGKey(method.config.train.seed + method.stages.index(STAGE))
    return {"models": models, "opt": opt, "step": jnp.zeros((), jnp.int32), "key": key}


def write_run(folder: Path, config, state: dict, summary: dict, preprocessing: dict, splits) -> None:
    save_config(config, RunDir(folder).config)
    write_data_record(folder, "", preprocessing)
    if splits is not None:
        write_splits(folder, splits)
    manager = checkpoint_manager(folder, STAGE, keep=1)
    extra = {"config": to_dict(config), "stage": STAGE, "total_steps": 0, "processes": 1, "imported": summary}
    save(manager, state, extra)
    manager.wait_until_finished()
    manager.close()
    write_import_record(folder, summary)


def move_into_place(folder: Path, out_dir: Path) -> None:
    check_out_dir(out_dir)  # again: something may have appeared there meanwhile
    if out_dir.exists():
        out_dir.rmdir()
    os.replace(folder, out_dir)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def import_m3ae(
    checkpoint, out_dir, *, source_axcodes=BRATS_AXCODES, margin: int = 1, splits: Mapping | None = None
) -> dict:
    """Write a jaxbrats M3AE run in `out_dir` from the official fine-tuned checkpoint; returns a summary.

    `source_axcodes`: the voxel axes of the NIfTI files the checkpoint was trained on (BraTS: L, P,
    S); they fix x_sub's place in RAS+ and which kernel axis meets which image axis. `margin`: the
    brain-box margin written to data.json (the public code crops 1 voxel before the brain and
    none after; prepare the evaluation cache with ``--normalize percentile --margin`` the same).
    `splits`: optional {"train"|"val"|"test": case ids} written as the run's splits.json.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if int(margin) < 0:  # predict would crop inside the brain box
        raise JaxbratsError(f"--margin {margin}: the brain-box margin must be 0 or more (public code: 1)")
    check_out_dir(out_dir)
    transform = orientation(source_axcodes)
    state, prefix, epoch = state_dict_of(load_checkpoint(checkpoint), checkpoint)
    volume, deep = check_keys(state, prefix, checkpoint)
    check_values(state, prefix, checkpoint)
    substitute_shape = ras_shape(volume, transform)
    config = config_from_data(run_config(substitute_shape), "import-m3ae")
    method = M3AE(config)
    models = jax_models(method, state, transform, checkpoint)
    preprocessing = {"normalization": "percentile", "margin": int(margin)}
    summary = {
        "checkpoint": str(checkpoint.absolute()),
        "sha256": sha256(checkpoint),
        "epoch": epoch if epoch is None or isinstance(epoch, (int, float)) else str(epoch),
        "stage": STAGE,
        "unet_parameters": parameter_count(models, "unet"),
        "x_sub_shape": [*substitute_shape, len(MODALITIES)],
        "x_sub_public_shape": [1, len(MODALITIES), *volume],
        "frame": "template",
        "source_axcodes": "".join(c.upper() for c in source_axcodes),
        "deep_supervision_heads": "imported" if deep else "zeros (absent from the checkpoint; used in training only)",
        "preprocessing": preprocessing,
        "public_code": PUBLIC_CODE,
        "workdir": str(out_dir.absolute()),
        "config": str(RunDir(out_dir.absolute()).config),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    folder = mkdtemp(prefix=f".{out_dir.name}.import-", dir=out_dir.parent)
    try:
        write_run(folder, config, train_state(method, models), summary, preprocessing, splits)
        move_into_place(folder, out_dir)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return summary
