"""Benchmark of the data side: preprocessing time per case, pipeline throughput.

    python3 tools/bench_data.py [--fixture DIR] [--crops 80] [--json FILE]

Preprocessing is timed on the real BraTS case beside the project when found
(else a phantom of the same 240x240x155 size): read + validate + crop +
normalise + write, median of 3. Throughput is measured on 128^3 crops with
flips, intensity augmentation and modality dropout (two instantiations),
batch 2, with 1 and 2 loader workers, after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from jaxbrats import files
from jaxbrats.data.cache import CacheDataset
from jaxbrats.data.discovery import discover
from jaxbrats.data.phantom import write_phantom
from jaxbrats.data.pipeline import PipelineConfig, make_loader
from jaxbrats.data.preprocess import prepare_case, prepare_dataset

FULL_SHAPE = (240, 240, 155)
DEFAULT_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "brats_fixtures"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_preprocessing(data_dir: Path, work: Path, repeats: int = 3) -> float:
    _, records, _ = discover(data_dir)
    times = []
    for r in range(repeats):
        cache = work / f"prep{r}"
        t0 = time.perf_counter()
        prepare_case(records[0], cache, "zscore", 4, True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_pipeline(cache: Path, workers: int, crops: int) -> float:
    config = PipelineConfig(crop_size=(128, 128, 128), batch_size=2, instantiations=2, workers=workers, prefetch=2)
    iterator = iter(make_loader(CacheDataset(cache), config))
    for _ in range(2 * max(workers, 1)):  # warm-up: start the workers, fill their buffers
        next(iterator)
    t0 = time.perf_counter()
    for _ in range(crops // config.batch_size):
        next(iterator)
    return crops / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE)
    parser.add_argument("--crops", type=int, default=80)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jaxbrats-bench-"))
    try:
        phantom = work / "phantom"
        write_phantom(phantom, 4, FULL_SHAPE, layout="brats2023", seed=0)
        real = args.fixture if (args.fixture / "BraTS-GLI-00000-000").is_dir() else None
        result = {"machine": f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores"}
        result["preprocess_source"] = "real BraTS fixture" if real else "phantom 240x240x155"
        result["preprocess_s_per_case"] = time_preprocessing(real or phantom, work)
        cache = work / "cache"
        prepare_dataset(phantom, cache, progress=False)
        for workers in (1, 2):
            result[f"crops_128_per_s_workers_{workers}"] = time_pipeline(cache, workers, args.crops)
        print(json.dumps(result, indent=1))
        if args.json:
            files.write_text_atomic(args.json, json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
