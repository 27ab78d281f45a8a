"""Run configuration: TOML files checked against a typed schema of dataclasses.

A config file has the sections of `Config`; a method's own settings live in
``[method]`` next to its ``name`` and are typed by the method's options class;
``[stages.<name>]`` holds the epochs and optimisers of each of the method's
stages. Unknown keys, wrong types and bad values raise `ConfigError` naming
the file and the key. ``--set key.path=value`` overrides take TOML values
(``--set data.crop_size=[64,64,64]``, ``--set method.output='"labels"'``;
a value that is not valid TOML is taken as a string).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path

from jaxbrats.errors import JaxbratsError


class ConfigError(JaxbratsError):
    pass


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
        _choice(where + ".name", self.name, ("adam", "adamw", "sgd"))
        _choice(where + ".schedule", self.schedule, ("constant", "cosine", "poly"))
        for name, lr in {"lr": self.lr, **{f"model_lr.{k}": v for k, v in self.model_lr.items()}}.items():
            if lr <= 0:
                raise ConfigError(f"{where}.{name} must be positive, got {lr}")


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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: tuple[int, ...] = (1, 2, 2, 4)
    groups: int = 8
    upsample: str = "nearest"
    dropout: float = 0.0
    dtype: str = "float32"
    conv_impl: str = "auto"
    remat: bool = False  # activation checkpointing per residual block: less memory, ~1/3 more compute


@dataclasses.dataclass(frozen=True)
class DataConfig:
    cache: str = ""  # prepared cache directory (`--data` overrides)
    crop_size: tuple[int, int, int] = (128, 128, 128)
    batch_size: int = 2  # global batch, split over the data axis of the mesh
    foreground_oversample: float = 0.33
    flip_probability: float = 0.5
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    workers: int = 0
    prefetch: int = 2
    #: Split files (one case id per line); empty: a seeded ratio split of the cache.
    train_split: str = ""
    val_split: str = ""
    test_split: str = ""
    split_ratios: tuple[float, float, float] = (0.8, 0.0, 0.2)
    split_seed: int = 0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    window: tuple[int, int, int] = (128, 128, 128)
    overlap: float = 0.5
    blend: str = "gaussian"  # gaussian | uniform
    window_batch: int = 1
    threshold: float = 0.5
    hd95: bool = True
    hd95_empty: str = "brats"  # brats | zero | nan (see metrics.HD95_EMPTY)
    et_postprocess: bool = False  # ET < et_min_voxels -> necrosis
    et_min_voxels: int = 500
    #: Padded case shape compiled for; empty: the largest case rounded up to `bucket_multiple`.
    bucket: tuple[int, ...] = ()
    bucket_multiple: int = 16


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    log_every: int = 10  # steps between metric fetches (also the NaN check)
    checkpoint_every: int = 100  # steps; a checkpoint is also written at the end of each stage
    keep_checkpoints: int = 2
    data_parallel: int = 0  # devices on the mesh's data axis; 0: all devices
    progress: bool = True


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


def _choice(where: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{where} must be one of {list(allowed)}, got {value!r}")


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
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)} (known in {where or 'the top level'}: {', '.join(names)})")
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


def read_raw(path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None


def load_config(path=None, overrides=()) -> Config:
    """Read a TOML (or a saved JSON) config, apply `--set` overrides, check it against the schema."""
    data = read_raw(path) if path else {}
    return config_from_data(apply_overrides(data, overrides), str(path or "config"))


def config_from_data(data: dict, source: str = "config") -> Config:
    """Check parsed TOML data against the schema; errors name `source`."""
    try:
        config = build(Config, data)
        from jaxbrats.methods import get_method  # the method checks its own section and stages

        get_method(config.method_name).check_config(config)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return config


def save_config(config: Config, path) -> None:
    Path(path).write_text(json.dumps(to_dict(config), indent=2) + "\n")
