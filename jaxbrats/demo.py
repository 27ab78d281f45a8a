"""The demo: phantom -> prepare -> train the baseline -> evaluate all 15 subsets.

Runs on 2 CPU cores in minutes. Its training settings are `DEMO_CONFIG`,
the same as configs/baseline_phantom.toml (a test keeps the two equal), so
`jaxbrats train --config configs/baseline_phantom.toml` reproduces it.
"""

from __future__ import annotations

import dataclasses
import time
import tomllib
from pathlib import Path

from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.phantom import write_phantom
from jaxbrats.data.preprocess import prepare_dataset
from jaxbrats.engine.trainer import Trainer
from jaxbrats.engine.workdir import load_splits
from jaxbrats.evaluation.program import evaluate
from jaxbrats.evaluation.reports import markdown_table
from jaxbrats.inference.trained import load_trained
from jaxbrats.methods import config_from_data

CASES, SHAPE = 16, (64, 64, 64)

DEMO_CONFIG = """
# The demo's baseline on the phantom (16 cases of 64^3, half held out): a narrow U-Net of
# the shared architecture, trained briefly on 2 CPU cores. `jaxbrats demo` runs it.
[method]
name = "baseline"
dropout_mode = "uniform"

[model]
widths = [8, 16, 32, 64]
blocks = [1, 1, 1, 1]

[data]
crop_size = [32, 32, 32]
batch_size = 2
foreground_oversample = 0.5
split_ratios = [0.5, 0.0, 0.5]   # 8 held-out cases: one case does not swing the mean

[stages.train]
steps = 1600

[stages.train.optimizers.model]
name = "adam"
lr = 2e-3
schedule = "cosine"
warmup_steps = 10

[train]
log_every = 25
checkpoint_every = 400

[eval]
window = [32, 32, 32]
overlap = 0.5
window_batch = 4
"""


def demo_config():
    return config_from_data(tomllib.loads(DEMO_CONFIG), "demo config")


def run(workdir: Path, seed: int = 0) -> dict:
    """The demo with `seed` for the phantom and for training (the README's spread is over seeds 0-2)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    raw, cache_dir, run_dir = workdir / "phantom", workdir / "cache", workdir / "run"
    t0 = time.perf_counter()
    write_phantom(raw, CASES, SHAPE, layout="brats2023", seed=seed)
    prepare_dataset(raw, cache_dir, progress=False)
    print(f"phantom: {CASES} cases of {SHAPE}, prepared into {cache_dir} ({time.perf_counter() - t0:.1f} s)")

    config = dataclasses.replace(demo_config(), train=dataclasses.replace(demo_config().train, seed=seed))
    t0 = time.perf_counter()
    trainer = Trainer(config, run_dir, cache_dir)
    trainer.run()
    steps, seconds = config.stages["train"].steps, time.perf_counter() - t0
    print(f"trained the baseline for {steps} steps ({seconds:.0f} s); logs in {run_dir}")

    t0 = time.perf_counter()
    method, graphdefs, models, config = load_trained(run_dir)
    test_ids = load_splits(run_dir, CacheDataset(cache_dir))["test"]
    out = workdir / "eval"
    summary = evaluate(method, graphdefs, models, CacheDataset(cache_dir, test_ids), config.eval, out)
    print(f"evaluated all 15 modality subsets on {len(test_ids)} held-out cases ({time.perf_counter() - t0:.0f} s):\n")
    print(markdown_table(summary, config.eval))
    print(f"summary: {out / 'summary.json'}; heatmap: {out / 'dice_heatmap.png'}")
    return summary
