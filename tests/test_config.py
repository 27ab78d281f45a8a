"""Config schema: unknown keys, types, values, overrides; what every shipped config resolves to."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxbrats.config import ConfigError, parse_override
from jaxbrats.methods import get_method, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def _write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_unknown_keys_are_named(tmp_path):
    path = _write(tmp_path, "[data]\ncrop_sise = [1, 2, 3]\n")
    with pytest.raises(ConfigError, match=r"c.toml: unknown key\(s\) data.crop_sise"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown key.*method.lambda_"):
        load_config(None, ["method.lambda_=0.1"])
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(None, ["stages.pretrain.epochs=3"])
    with pytest.raises(ConfigError, match="unknown group"):
        load_config(None, ["stages.train.optimizers.disc.lr=1e-3"])


def test_types_and_values_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="data.batch_size must be int"):
        load_config(None, ["data.batch_size=2.5"])
    with pytest.raises(ConfigError, match="crop_size needs 3 values"):
        load_config(None, ["data.crop_size=[16,16]"])
    with pytest.raises(ConfigError, match="schedule must be one of"):
        load_config(None, ["stages.train.optimizers.model.schedule='linear'"])
    with pytest.raises(ConfigError, match="method.name 'm4ae'"):
        load_config(None, ["method.name='m4ae'"])
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[data\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_overrides_take_toml_values_or_strings():
    assert parse_override("data.crop_size=[8, 8, 8]") == (["data", "crop_size"], [8, 8, 8])
    assert parse_override("method.output=labels") == (["method", "output"], "labels")
    config = load_config(None, ["train.seed=3", "data.crop_size=[8,8,8]", "stages.train.optimizers.model.lr=1"])
    assert config.train.seed == 3 and config.data.crop_size == (8, 8, 8)
    assert config.stages["train"].optimizers["model"].lr == 1.0


M3AE = "method.name='m3ae'"
ADAM = "stages.train.optimizers.model"

#: (overrides, the error after "config: "): at least one bad value per section and key.
BAD_VALUES = [
    # [model]
    (["model.widths=[]"], "model.widths must not be empty, got []"),
    (["model.widths=[16,0,64,128]"], "model.widths entries must be >= 1, got [16, 0, 64, 128]"),
    (["model.blocks=[1,0,2,4]"], "model.blocks entries must be >= 1, got [1, 0, 2, 4]"),
    (["model.blocks=[1,2]"], "model.blocks needs one entry per entry of model.widths (4), got [1, 2]"),
    (["model.groups=0"], "model.groups must be >= 1, got 0"),
    (
        ["model.groups=3"],
        "model.widths entries must be divisible by model.groups = 3 (GroupNorm), got [16, 32, 64, 128]",
    ),
    (["model.upsample='bicubic'"], "model.upsample must be one of ['nearest', 'trilinear'], got 'bicubic'"),
    (["model.dtype='float16'"], "model.dtype must be one of ['float32', 'bfloat16'], got 'float16'"),
    (["model.conv_impl='cudnn'"], "model.conv_impl must be one of ['auto', 'native', 'depth2d'], got 'cudnn'"),
    (["model.dropout=1.0"], "model.dropout must be in [0, 1), got 1.0"),
    (["model.stem_dropout=-0.1"], "model.stem_dropout must be in [0, 1), got -0.1"),
    (["model.family_map='loop'"], "model.family_map must be one of ['auto', 'vmap', 'unroll'], got 'loop'"),
    # [data]
    (["data.crop_size=[0,0,0]"], "data.crop_size entries must be >= 1, got [0, 0, 0]"),
    (
        ["data.crop_size=[12,16,16]"],
        "data.crop_size entries must be divisible by 8 (the U-Net halves them 3 times: model.widths has 4 levels), "
        "got [12, 16, 16]",
    ),
    (
        ["model.widths=[8,8]", "model.blocks=[1,1]", "data.crop_size=[9,8,8]"],
        "data.crop_size entries must be divisible by 2 (the U-Net halves them 1 times: model.widths has 2 levels), "
        "got [9, 8, 8]",
    ),
    (["data.batch_size=0"], "data.batch_size must be >= 1, got 0"),
    (["data.foreground_oversample=1.5"], "data.foreground_oversample must be in [0, 1], got 1.5"),
    (["data.foreground_oversample=inf"], "data.foreground_oversample must be a finite number, got inf"),
    (["data.flip_probability=-0.1"], "data.flip_probability must be in [0, 1], got -0.1"),
    (["data.rotation_degrees=-5"], "data.rotation_degrees must be in [0, 180], got -5.0"),
    (["data.rotation_degrees=190.0"], "data.rotation_degrees must be in [0, 180], got 190.0"),
    (["data.rotation_probability=1.5"], "data.rotation_probability must be in [0, 1], got 1.5"),
    (["data.intensity_scale=1.5"], "data.intensity_scale must be in [0, 1], got 1.5"),
    (["data.intensity_shift=-0.1"], "data.intensity_shift must be >= 0, got -0.1"),
    (["data.workers=-1"], "data.workers must be >= 0, got -1"),
    (["data.prefetch=0"], "data.prefetch must be >= 1, got 0"),
    (["data.split_ratios=[1.2,-0.2,0.0]"], "data.split_ratios entries must be >= 0, got [1.2, -0.2, 0.0]"),
    (["data.split_ratios=[0.8,0.1,0.2]"], "data.split_ratios must sum to 1, got [0.8, 0.1, 0.2]"),
    (["data.split_ratios=[0.0,0.5,0.5]"], "data.split_ratios must give training a share > 0, got [0.0, 0.5, 0.5]"),
    (["data.split_seed=-1"], "data.split_seed must be >= 0, got -1"),
    # [stages.*] and their optimisers
    (["stages.train.steps=-5"], "stages.train.steps must be >= 0, got -5"),
    (["stages.train.epochs=-1"], "stages.train.epochs must be >= 0, got -1"),
    (["stages.train.batch_size=-2"], "stages.train.batch_size must be >= 0, got -2"),
    ([f"{ADAM}.lr=0"], f"{ADAM}.lr must be positive, got 0.0"),
    ([f"{ADAM}.lr=nan"], f"{ADAM}.lr must be a finite number, got nan"),
    ([f"{ADAM}.weight_decay=-1e-4"], f"{ADAM}.weight_decay must be >= 0, got -0.0001"),
    ([f"{ADAM}.poly_power=0"], f"{ADAM}.poly_power must be > 0, got 0.0"),
    ([f"{ADAM}.warmup_steps=-10"], f"{ADAM}.warmup_steps must be >= 0, got -10"),
    ([f"{ADAM}.clip_norm=-1"], f"{ADAM}.clip_norm must be >= 0, got -1.0"),
    ([f"{ADAM}.momentum=1.0"], f"{ADAM}.momentum must be in [0, 1), got 1.0"),
    ([M3AE, "stages.pretrain.epochs=-1"], "stages.pretrain.epochs must be >= 0, got -1"),
    (
        [M3AE, "stages.finetune.optimizers.model.model_lr={x_sub=-5e-3}"],
        "stages.finetune.optimizers.model.model_lr.x_sub must be positive, got -0.005",
    ),
    # [eval]
    (["eval.window=[0,128,128]"], "eval.window entries must be >= 1, got [0, 128, 128]"),
    (
        ["eval.window=[100,128,128]"],
        "eval.window entries must be divisible by 8 (the U-Net halves them 3 times: model.widths has 4 levels), "
        "got [100, 128, 128]",
    ),
    (["eval.overlap=1.0"], "eval.overlap must be in [0, 1), got 1.0"),
    (["eval.blend='max'"], "eval.blend must be one of ['gaussian', 'uniform'], got 'max'"),
    (["eval.window_batch=0"], "eval.window_batch must be >= 1, got 0"),
    (["eval.threshold=0"], "eval.threshold must be in (0, 1), got 0.0"),
    (["eval.threshold=1"], "eval.threshold must be in (0, 1), got 1.0"),
    (["eval.hd95_empty='inf'"], "eval.hd95_empty must be one of ['brats', 'zero', 'nan', 'brats2023'], got 'inf'"),
    (["eval.et_min_voxels=-1"], "eval.et_min_voxels must be >= 0, got -1"),
    (["eval.bucket=[160,160]"], "eval.bucket needs 3 values (or none), got [160, 160]"),
    (["eval.bucket=[0,160,160]"], "eval.bucket entries must be >= 1, got [0, 160, 160]"),
    (["eval.bucket=[160,160,96]"], "eval.bucket entries must be >= eval.window [128, 128, 128], got [160, 160, 96]"),
    (["eval.bucket_multiple=0"], "eval.bucket_multiple must be >= 1, got 0"),
    # [train]
    (["train.seed=-1"], "train.seed must be in [0, 2147483648), got -1"),
    (["train.log_every=0"], "train.log_every must be >= 1, got 0"),
    (["train.checkpoint_every=0"], "train.checkpoint_every must be >= 1, got 0"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints must be >= 1, got 0"),
    (["train.mesh.data=-1"], "train.mesh.data must be >= 0, got -1"),
    (["train.mesh.model=0"], "train.mesh.model must be >= 1, got 0"),
    # [method]: the baseline's options
    (
        ["method.class_weights=[1.0,-1.0,1.0,1.0]"],
        "method.class_weights entries must be >= 0, got [1.0, -1.0, 1.0, 1.0]",
    ),
    (["method.class_weights=[1.0]"], "method.class_weights needs 4 values, got [1.0]"),
    (
        ["method.deep_supervision=true", "model.widths=[8,8]", "model.blocks=[1,1]"],
        "model.widths needs at least 3 levels for deep supervision (method.deep_supervision = true), got [8, 8]",
    ),
    (
        [M3AE, "model.widths=[8,8]", "model.blocks=[1,1]"],
        "model.widths needs at least 3 levels for deep supervision (M3AE fine-tuning), got [8, 8]",
    ),
    # [method]: M3AE's options
    ([M3AE, "method.patch_size=0"], "method.patch_size must be >= 1, got 0"),
    ([M3AE, "method.mask_ratio=1.0"], "method.mask_ratio must be in [0, 1), got 1.0"),
    ([M3AE, "method.substitute_shape=[240,0,160]"], "method.substitute_shape entries must be >= 1, got [240, 0, 160]"),
    ([M3AE, "method.substitute_init_std=0"], "method.substitute_init_std must be > 0, got 0.0"),
    ([M3AE, "method.substitute_weight=-0.005"], "method.substitute_weight must be >= 0, got -0.005"),
    (
        [M3AE, "data.rotation_degrees=10"],
        "data.rotation_degrees must be 0 for M3AE with method.fill = 'x_sub', got 10.0: "
        "the fill is read where the unrotated crop lies (crop_start, flipped), not under a rotated crop",
    ),
    (
        [M3AE, "method.fill='mean'", "data.rotation_degrees=0.5"],
        "data.rotation_degrees must be 0 for M3AE with method.fill = 'mean', "
        "got 0.5: the fill is read where the unrotated crop lies (crop_start, flipped), not under a rotated crop",
    ),
    ([M3AE, "method.consistency_weight=-0.1"], "method.consistency_weight must be >= 0, got -0.1"),
]


@pytest.mark.parametrize("overrides, message", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_values_are_named_with_the_value(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert str(error.value) == f"config: {message}"


def test_bad_values_in_a_file_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^.*c\.toml: stages\.train\.steps must be >= 0, got -5$"):
        load_config(_write(tmp_path, "[stages.train]\nsteps = -5\n"))


def test_edge_values_are_allowed():
    # M3AE without pretraining (Table 3 a): a stage of no steps.
    config = load_config(None, [M3AE, "stages.pretrain.epochs=0", "stages.pretrain.steps=0"])
    assert get_method("m3ae").stage_length(config, "pretrain", 50) == 0
    load_config(
        None,
        [
            "data.foreground_oversample=0",
            "data.flip_probability=1",
            "data.intensity_scale=0",
            "data.intensity_shift=0",
            "data.split_ratios=[1.0,0.0,0.0]",
            "data.workers=0",
            "stages.train.epochs=0",
            "model.dropout=0",
            "model.widths=[8]",
            "model.blocks=[1]",
            "data.crop_size=[9,9,9]",
            "eval.window=[7,7,7]",
            "eval.overlap=0",
            "eval.et_min_voxels=0",
            "eval.bucket=[7,8,9]",
            "train.mesh.data=0",
            f"{ADAM}.momentum=0",
            f"{ADAM}.weight_decay=0",
            f"{ADAM}.clip_norm=0",
            "method.class_weights=[0.0,1.0,1.0,1.0]",
        ],
    )
    load_config(None, [M3AE, "method.mask_ratio=0", "method.substitute_weight=0", "method.consistency_weight=0"])
    load_config(None, ["data.rotation_degrees=180", "data.rotation_probability=0"])
    load_config(None, [M3AE, "method.fill='zero'", "data.rotation_degrees=10"])  # the zero fill reads no volume


def _one_line_error(result, *fragments):  # as tests/test_cli.py
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.train.steps=-5", "stages.train.steps must be >= 0, got -5"),
        ("data.crop_size=[0,0,0]", "data.crop_size entries must be >= 1, got [0, 0, 0]"),
    ],
)
def test_cli_rejects_a_bad_value_in_one_line(tmp_path, override, message):
    config = _write(
        tmp_path, '[method]\nname = "baseline"\n\n[data]\ncrop_size = [16, 16, 16]\n\n[stages.train]\nsteps = 2\n'
    )
    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore", JAXBRATS_COMPILE_CACHE="")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxbrats.cli",
            "train",
            "--config",
            str(config),
            "--workdir",
            str(workdir),
            "--set",
            override,
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    _one_line_error(result, f"c.toml: {message}")
    assert not workdir.exists()


#: What each shipped config resolves to, defaults included: a changed default that alters a shipped
#: config fails here. Keys are attribute paths of `Config`; "options.<k>" is the method's typed option,
#: "length.<stage>" the stage's steps at 100 steps per epoch.
SHARED = {
    "model.groups": 8,
    "model.dropout": 0.0,
    "model.stem_dropout": 0.0,
    "model.conv_impl": "auto",
    "model.family_map": "auto",
    "model.remat": False,
    "model.dtype": "float32",
    "data.cache": "",
    "data.flip_probability": 0.5,
    "data.intensity_scale": 0.1,
    "data.intensity_shift": 0.1,  # M3AE's
    "data.prefetch": 2,
    "data.split_seed": 0,
    "data.train_split": "",
    "data.rotation_degrees": 0.0,
    "data.rotation_probability": 1.0,
    "train.seed": 0,
    "train.keep_checkpoints": 2,
    "train.mesh.data": 0,
    "train.mesh.model": 1,
    "train.progress": True,
    "eval.overlap": 0.5,
    "eval.blend": "gaussian",
    "eval.threshold": 0.5,
    "eval.hd95": True,
    "eval.hd95_empty": "brats",
    "eval.et_postprocess": False,
    "eval.et_min_voxels": 500,
    "eval.bucket": (),
    "eval.bucket_multiple": 16,
}
BRATS = {  # the papers' setting: the 4.7 M-parameter U-Net on 128^3 crops, batch 2
    "model.widths": (16, 32, 64, 128),
    "model.blocks": (1, 2, 2, 4),
    "data.crop_size": (128, 128, 128),
    "data.batch_size": 2,
    "data.workers": 2,
    "data.split_ratios": (0.7, 0.1, 0.2),
    "train.log_every": 50,
    "train.checkpoint_every": 1000,
    "eval.window": (128, 128, 128),
    "eval.window_batch": 1,
}
PHANTOM = {  # the demo's narrow U-Net on 32^3 crops of 64^3 phantoms, on 2 CPU cores
    "model.widths": (8, 16, 32, 64),
    "model.blocks": (1, 1, 1, 1),
    "model.upsample": "nearest",
    "data.crop_size": (32, 32, 32),
    "data.batch_size": 2,
    "data.foreground_oversample": 0.5,
    "data.workers": 0,
    "data.split_ratios": (0.5, 0.0, 0.5),
    "train.log_every": 25,
    "eval.window": (32, 32, 32),
    "eval.window_batch": 4,
}
BASELINE = {
    "method_name": "baseline",
    "options.output": "regions",
    "options.dropout_mode": "uniform",
    "options.deep_supervision": False,
    "options.batch_dice": False,
    "options.class_weights": (),
    "stages.train.batch_size": 0,
    "stages.train.init_from": "",
}
M3AE_OPTIONS = {
    "method_name": "m3ae",
    "options.mask_ratio": 0.875,
    "options.patch_masking": True,
    "options.fill": "x_sub",
    "options.substitute_init_std": 1.0,
    "options.substitute_penalty": "centered_norm",
    "options.substitute_weight": 0.005,
    "options.consistency_weight": 0.1,
    "options.consistency_feature": "bottleneck",
    "options.distinct_views": True,
    "options.seg_balance": "paper",
    "stages.finetune.batch_size": 1,
    "stages.pretrain.batch_size": 0,
}


def _optimizer(stage, lr, weight_decay=0.0, warmup=0, model_lr=None):
    prefix = f"stages.{stage}.optimizers.model."
    return {
        prefix + "name": "adam",
        prefix + "lr": lr,
        prefix + "weight_decay": weight_decay,
        prefix + "schedule": "cosine",
        prefix + "warmup_steps": warmup,
        prefix + "clip_norm": 0.0,
        prefix + "model_lr": model_lr or {},
    }


BASELINE_BRATS = {  # M3AE's fine-tuning budget: Adam 3e-4, weight decay 1e-4, cosine, 300 epochs
    **SHARED,
    **BRATS,
    **BASELINE,
    "model.upsample": "nearest",
    "data.foreground_oversample": 0.33,
    "stages.train.epochs": 300,
    "stages.train.steps": 0,
    "length.train": 30000,
    **_optimizer("train", 3e-4, 1e-4),
}
M3AE_BRATS = {  # the paper: 600 pretraining + 300 fine-tuning epochs, 16^3 patches, x_sub 240x240x160
    **SHARED,
    **BRATS,
    **M3AE_OPTIONS,
    "model.upsample": "trilinear",
    "data.foreground_oversample": 0.0,
    "options.patch_size": 16,
    "options.substitute_shape": (240, 240, 160),
    "stages.pretrain.epochs": 600,
    "stages.pretrain.steps": 0,
    "length.pretrain": 60000,
    "stages.finetune.epochs": 300,
    "stages.finetune.steps": 0,
    "length.finetune": 30000,
    **_optimizer("pretrain", 3e-4, 0.0, model_lr={"x_sub": 5e-3}),
    **_optimizer("finetune", 3e-4, 1e-4),
}
RIRN_OPTIONS = {
    "method_name": "rirn",
    "options.seg_loss": "dice",
    "options.crr": True,
    "options.mf": True,
    "options.crr_threshold": 0.5,
    "options.car": True,
    "options.car_level": -1,
    "options.car_axis": "keys",
    "options.car_embeddings": "fixed",
    "options.adv": True,
    "options.adv_input": "probabilities",
    "options.disc_width": 64,
    "options.crr_weight": 1.0,
    "options.car_weight": 1.0,
    "options.adv_weight": 1.0,
    "options.teacher_from": "",
    "model.stem_dropout": 0.2,
    "stages.train.batch_size": 0,
}


def _rirn_optimizers(lr, schedule, disc_lr):
    out = {}
    for group, rate in (("model", lr), ("discriminator", disc_lr)):
        prefix = f"stages.train.optimizers.{group}."
        out.update(
            {
                prefix + "name": "adam",
                prefix + "lr": rate,
                prefix + "schedule": schedule,
                prefix + "weight_decay": 0.0,
                prefix + "clip_norm": 0.0,
            }
        )
    return out


RIRN_BRATS = {  # the paper: Adam 1e-4, poly 0.9, batch 1, 160x192x128 crops, 300 epochs, flips only, 2:1 split
    **SHARED,
    **RIRN_OPTIONS,
    "options.students": "all",
    "model.widths": (16, 32, 64, 128),
    "model.blocks": (1, 2, 2, 4),
    "data.crop_size": (160, 192, 128),
    "data.batch_size": 1,
    "data.foreground_oversample": 0.0,
    "data.intensity_scale": 0.0,
    "data.intensity_shift": 0.0,
    "data.split": "ratio",
    "data.split_ratios": (0.6666667, 0.0, 0.3333333),
    "stages.train.epochs": 300,
    "length.train": 30000,
    "stages.train.optimizers.model.poly_power": 0.9,
    **_rirn_optimizers(1e-4, "poly", 1e-4),
    "eval.window": (160, 192, 128),
}
MTG_OPTIONS = {
    "method_name": "mind_the_gap",
    "options.anchor": "mix",
    "options.anchor_modality": "t1ce",
    "options.mix_target": "prior",
    "options.mix_floor": 0.1,
    "options.mix_sum": 4.1846,
    "options.hold_target": True,
    "options.normal_sample": True,
    "options.align_weight": 1.0,
    "options.shared_encoder": False,
    "options.encoder_blocks": 1,
    "options.teacher_seg": "each",
    "options.teacher_inference": "auto",
    "options.class_weights": (),
    "options.students": ["flair", "t1ce", "t1", "t2"],
    "options.kd": "pmkl",
    "options.kd_weight": 1.0,
    "options.teacher_view": "full",
    "options.disc_width": 64,
    "options.teacher_from": "",
}


def _stage_optimizer(stage, group, lr, schedule, weight_decay=0.0, warmup=0):
    prefix = f"stages.{stage}.optimizers.{group}."
    return {
        prefix + "name": "adam",
        prefix + "lr": lr,
        prefix + "schedule": schedule,
        prefix + "weight_decay": weight_decay,
        prefix + "warmup_steps": warmup,
        prefix + "clip_norm": 0.0,
    }


MTG_BRATS = {  # the paper: [-1, 1], 80^3 crops, batch 4, Adam 1e-2 (decay garbled: ours poly + weight decay 1e-5)
    **SHARED,
    **MTG_OPTIONS,
    "options.latent_channels": 16,
    "options.ramp_steps": 0,
    "model.widths": (16, 32, 64, 128),
    "model.blocks": (1, 2, 2, 4),
    "model.upsample": "nearest",
    "data.crop_size": (80, 80, 80),
    "data.batch_size": 4,
    "data.foreground_oversample": 0.0,
    "data.intensity_scale": 0.0,
    "data.intensity_shift": 0.0,
    "data.split": "files",
    "data.workers": 2,
    "data.flip_probability": 0.0,  # the paper lists cropping only
    "stages.teacher.epochs": 300,
    "length.teacher": 30000,
    "stages.students.epochs": 300,
    "length.students": 30000,
    **_stage_optimizer("teacher", "teacher", 1e-2, "poly", 1e-5),
    **_stage_optimizer("students", "students", 1e-2, "poly", 1e-5),
    **_stage_optimizer("students", "discriminator", 1e-4, "poly"),
    "eval.window": (80, 80, 80),
}
ACDIS_OPTIONS = {
    "method_name": "acdis",
    "options.afeb": True,
    "options.afeb_levels": (),
    "options.distill": "acct",
    "options.acct_window": 4,
    "options.acct_stride": 0,
    "options.acct_pooled": False,
    "options.mfsb": True,
    "options.synthesis": ("syn",),
    "options.syn_norm": "mse",
    "options.syn_grad_encoders": True,
    "options.syn_grad_target": True,
    "options.mfsb_conv": "fill",
    "options.term_reduce": "mean",
    "options.acct_start_epoch": 0,
    "options.seg_loss": "rfnet",
    "options.class_weights": (),
    "options.adv_weight": 1.0,
    "options.disc_width": 64,
    "data.rotation_degrees": 10.0,
}
# the paper: Adam 1e-4, weight decay 1e-4, 500 epochs, batch 2, 80^3 crops, rotations (ours: 10 degrees)
ACDIS_BRATS = {
    **SHARED,
    **ACDIS_OPTIONS,
    "options.synthesis_start_epoch": 20,
    "options.iterations_per_epoch": 150,  # RFNet's epoch
    "model.widths": (16, 32, 64, 128),
    "model.blocks": (1, 2, 2, 4),
    "model.upsample": "nearest",
    "data.crop_size": (80, 80, 80),
    "data.batch_size": 2,
    "data.foreground_oversample": 0.0,
    "data.split": "files",
    "data.workers": 2,
    "stages.train.epochs": 500,
    "length.train": 75000,
    **_stage_optimizer("train", "model", 1e-4, "poly", 1e-4),
    "stages.train.optimizers.model.poly_power": 0.9,
    "eval.window": (80, 80, 80),
    "eval.blend": "uniform",
}
EXPECTED = {
    "acdis_brats2020.toml": ACDIS_BRATS,
    "acdis_phantom.toml": {
        **SHARED,
        **PHANTOM,
        **ACDIS_OPTIONS,
        "options.synthesis_start_epoch": 25,
        "options.seg_loss": "label",
        "stages.train.steps": 200,
        "options.syn_grad_encoders": False,
        "options.syn_grad_target": False,
        "options.iterations_per_epoch": 0,
        "length.train": 200,
        "train.checkpoint_every": 100,
        **_stage_optimizer("train", "model", 2e-3, "cosine", warmup=10),
        **_stage_optimizer("train", "discriminator", 2e-4, "cosine"),
    },
    "mind_the_gap_brats2018.toml": MTG_BRATS,
    "mind_the_gap_phantom.toml": {
        **SHARED,
        **PHANTOM,
        **MTG_OPTIONS,
        "options.latent_channels": 0,
        "options.ramp_steps": 0,
        "stages.teacher.steps": 400,
        "length.teacher": 400,
        "stages.students.steps": 400,
        "length.students": 400,
        "train.checkpoint_every": 100,
        **_stage_optimizer("teacher", "teacher", 2e-3, "cosine", warmup=10),
        "stages.teacher.optimizers.teacher.model_lr": {"mix": 5e-3},  # P_mix's weights (tools/mix_weights_sim.py)
        **_stage_optimizer("students", "students", 2e-3, "cosine", warmup=10),
        **_stage_optimizer("students", "discriminator", 2e-4, "cosine"),
    },
    "rirn_brats2018.toml": RIRN_BRATS,
    "rirn_brats2020.toml": RIRN_BRATS,
    "rirn_phantom.toml": {
        **SHARED,
        **PHANTOM,
        **RIRN_OPTIONS,
        "options.students": ["flair", "t1ce", "t1", "t2"],
        "options.seg_loss": "dice_bce",
        "stages.train.steps": 400,
        "length.train": 400,
        "train.checkpoint_every": 100,
        **_rirn_optimizers(2e-3, "cosine", 2e-4),
    },
    "baseline_brats2018.toml": {**BASELINE_BRATS, "data.split": "files"},  # the papers' 199/29/57
    "baseline_brats2020.toml": {**BASELINE_BRATS, "data.split": "files"},  # the papers' 219/50/100
    "baseline_brats2023.toml": {**BASELINE_BRATS, "data.split": "auto"},  # no published split
    "baseline_phantom.toml": {
        **SHARED,
        **PHANTOM,
        **BASELINE,
        "stages.train.steps": 1600,
        "length.train": 1600,
        "train.checkpoint_every": 400,
        **_optimizer("train", 2e-3, warmup=10),
    },
    "m3ae_brats2018.toml": {**M3AE_BRATS, "data.split": "files"},
    "m3ae_brats2020.toml": {**M3AE_BRATS, "data.split": "files"},
    "m3ae_phantom.toml": {  # the demo baseline's 1600 steps split 800 + 800; the paper's 128/16 patch grid at 32/8
        **SHARED,
        **PHANTOM,
        **M3AE_OPTIONS,
        "options.patch_size": 8,
        "options.substitute_shape": (64, 64, 64),
        "stages.pretrain.steps": 800,
        "length.pretrain": 800,
        "stages.finetune.steps": 800,
        "length.finetune": 800,
        "train.checkpoint_every": 200,
        **_optimizer("pretrain", 2e-3, warmup=10, model_lr={"x_sub": 0.1}),
        **_optimizer("finetune", 2e-3, warmup=10),
    },
}


def _resolve(config, key: str):
    head, *rest = key.split(".")
    method = get_method(config.method_name)
    if head == "length":
        return method.stage_length(config, rest[0], 100)
    node = method.parse_options(config) if head == "options" else getattr(config, head)
    for part in rest:
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def test_every_shipped_config_has_expectations():
    assert sorted(EXPECTED) == sorted(p.name for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_resolve_to_their_settings(path):
    config = load_config(path)
    expected = EXPECTED[path.name]
    got = {key: _resolve(config, key) for key in expected}
    assert got == expected
    assert set(config.stages) == set(get_method(config.method_name).stages)  # every stage is set in the file


def test_the_demo_runs_the_phantom_config():
    from jaxbrats import demo

    shipped = load_config(Path(__file__).resolve().parents[1] / "configs" / "baseline_phantom.toml")
    assert demo.demo_config() == shipped
