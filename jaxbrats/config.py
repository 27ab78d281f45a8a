"""Run configuration: TOML files checked against a typed schema of dataclasses.

A config file has the sections of `Config`; a method's own settings live in
``[method]`` next to its ``name`` and are typed by the method's options class;
``[stages.<name>]`` holds the epochs and optimisers of each of the method's
stages. Unknown keys, wrong types and bad values raise `ConfigError` naming
the file, the key and the value (each section's `validate`, and `Config.validate`
for rules across sections). ``--set key.path=value`` overrides take TOML values
(``--set data.crop_size=[64,64,64]``, ``--set method.output='"labels"'``;
a value that is not valid TOML is taken as a string).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from pathlib import Path

from jaxbrats.errors import ConfigError  # noqa: F401  (re-exported: config and methods both raise it)
from jaxbrats.files import write_text_atomic
from jaxbrats.modalities import SUBSET_NAMES

# --- value checks: each raises ConfigError naming the key and the bad value -------------------

UPSAMPLES = ("nearest", "trilinear")  # networks.unet.UNetConfig
DTYPES = ("float32", "bfloat16")
CONV_IMPLS = ("auto", "native", "depth2d")  # networks.layers.conv3d
FAMILY_MAPS = ("auto", "vmap", "unroll")  # networks.family
BLENDS = ("gaussian", "uniform")  # inference.sliding_window
HD95_CONVENTIONS = ("brats", "zero", "nan", "brats2023")  # evaluation.metrics.HD95_EMPTY
SPLITS = ("auto", "files", "ratio")  # DataConfig.split
AVERAGES = ("probabilities", "logits")  # EvalConfig.average: what the sliding window blends
DECODINGS = ("auto", "threshold", "argmax")  # EvalConfig.decoding: region probabilities -> labels
TTAS = ("none", "flips")  # EvalConfig.tta: test-time mirroring (inference.segment.mirrored)
BEST_SCORES = ("dice_mean", "dice_WT", "dice_TC", "dice_ET")  # TrainConfig.best_score
SEED_LIMIT = 2**31  # Grain's sampler takes 32-bit seeds; a run adds the stage index to train.seed


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _show(value) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def check_choice(where: str, value, allowed) -> None:
    """`value` must be one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{where} must be one of {list(allowed)}, got {value!r}")


def _rule(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _inside(value, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    if high is not None and (value >= high if high_open else value > high):
        return False
    return True


def check_range(where: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False) -> None:
    """`value` must lie between `low` and `high` (either may be None; bounds closed unless `*_open`)."""
    if not _inside(value, low, high, low_open, high_open):
        raise ConfigError(f"{where} must be {_rule(low, high, low_open, high_open)}, got {_show(value)}")


def check_entries(where: str, values, low=None, high=None, *, low_open: bool = False, high_open: bool = False) -> None:
    """Every entry of the list `values` must lie between `low` and `high` (as `check_range`)."""
    if not all(_inside(v, low, high, low_open, high_open) for v in values):
        raise ConfigError(f"{where} entries must be {_rule(low, high, low_open, high_open)}, got {_show(values)}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 3e-4
    weight_decay: float = 0.0  # adam: L2 added to the gradient (PyTorch Adam); adamw: decoupled
    schedule: str = "cosine"  # constant | cosine | poly
    poly_power: float = 0.9
    warmup_steps: int = 0
    clip_norm: float = 0.0  # global gradient norm clipping; 0 disables
    momentum: float = 0.9  # sgd only
    #: Peak learning rate of single models of this group, e.g. {x_sub = 5e-3} for M3AE's
    #: substitute image; the group's other models use `lr`. Same schedule, clipping over all.
    model_lr: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self, where: str) -> None:
        check_choice(where + ".name", self.name, ("adam", "adamw", "sgd"))
        check_choice(where + ".schedule", self.schedule, ("constant", "cosine", "poly"))
        for name, lr in {"lr": self.lr, **{f"model_lr.{k}": v for k, v in self.model_lr.items()}}.items():
            if lr <= 0:
                raise ConfigError(f"{where}.{name} must be positive, got {lr}")
        check_range(where + ".weight_decay", self.weight_decay, 0)
        check_range(where + ".poly_power", self.poly_power, 0, low_open=True)
        check_range(where + ".warmup_steps", self.warmup_steps, 0)
        check_range(where + ".clip_norm", self.clip_norm, 0)
        check_range(where + ".momentum", self.momentum, 0, 1, high_open=True)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    epochs: int = 1
    steps: int = 0  # when > 0, the stage length in steps (overrides epochs)
    #: Samples per step in this stage; 0: `data.batch_size`. M3AE fine-tunes on one subject
    #: per step, seen as two missing-modality instantiations.
    batch_size: int = 0
    #: One optimiser per update group of the method (e.g. "model", "discriminator").
    optimizers: dict[str, OptimizerConfig] = dataclasses.field(default_factory=dict)
    #: Start this stage from a checkpoint directory (a stage of another run) instead of
    #: the previous stage of this run.
    init_from: str = ""

    def validate(self, where: str) -> None:
        # epochs = steps = 0 is a stage of no steps: M3AE's "no pretraining" ablation (Table 3 a).
        for name in ("epochs", "steps", "batch_size"):
            check_range(_key(where, name), getattr(self, name), 0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: tuple[int, ...] = (1, 2, 2, 4)
    groups: int = 8
    upsample: str = "nearest"
    dropout: float = 0.0
    stem_dropout: float = 0.0  # spatial (whole-channel) dropout after the first convolution (RIRN: 0.2)
    dtype: str = "float32"
    conv_impl: str = "auto"
    remat: bool = False  # activation checkpointing per residual block (and AFEB): less memory, ~1/3 more compute
    #: How a family of models (stacked students) is computed: "vmap" (batched; what the mesh's
    #: "model" axis splits), "unroll" (one member after another in the program; XLA:CPU runs
    #: batched convolutions slowly) or "auto" (unroll on CPU, vmap elsewhere): `networks.family`.
    family_map: str = "auto"

    def validate(self, where: str) -> None:
        for name in ("widths", "blocks"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"{_key(where, name)} must not be empty, got []")
            check_entries(_key(where, name), values, 1)
        if len(self.blocks) != len(self.widths):
            raise ConfigError(
                f"{_key(where, 'blocks')} needs one entry per entry of {_key(where, 'widths')} "
                f"({len(self.widths)}), got {_show(self.blocks)}"
            )
        check_range(_key(where, "groups"), self.groups, 1)
        if any(w % self.groups for w in self.widths):
            raise ConfigError(
                f"{_key(where, 'widths')} entries must be divisible by {_key(where, 'groups')} = {self.groups} "
                f"(GroupNorm), got {_show(self.widths)}"
            )
        check_choice(_key(where, "upsample"), self.upsample, UPSAMPLES)
        check_choice(_key(where, "dtype"), self.dtype, DTYPES)
        check_choice(_key(where, "conv_impl"), self.conv_impl, CONV_IMPLS)
        check_choice(_key(where, "family_map"), self.family_map, FAMILY_MAPS)
        check_range(_key(where, "dropout"), self.dropout, 0, 1, high_open=True)
        check_range(_key(where, "stem_dropout"), self.stem_dropout, 0, 1, high_open=True)


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How the training loader cuts, augments and loads crops (`jaxbrats.data.pipeline`).

    Declared once: ``[data]`` (`DataConfig`) holds these keys, and the loader's own settings
    (`data.pipeline.PipelineConfig`) are these plus what a run's stage decides.
    """

    crop_size: tuple[int, int, int] = (128, 128, 128)
    #: Probability that a crop is centred on a tumour voxel (class chosen uniformly).
    foreground_oversample: float = 0.33
    #: Probability of a flip along each spatial axis.
    flip_probability: float = 0.5
    #: Per-channel intensity x * U(1 - scale, 1 + scale) + U(-shift, shift) (M3AE: 0.1, 0.1),
    #: on the case's voxels (padding stays 0).
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    #: Random rotation of each crop: by U(-rotation_degrees, rotation_degrees) degrees in one of
    #: the three axis planes (chosen uniformly), with `rotation_probability`; 0 degrees (the
    #: default) disables it and draws no random numbers (the stream is unchanged). Not for M3AE
    #: (its x_sub is read where the crop lies).
    rotation_degrees: float = 0.0
    rotation_probability: float = 1.0
    #: Loader processes (0: in the main process) and batches each one prefetches.
    workers: int = 0
    prefetch: int = 2


@dataclasses.dataclass(frozen=True)
class DataConfig(LoaderConfig):
    """``[data]``: the cache, the global batch, the split, and the loader's settings (`LoaderConfig`)."""

    cache: str = ""  # prepared cache directory (`--data` overrides)
    batch_size: int = 2  # global batch, split over the data axis of the mesh
    #: Where the train/val/test split comes from: "files" (train_split, val_split, test_split:
    #: the lists a paper's authors publish, one case per line, as downloaded; docs/usage.md#splits),
    #: "ratio" (a seeded ratio split of the cache) or "auto" (the files when train_split is set,
    #: else the ratios).
    split: str = "auto"
    train_split: str = ""
    val_split: str = ""
    test_split: str = ""
    split_ratios: tuple[float, float, float] = (0.8, 0.0, 0.2)
    split_seed: int = 0
    #: The paper's [train, val, test] case counts, checked when a run fixes its split: each list
    #: file must hold its count (a wrong or truncated download stops the run), a ratio split must
    #: cover their sum. Empty: no check.
    split_counts: tuple[int, ...] = ()

    def validate(self, where: str) -> None:
        check_entries(_key(where, "crop_size"), self.crop_size, 1)
        check_range(_key(where, "batch_size"), self.batch_size, 1)
        for name in ("foreground_oversample", "flip_probability", "rotation_probability"):
            check_range(_key(where, name), getattr(self, name), 0, 1)
        check_range(_key(where, "rotation_degrees"), self.rotation_degrees, 0, 180)
        # Each channel is multiplied by U(1 - scale, 1 + scale): above 1 it could change sign.
        check_range(_key(where, "intensity_scale"), self.intensity_scale, 0, 1)
        check_range(_key(where, "intensity_shift"), self.intensity_shift, 0)
        check_range(_key(where, "workers"), self.workers, 0)
        check_range(_key(where, "prefetch"), self.prefetch, 1)  # Grain's worker buffer needs >= 1
        check_choice(_key(where, "split"), self.split, SPLITS)
        if self.split == "ratio" and self.train_split:
            raise ConfigError(
                f"{_key(where, 'split')} = 'ratio' but {_key(where, 'train_split')} is set "
                f"({self.train_split!r}): set one of the two"
            )
        ratios = _key(where, "split_ratios")
        check_entries(ratios, self.split_ratios, 0)
        if abs(sum(self.split_ratios) - 1.0) > 1e-6:
            raise ConfigError(f"{ratios} must sum to 1, got {_show(self.split_ratios)}")
        if self.split_ratios[0] <= 0:
            raise ConfigError(f"{ratios} must give training a share > 0, got {_show(self.split_ratios)}")
        check_range(_key(where, "split_seed"), self.split_seed, 0)
        counts = _key(where, "split_counts")
        if self.split_counts and len(self.split_counts) != 3:
            raise ConfigError(f"{counts} must be [] or [train, val, test] case counts, got {_show(self.split_counts)}")
        check_entries(counts, self.split_counts, 0)
        if self.split_counts and self.split_counts[0] == 0:
            raise ConfigError(f"{counts} must give training cases, got {_show(self.split_counts)}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    window: tuple[int, int, int] = (128, 128, 128)
    overlap: float = 0.5
    blend: str = "gaussian"  # gaussian | uniform
    window_batch: int = 1
    #: How window outputs are averaged: the region "probabilities" (default), or their "logits"
    #: (M3AE's public test; the logit of each probability, clipped at 1e-6 from 0 and 1).
    average: str = "probabilities"
    #: Region probabilities -> labels: "threshold" (WT, TC, ET each at `threshold`, nested),
    #: "argmax" (of the label probabilities they imply: RFNet's evaluation, which ACDIS follows),
    #: "auto": the method's own (`Method.decoding`). eval_settings.json records the one used.
    decoding: str = "auto"
    threshold: float = 0.5
    #: Test-time augmentation: "flips" averages each window's scores over its 8 mirror images
    #: (every combination of the three spatial axes flipped, each output flipped back: nnU-Net's
    #: mirroring), at the level `average` blends; "none": one pass. 8 x the network's work.
    tta: str = "none"
    #: A centre crop [D, H, W] of the source volume (RAS+ axes) that image AND labels are cut to
    #: before evaluation (ACN's and RIRN's test protocol: 160 x 192 x 128); empty: the whole case.
    center_crop: tuple[int, ...] = ()
    hd95: bool = True
    hd95_empty: str = "brats"  # brats | zero | nan | brats2023 (see metrics.HD95_EMPTY)
    #: Also score BraTS 2023's lesion-wise Dice and HD95 (evaluation.lesion): `lesion_dice` and
    #: `lesion_hd95` per case, subset and region, beside the global scores. Host time per case.
    lesion_wise: bool = False
    et_postprocess: bool = False  # ET < et_min_voxels -> necrosis
    et_min_voxels: int = 500
    #: Padded case shape compiled for; empty: the largest case rounded up to `bucket_multiple`.
    bucket: tuple[int, ...] = ()
    bucket_multiple: int = 16
    #: Devices of the evaluation: `space` splits each window's depth, `data` the windows of a
    #: batch (`window_batch`; 0, the default of a table that omits it: 1); `model` is unused.
    #: data 1 x space 1: one device.
    mesh: "MeshConfig" = dataclasses.field(default_factory=lambda: MeshConfig(data=1))

    def validate(self, where: str) -> None:
        check_entries(_key(where, "window"), self.window, 1)
        check_range(_key(where, "overlap"), self.overlap, 0, 1, high_open=True)
        check_choice(_key(where, "blend"), self.blend, BLENDS)
        check_range(_key(where, "window_batch"), self.window_batch, 1)
        check_choice(_key(where, "average"), self.average, AVERAGES)
        check_choice(_key(where, "decoding"), self.decoding, DECODINGS)
        check_choice(_key(where, "tta"), self.tta, TTAS)
        check_range(_key(where, "threshold"), self.threshold, 0, 1, low_open=True, high_open=True)
        if self.center_crop:
            if len(self.center_crop) != 3:
                raise ConfigError(
                    f"{_key(where, 'center_crop')} needs 3 values (or none), got {_show(self.center_crop)}"
                )
            check_entries(_key(where, "center_crop"), self.center_crop, 1)
        check_choice(_key(where, "hd95_empty"), self.hd95_empty, HD95_CONVENTIONS)
        check_range(_key(where, "et_min_voxels"), self.et_min_voxels, 0)
        if self.bucket:
            bucket = _key(where, "bucket")
            if len(self.bucket) != 3:
                raise ConfigError(f"{bucket} needs 3 values (or none), got {_show(self.bucket)}")
            check_entries(bucket, self.bucket, 1)
            if any(b < w for b, w in zip(self.bucket, self.window)):
                raise ConfigError(
                    f"{bucket} entries must be >= {_key(where, 'window')} {_show(self.window)}, "
                    f"got {_show(self.bucket)}"
                )
        check_range(_key(where, "bucket_multiple"), self.bucket_multiple, 1)
        self.mesh.validate(_key(where, "mesh"))
        if self.mesh.data and self.window_batch % self.mesh.data:
            raise ConfigError(
                f"{_key(where, 'mesh.data')} = {self.mesh.data} must divide "
                f"{_key(where, 'window_batch')} = {self.window_batch}"
            )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh of a run (`jaxbrats.runtime.sharding`): data x space x model devices."""

    data: int = 0  # devices splitting the batch; 0: all the devices left after `space` and `model`
    space: int = 1  # devices splitting each volume's depth (first spatial axis), halos exchanged
    model: int = 1  # devices splitting a family of models (the students), which must divide its size

    def validate(self, where: str) -> None:
        check_range(_key(where, "data"), self.data, 0)
        check_range(_key(where, "space"), self.space, 1)
        check_range(_key(where, "model"), self.model, 1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    log_every: int = 10  # steps between metric fetches (also the NaN check)
    checkpoint_every: int = 100  # steps; a checkpoint is also written at the end of each stage
    keep_checkpoints: int = 2
    mesh: MeshConfig = MeshConfig()
    progress: bool = True
    #: Loss terms (the names a method logs, e.g. RIRN's "seg", "crr", "car", "adv_s") whose
    #: gradient norm over the update's trainable variables is logged as grad_norm/<term>
    #: (a diagnostic: one more forward pass and one backward pass per term, vmapped, each step:
    #: about K x the backward memory for K terms; meant for small crops).
    grad_norms: tuple[str, ...] = ()
    #: Steps between validations on the run's val split (0: none), and at each stage's end: the
    #: 15-subset program's Dice on the training mesh, logged as ``val/...`` rows; the best score
    #: keeps ``checkpoints/<stage>/best`` (`evaluation.validation`). Stages that do not segment skip it.
    validate_every: int = 0
    #: The subsets validated, by name (``"flair+t1ce"``, `modalities.SUBSET_NAMES`): fewer is
    #: cheaper. Empty: every subset the method serves.
    validate_subsets: tuple[str, ...] = ()
    #: The validation score that picks the best checkpoint (higher is better): the mean Dice
    #: over the validated subsets and the three regions, or one region's.
    best_score: str = "dice_mean"

    def validate(self, where: str) -> None:
        check_range(_key(where, "seed"), self.seed, 0, SEED_LIMIT, high_open=True)
        for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
            check_range(_key(where, name), getattr(self, name), 1)
        check_range(_key(where, "validate_every"), self.validate_every, 0)
        for name in self.validate_subsets:
            check_choice(_key(where, "validate_subsets") + " entries", name, SUBSET_NAMES)
        if len(set(self.validate_subsets)) != len(self.validate_subsets):
            raise ConfigError(f"{_key(where, 'validate_subsets')} names a subset twice: {_show(self.validate_subsets)}")
        check_choice(_key(where, "best_score"), self.best_score, BEST_SCORES)


@dataclasses.dataclass(frozen=True)
class Config:
    method: dict = dataclasses.field(default_factory=lambda: {"name": "baseline"})
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    stages: dict[str, StageConfig] = dataclasses.field(default_factory=dict)
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @property
    def method_name(self) -> str:
        return self.method.get("name", "baseline")

    def validate(self, where: str) -> None:
        """Checks across sections (each section has checked its own values)."""
        # The U-Net halves each axis len(widths) - 1 times and adds the skips back: every
        # input it sees (a training crop, an evaluation window) must divide evenly.
        factor = 2 ** (len(self.model.widths) - 1)
        for name, size in (("data.crop_size", self.data.crop_size), ("eval.window", self.eval.window)):
            if any(s % factor for s in size):
                raise ConfigError(
                    f"{_key(where, name)} entries must be divisible by {factor} (the U-Net halves them "
                    f"{len(self.model.widths) - 1} times: model.widths has {len(self.model.widths)} levels), "
                    f"got {_show(size)}"
                )
        # Volume sharding: every level's depth splits into whole slabs of the "space" devices.
        for mesh, name, size in (
            ("train.mesh", "data.crop_size", self.data.crop_size),
            ("eval.mesh", "eval.window", self.eval.window),
        ):
            space = getattr(self, mesh.split(".")[0]).mesh.space
            if size[0] % (factor * space):
                raise ConfigError(
                    f"{_key(where, name)}[0] = {size[0]} must be divisible by {factor * space}: "
                    f"{_key(where, mesh)}.space = {space} devices split the depth of each of the U-Net's "
                    f"{len(self.model.widths)} levels (the coarsest is {factor}x smaller)"
                )


def _typed(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return build(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        _, item = typing.get_args(tp)
        return {k: _typed(item, v, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} needs {len(args)} values, got {len(value)}")
        return tuple(_typed(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return dict(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value


def build(cls, data: dict, where: str = ""):
    """A `cls` dataclass from a dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    prefix = where + "." if where else ""
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)} "
            f"(known in {where or 'the top level'}: {', '.join(names)})"
        )
    values = {k: _typed(hints[k], v, prefix + k) for k, v in data.items()}
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def to_dict(obj):
    """A config (dataclasses, dicts, tuples) as plain JSON-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a table")
        node[path[-1]] = value
    return data


def shipped_configs() -> dict[str, Path]:
    """The configs that ship with jaxbrats, by name: jaxbrats/configs in an installed wheel, the
    top-level configs/ of a source checkout (an editable install runs from one)."""
    package = Path(__file__).resolve().parent
    folder = package / "configs"
    if not folder.is_dir() and (package.parent / "pyproject.toml").is_file():
        folder = package.parent / "configs"
    return {file.stem: file for file in sorted(folder.glob("*.toml"))}


def config_file(path) -> Path:
    """The file `path` names: itself when it exists, else a shipped config by its name
    (`baseline_phantom` or `baseline_phantom.toml`), so `--config NAME` works from any directory."""
    path = Path(path)
    if path.exists():
        return path
    shipped = shipped_configs()
    if path.parent == Path(".") and path.suffix in ("", ".toml") and path.stem in shipped:
        return shipped[path.stem]
    if path.suffix == ".json":  # a run's saved config: no shipped one stands in for it
        raise ConfigError(f"{path}: config file not found")
    raise ConfigError(f"{path}: config file not found, nor a shipped config (shipped: {', '.join(shipped)})")


def read_raw(path) -> dict:
    """The table a TOML file (or a run's saved JSON config) holds; any problem is one line naming the file."""
    path = config_file(path)
    kind = "JSON" if path.suffix == ".json" else "TOML"
    try:
        text = path.read_text(encoding="utf-8")  # TOML and JSON are UTF-8, whatever the locale says
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:  # e.g. a checkpoint or an image given as --config
        raise ConfigError(
            f"{path}: not a text file (byte {e.object[e.start]:#04x} at offset {e.start} is not UTF-8); "
            f"a config is a {kind} file"
        ) from None
    try:
        data = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid {kind}: {e}") from None
    if not isinstance(data, dict):  # JSON may hold a list or a number at the top
        raise ConfigError(f"{path}: holds a JSON {type(data).__name__}, not an object of config sections")
    return data


def read_config(path=None, overrides=()) -> tuple[Config, str]:
    """(config checked against the schema, its source name) from a TOML or saved JSON file and
    `--set` overrides; the method's own checks are `jaxbrats.methods.load_config`'s."""
    data = read_raw(path) if path else {}
    source = str(path or "config")
    return parse_config(apply_overrides(data, overrides), source), source


def parse_config(data: dict, source: str = "config") -> Config:
    """Check parsed TOML data against the schema (not the method's section); errors name `source`."""
    try:
        return build(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def save_config(config: Config, path) -> None:
    write_text_atomic(path, json.dumps(to_dict(config), indent=2) + "\n")
