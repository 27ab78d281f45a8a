"""The demo: phantom -> prepare -> input pipeline, printed and drawn.

Training and evaluation join the demo with the engine (Foundation II).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.phantom import write_phantom
from jaxbrats.data.pipeline import PipelineConfig, make_loader
from jaxbrats.data.preprocess import prepare_dataset
from jaxbrats.labels import REGIONS, regions_of
from jaxbrats.modalities import MODALITIES, SUBSET_NAMES

CASES, SHAPE, CROP = 8, (64, 64, 64), (48, 48, 48)


def run(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    raw, cache_dir = workdir / "phantom", workdir / "cache"
    t0 = time.perf_counter()
    write_phantom(raw, CASES, SHAPE, layout="brats2023", seed=0)
    print(f"phantom: {CASES} cases of {SHAPE} in {raw} ({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    report = prepare_dataset(raw, cache_dir, progress=False)
    print(f"prepare: layout {report['layout']}, {len(report['prepared'])} cases -> {cache_dir} ({time.perf_counter() - t0:.1f} s)")
    dataset = CacheDataset(cache_dir)
    config = PipelineConfig(crop_size=CROP, batch_size=2, instantiations=2, seed=0)
    batch = next(iter(make_loader(dataset, config)))
    print("one training batch (channels-last):")
    for key, value in batch.items():
        print(f"  {key:14s} {str(value.shape):22s} {value.dtype}")
    for b in range(config.batch_size):
        case = dataset.case_ids[batch["case_index"][b]]
        voxels = regions_of(batch["label"][b]).sum(axis=(0, 1, 2))
        drawn = ", ".join(SUBSET_NAMES[s] for s in batch["subset"][b])
        print(f"  sample {b}: {case}; " + " ".join(f"{r} {v}" for r, v in zip(REGIONS, voxels)) + f" voxels; subsets {drawn}")
    figure = _draw(batch, workdir / "batch.png")
    print(f"picture of sample 0: {figure}")


def _draw(batch: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image, label = batch["image"][0], batch["label"][0]
    z = int(np.argmax((label > 0).sum(axis=(0, 1))))
    fig, axes = plt.subplots(1, 5, figsize=(12, 2.8))
    for c, name in enumerate(MODALITIES):
        axes[c].imshow(image[:, :, z, c].T, cmap="gray", origin="lower")
        axes[c].set_title(name)
    axes[4].imshow(label[:, :, z].T, cmap="viridis", vmin=0, vmax=3, origin="lower", interpolation="nearest")
    axes[4].set_title("labels")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
