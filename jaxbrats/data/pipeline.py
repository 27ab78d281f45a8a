"""The Grain input pipeline: random crops with augmentation and modality dropout.

Batches are dicts of numpy arrays, channels-last, with these keys
(B = batch, K = missing-modality instantiations per sample, C = crop size):

=================  ==================  =======  ==========================================
key                shape               dtype    meaning
=================  ==================  =======  ==========================================
``image``          (B, C, C, C, 4)     float32  augmented crop, all modalities the case has
``label``          (B, C, C, C)        uint8    internal labels (only for labelled caches)
``valid``          (B, C, C, C)        bool     False where the crop is padding
``modality_mask``  (B, K, 4)           bool     the modalities each instantiation keeps
``subset``         (B, K)              int32    row of `modalities.SUBSETS` for each mask
``present``        (B, 4)              bool     modalities the case really has
``case_index``     (B,)                int32    position of the case in the dataset
``crop_start``     (B, 3)              int32    crop corner in the case's (cache) voxel frame;
                                                negative or beyond the end where padded
``flipped``        (B, 3)              bool     axes the crop was flipped along
``case_shape``     (B, 3)              int32    shape of the whole case in the cache
``box_start``      (B, 3)              int32    the cached case's corner in the source volume's
                                                RAS+ grid (the brain crop box's lower corner)
=================  ==================  =======  ==========================================

``crop_start``, ``flipped``, ``case_shape`` and ``box_start`` locate a crop in
the case and in the source grid (for BraTS, the shared atlas grid), so a
method can read a volume-sized parameter (M3AE's substitute image) at the
same place in training as at inference.

With ``rotation_degrees > 0`` a crop is also rotated (with probability
``rotation_probability``) about its centre, by an angle uniform in
[-rotation_degrees, rotation_degrees] in one of the three axis planes chosen
uniformly (RFNet's public code rotates by up to 10 degrees in a random plane;
the plane choice and the uniform angle are our choice). The rotated crop is
filled with the case: a crop larger in the two rotated axes is cut (padded
and flipped as above), rotated (image: linear; ``label`` and ``valid``:
nearest), and its centre kept, as if the zero-padded case had been rotated
about the crop's centre; image voxels where ``valid`` is False stay 0.
``crop_start`` and ``flipped`` still describe the unrotated crop (the
rotation's centre and the flips applied before rotating): they do not locate
the voxels of a rotated crop, so a method that reads a volume at the crop's
place (M3AE's x_sub) must not rotate.

``image`` is not yet dropped: methods apply ``modality_mask`` on device with
`jaxbrats.modalities.drop_modalities` (zeros for the baseline, a learned
substitute for M3AE, the full image for a teacher), which keeps one host copy
of each crop however many instantiations a method wants.

Randomness comes from Grain's per-record generator, derived from the
sampler's seed and the record's position, and each batch is made whole by one
worker: the stream is the same for any number of workers (and of JAX
processes, each loading its block of every global batch), and the iterator's
state (``get_state``/``set_state``: the samples served over all processes)
resumes it exactly, with any number of workers and any batch size.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import sys

import numpy as np
from absl import flags

from jaxbrats.config import LoaderConfig
from jaxbrats.data.cache import CacheDataset
from jaxbrats.errors import JaxbratsError, require
from jaxbrats.modalities import NUM_MODALITIES, SUBSET_MASKS

DROPOUT_MODES = ("uniform", "drop_k", "none")


@dataclasses.dataclass(frozen=True)
class PipelineConfig(LoaderConfig):
    """Settings of the training input pipeline (see the module docstring for the output).

    The crop, augmentation and worker settings are ``[data]``'s (`config.LoaderConfig`, declared
    there once); the rest is what a run's stage decides (`from_config`).
    """

    #: Samples per batch of this process (a run's global batch over its processes).
    batch_size: int = 2
    #: "uniform": uniform over the (available) 15 subsets; "drop_k": M3AE's drop k ~ U{0..n-1}
    #: of the n present modalities; "none": keep all present modalities.
    dropout: str = "uniform"
    #: Missing-modality instantiations of each crop (2 for self-distillation).
    instantiations: int = 1
    #: Redraw an instantiation equal to an earlier one of the same crop (M3AE's "two different
    #: missing-modal situations"), unless the case has fewer subsets than instantiations.
    distinct: bool = False
    seed: int = 0
    #: Passes over the cases; None repeats forever.
    num_epochs: int | None = None

    @classmethod
    def from_config(cls, data: LoaderConfig, **settings) -> PipelineConfig:
        """The loader settings of a run's ``[data]`` (every `LoaderConfig` field of `data`, e.g. a
        `config.DataConfig`) with `settings`: the batch of this process, the seed, and what the
        method asks for (`Method.pipeline`: dropout, instantiations, distinct)."""
        loader = {field.name: getattr(data, field.name) for field in dataclasses.fields(LoaderConfig)}
        return cls(**loader, **settings)

    def __post_init__(self):
        if self.dropout not in DROPOUT_MODES:
            raise ValueError(f"dropout must be one of {DROPOUT_MODES}, got {self.dropout!r}")
        if len(self.crop_size) != 3 or min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be three positive ints, got {self.crop_size}")
        if self.instantiations < 1 or self.batch_size < 1:
            raise ValueError("batch_size and instantiations must be at least 1")
        if not 0 <= self.rotation_degrees <= 180 or not 0 <= self.rotation_probability <= 1:
            raise ValueError(
                f"rotation_degrees must be in [0, 180] and rotation_probability in [0, 1], "
                f"got {self.rotation_degrees} and {self.rotation_probability}"
            )


class CacheSource:
    """Grain source over a prepared cache: each record holds memory-mapped arrays (Grain's
    RandomAccessDataSource is a protocol: no base class, so this module imports without Grain)."""

    def __init__(self, dataset: CacheDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        # Grain checks a restored iterator state against repr(source): name the
        # cases, not the cache path, so a state resumes on a moved cache too.
        digest = hashlib.sha1("\n".join(self.dataset.case_ids).encode()).hexdigest()[:12]
        return f"CacheSource(cases={len(self.dataset)}, ids_sha1={digest})"

    def __getitem__(self, index: int) -> dict:
        arrays = self.dataset.arrays(index)
        return {
            "case_index": np.int32(index),
            "present": np.array(self.dataset.manifests[index]["present"], dtype=bool),
            "box_start": box_start(self.dataset.manifests[index]),
            **arrays,
        }


def box_start(manifest: dict) -> np.ndarray:
    """(3,) int32: where a cached case starts in its source volume's RAS+ grid (its crop box's lower corner)."""
    return np.asarray([lo for lo, _ in manifest["crop_box"]], np.int32)


def crop_start(rng: np.random.Generator, shape, crop, foreground: np.ndarray | None, oversample: float) -> np.ndarray:
    """Start corner of a crop; negative or beyond-the-end parts are padded.

    Where the case is smaller than the crop the start lies in [size - crop, 0],
    so the case sits at a random place inside the padded crop.
    """
    shape, crop = np.asarray(shape), np.asarray(crop)
    lo, hi = np.minimum(0, shape - crop), np.maximum(0, shape - crop)
    if foreground is not None and len(foreground) and rng.random() < oversample:
        labels = np.unique(foreground[:, 0])
        rows = np.flatnonzero(foreground[:, 0] == rng.choice(labels))
        centre = foreground[rng.choice(rows), 1:]
        return np.clip(centre - crop // 2, lo, hi)
    return np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi)])


def crop_slices(start, shape, crop, flips) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(source, destination) slices that copy a crop, flipped where asked, in one go."""
    src, dst = [], []
    for s, size, c, flip in zip(start, shape, crop, flips):
        a, b = max(s, 0), min(s + c, size)
        d0 = a - s
        if flip:
            src.append(slice(b - 1, a - 1 if a > 0 else None, -1))
            d0 = c - d0 - (b - a)
        else:
            src.append(slice(a, b))
        dst.append(slice(d0, d0 + b - a))
    return tuple(src), tuple(dst)


#: The axis planes a crop may be rotated in (each as scipy.ndimage.rotate's `axes`).
ROTATION_PLANES = ((0, 1), (0, 2), (1, 2))


def rotation_margin(crop, axes, degrees: float) -> np.ndarray:
    """(3,) voxels to add on each side of a crop so that, rotated by `degrees` in the plane `axes`
    about its centre, its centre crop is interpolated from the larger crop alone.

    The rotated crop reaches (ca |cos t| + cb |sin t|) / 2 from the centre along axis a (and
    (ca |sin t| + cb |cos t|) / 2 along b); one voxel more holds linear interpolation's neighbour.
    """
    a, b = axes
    cos, sin = abs(np.cos(np.deg2rad(degrees))), abs(np.sin(np.deg2rad(degrees)))
    half = {a: (crop[a] * cos + crop[b] * sin) / 2, b: (crop[a] * sin + crop[b] * cos) / 2}
    margin = np.zeros(3, np.int64)
    for axis, reach in half.items():
        margin[axis] = max(int(np.ceil(reach - crop[axis] / 2)), 0) + 1
    return margin


def rotated_crop(image, label, start, crop, flips, axes, degrees: float) -> dict:
    """``image``, ``valid`` (and ``label`` unless None) of the crop at `start`, flipped along `flips`,
    rotated about its centre by `degrees` in the plane `axes` (a < b): padding outside the case is 0
    (``valid`` False), as if the zero-padded case were rotated by `scipy.ndimage.rotate(...,
    axes=axes, reshape=False)` about the crop's centre (image: order 1; label and valid: order 0).

    A crop `rotation_margin` larger in the plane is cut with `crop_slices`, in a layout with the
    plane's two axes leading, so each position of the output plane interpolates a whole row (the
    other axis and the channels) from the four (linear) or one (nearest) rows around its input
    point: scipy.ndimage's interpolation at the same points (the tests compare), with one
    interpolation per plane position instead of ndimage.rotate's loop over planes. An 80^3 crop of
    a 4-channel case takes ~18 ms this way (~4 ms unrotated), ~130 ms with scipy.ndimage.rotate.
    """
    a, b = axes
    perm = (a, b, 3 - a - b)
    back = tuple(int(i) for i in np.argsort(perm))  # original axis i is axis back[i] of the buffers
    crop, margin = np.asarray(crop), rotation_margin(crop, axes, degrees)
    big = crop + 2 * margin
    src, dst = crop_slices(np.asarray(start) - margin, image.shape[:3], big, flips)
    size = tuple(int(n) for n in big[list(perm)])  # (La, Lb, Lo) of the buffers
    out_size = tuple(int(n) for n in crop[list(perm)])

    # Input point of each output position (i, j) of the plane: R (o - centre_out) + centre_in,
    # R = [[cos, sin], [-sin, cos]] as scipy.ndimage.rotate.
    cos, sin = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    u = np.arange(out_size[0]) - (out_size[0] - 1) / 2
    v = np.arange(out_size[1]) - (out_size[1] - 1) / 2
    pa = (cos * u[:, None] + sin * v[None, :] + (size[0] - 1) / 2).ravel()
    pb = (-sin * u[:, None] + cos * v[None, :] + (size[1] - 1) / 2).ravel()

    def nearest(buffer):
        rows = buffer.reshape(size[0] * size[1], -1)
        ia = np.clip(np.floor(pa + 0.5), 0, size[0] - 1).astype(np.intp)  # ndimage's order-0 rounding
        ib = np.clip(np.floor(pb + 0.5), 0, size[1] - 1).astype(np.intp)
        return (
            rows[ia * size[1] + ib].reshape(out_size + buffer.shape[3:]).transpose(back + tuple(range(3, buffer.ndim)))
        )

    out = {}
    valid = np.zeros(size, bool)
    valid.transpose(back)[dst] = True
    out["valid"] = np.ascontiguousarray(nearest(valid))
    if label is not None:
        buffer = np.zeros(size, np.uint8)
        buffer.transpose(back)[dst] = label[src]
        out["label"] = np.ascontiguousarray(nearest(buffer))

    buffer = np.zeros(size + (NUM_MODALITIES,), np.float32)
    buffer.transpose(back + (3,))[dst] = image[src]
    rows = buffer.reshape(size[0] * size[1], -1)
    ia = np.clip(np.floor(pa), 0, size[0] - 2).astype(np.intp)
    ib = np.clip(np.floor(pb), 0, size[1] - 2).astype(np.intp)
    wa, wb = (pa - ia).astype(np.float32)[:, None], (pb - ib).astype(np.float32)[:, None]
    corners = [
        (ia * size[1] + ib + step, weight)
        for step, weight in (
            (0, (1 - wa) * (1 - wb)),
            (1, (1 - wa) * wb),
            (size[1], wa * (1 - wb)),
            (size[1] + 1, wa * wb),
        )
    ]
    out["image"] = np.empty(tuple(crop) + (NUM_MODALITIES,), np.float32)
    target = out["image"].transpose(perm + (3,))  # the output in the buffers' layout
    invalid = ~out["valid"].transpose(perm)
    # One output row of the plane at a time: its gathers stay in the cache.
    n = out_size[1]
    gathered, total = np.empty((n, rows.shape[1]), np.float32), np.empty((n, rows.shape[1]), np.float32)
    for i in range(out_size[0]):
        part = slice(i * n, (i + 1) * n)
        for k, (index, weight) in enumerate(corners):
            np.take(rows, index[part], axis=0, out=gathered if k else total)
            if k:
                gathered *= weight[part]
                total += gathered
            else:
                total *= weight[part]
        row = total.reshape(n, out_size[2], NUM_MODALITIES)
        row[invalid[i]] = 0.0  # padding stays exactly 0
        target[i] = row
    return out


def sample_modality_masks(
    rng: np.random.Generator, present: np.ndarray, mode: str, k: int, distinct: bool = False
) -> np.ndarray:
    """(k, 4) boolean masks, each a non-empty subset of the present modalities; pairwise different if `distinct`."""
    if distinct and mode != "none" and 2 ** int(present.sum()) - 1 >= k:
        masks = [_draw_masks(rng, present, mode, 1)[0]]
        while len(masks) < k:
            mask = _draw_masks(rng, present, mode, 1)[0]
            if not any((mask == m).all() for m in masks):
                masks.append(mask)
        return np.stack(masks)
    return _draw_masks(rng, present, mode, k)


def _draw_masks(rng: np.random.Generator, present: np.ndarray, mode: str, k: int) -> np.ndarray:
    if mode == "none":
        return np.repeat(present[None], k, axis=0)
    if mode == "uniform":
        allowed = SUBSET_MASKS[~(SUBSET_MASKS & ~present).any(axis=1)]
        return allowed[rng.integers(len(allowed), size=k)]
    # drop_k (M3AE): drop k ~ U{0..n-1} of the n present modalities, chosen at random.
    have = np.flatnonzero(present)
    masks = np.repeat(present[None], k, axis=0)
    for row in masks:
        row[rng.choice(have, size=rng.integers(len(have)), replace=False)] = False
    return masks


def subset_indices(masks: np.ndarray) -> np.ndarray:
    """Row of SUBSET_MASKS for each (…, 4) mask."""
    weights = 1 << np.arange(NUM_MODALITIES)
    lookup = np.zeros(1 << NUM_MODALITIES, dtype=np.int32)
    lookup[(SUBSET_MASKS * weights).sum(axis=1)] = np.arange(len(SUBSET_MASKS))
    return lookup[(masks * weights).sum(axis=-1)]


class RandomCropAugmentDropout:
    """Crop (foreground-oversampled, flipped), intensity-augment and draw modality masks.

    A Grain RandomMap by registration (`_grain`), so that this module imports without Grain.
    """

    def __init__(self, config: PipelineConfig):
        self.config = config

    def __reduce__(self):
        # Grain's worker processes unpickle the transform: registering it there too.
        return _transform, (self.config,)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        cfg = self.config
        image, label = element["image"], element.get("label")
        shape, crop = image.shape[:3], cfg.crop_size
        start = crop_start(rng, shape, crop, element.get("foreground"), cfg.foreground_oversample)
        flips = rng.random(3) < cfg.flip_probability
        rotation = self._draw_rotation(rng)
        if rotation is not None:
            out = rotated_crop(image, label, start, crop, flips, *rotation)
        else:
            src, dst = crop_slices(start, shape, crop, flips)
            out = {"image": np.zeros(tuple(crop) + (NUM_MODALITIES,), np.float32), "valid": np.zeros(crop, bool)}
            out["image"][dst] = image[src]
            out["valid"][dst] = True
            if label is not None:
                out["label"] = np.zeros(crop, np.uint8)
                out["label"][dst] = label[src]
        self._augment_intensity(out, rng)
        present = element["present"]
        masks = sample_modality_masks(rng, present, cfg.dropout, cfg.instantiations, cfg.distinct)
        out.update(
            modality_mask=masks,
            subset=subset_indices(masks),
            present=present,
            case_index=element["case_index"],
            crop_start=start.astype(np.int32),
            flipped=flips,
            case_shape=np.asarray(shape, np.int32),
            box_start=element["box_start"],
        )
        return out

    def _draw_rotation(self, rng: np.random.Generator):
        """(plane axes, degrees) of this crop's rotation, or None; draws nothing when rotation is off."""
        cfg = self.config
        if not cfg.rotation_degrees:
            return None
        apply = rng.random() < cfg.rotation_probability
        plane = ROTATION_PLANES[rng.integers(len(ROTATION_PLANES))]
        degrees = float(rng.uniform(-cfg.rotation_degrees, cfg.rotation_degrees))
        return (plane, degrees) if apply else None

    def _augment_intensity(self, out: dict, rng: np.random.Generator) -> None:
        cfg = self.config
        if not (cfg.intensity_scale or cfg.intensity_shift):
            return
        scale = rng.uniform(1 - cfg.intensity_scale, 1 + cfg.intensity_scale, NUM_MODALITIES).astype(np.float32)
        shift = rng.uniform(-cfg.intensity_shift, cfg.intensity_shift, NUM_MODALITIES).astype(np.float32)
        # Rows of W * 4 values with the per-channel factors tiled along them:
        # numpy's broadcast over a last axis of 4 is ~8x slower than this.
        rows = out["image"].reshape(-1, out["image"].shape[2] * NUM_MODALITIES)
        rows *= np.tile(scale, out["image"].shape[2])
        rows += np.tile(shift, out["image"].shape[2])
        if not out["valid"].all():
            out["image"][~out["valid"]] = 0.0  # padding stays exactly 0


def _grain():
    """Grain, imported on first use, with `RandomCropAugmentDropout` registered as its RandomMap
    (Grain applies a transform by its abstract base class)."""
    grain = require("grain", "the training input pipeline")
    grain.transforms.RandomMap.register(RandomCropAugmentDropout)
    return grain


def _transform(config: PipelineConfig) -> RandomCropAugmentDropout:
    _grain()
    return RandomCropAugmentDropout(config)


def make_loader(dataset: CacheDataset, config: PipelineConfig, shard_options=None) -> BatchLoader:
    """The training batches over `dataset`: iterate it for a `BatchIterator` from the first batch.

    `shard_options` (Grain's `ShardOptions`; its shard index and count) defaults to one shard per
    JAX process: each process loads its own block of every global batch (`SampledCrops`). A last
    global batch the samples cannot fill is dropped.
    """
    grain = _grain()
    if config.workers and not flags.FLAGS.is_parsed():
        # Grain's worker processes read absl flags; a program that is not an
        # absl app (pytest, a notebook, our CLI) has not parsed them.
        flags.FLAGS.mark_as_parsed()
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    sampler = grain.samplers.IndexSampler(  # one order for every process: `SampledCrops` shares it out
        num_records=len(dataset),
        shuffle=True,
        num_epochs=config.num_epochs,
        seed=config.seed,
    )
    samples = SampledCrops(CacheSource(dataset), sampler, shard_options, RandomCropAugmentDropout(config))
    return BatchLoader(samples, len(sampler), config)


class SampledCrops:
    """This process's sample at a position of its stream: the sampler's record at the matching
    place of the global order, cropped and augmented with the sampler's generator for that place
    (Grain's seed + place).

    Global batch k of P processes x B holds the samples at places offset + k P B ... ; process i
    loads its i-th block of B. A sample depends on its place only and each batch is made whole by
    one worker, so the batches are those of one process and no worker for any number of
    processes and workers (a Grain DataLoader batches inside each worker, its batches changing
    with the worker count). `offset`: the samples served before (a resume).
    """

    def __init__(self, source: CacheSource, sampler, shard_options, transform: RandomCropAugmentDropout):
        self.source, self.sampler, self.transform, self.offset = source, sampler, transform, 0
        self.shard_index, self.shard_count = shard_options.shard_index, shard_options.shard_count

    def from_offset(self, offset: int) -> SampledCrops:
        moved = copy.copy(self)
        moved.offset = offset
        return moved

    def __call__(self, position: int) -> dict:
        batch, j = divmod(position, self.transform.config.batch_size)
        place = self.offset + (batch * self.shard_count + self.shard_index) * self.transform.config.batch_size + j
        record = self.sampler[place]
        return self.transform.random_map(self.source[record.record_key], record.rng)


class BatchLoader:
    """The batches of one loader; each `iter` starts a `BatchIterator` at the first one."""

    def __init__(self, samples: SampledCrops, places: int, config: PipelineConfig):
        self.samples, self.places, self.config = samples, places, config
        self.source = repr(samples.source)
        self.global_batch = samples.shard_count * config.batch_size

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self)

    def batches(self, offset: int):
        """A Grain MapDataset of this process's batches of the whole global batches after `offset` samples."""
        grain, batch = _grain(), self.config.batch_size
        positions = grain.MapDataset.range(max(self.places - offset, 0) // self.global_batch * batch)
        return positions.map(self.samples.from_offset(offset)).batch(batch, drop_remainder=True)


class BatchIterator:
    """Batches in order, prepared by `config.workers` processes (0: a thread of this one) each
    `config.prefetch` batches ahead.

    Its state (`get_state`/`set_state`, JSON bytes for Grain's Orbax handler) is the number of
    samples the run has served over all processes: a resume goes on at the next one, with any
    number of workers and any batch size.
    """

    def __init__(self, loader: BatchLoader):
        self.loader, self.offset, self.served, self._iterator = loader, 0, 0, None

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict:
        if self._iterator is None:  # started on first use: a restored state comes before
            self._iterator = iter(self._open())
        batch = next(self._iterator)
        self.served += 1
        return batch

    def _open(self):
        grain, config = _grain(), self.loader.config
        batches = self.loader.batches(self.offset)
        if not config.workers:
            return batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=config.prefetch))
        options = grain.MultiprocessingOptions(num_workers=config.workers, per_worker_buffer_size=config.prefetch)
        return batches.to_iter_dataset(grain.ReadOptions(num_threads=0)).mp_prefetch(options)

    def get_state(self) -> bytes:
        samples = self.offset + self.served * self.loader.global_batch
        return json.dumps({"samples_served": samples, "source": self.loader.source}).encode()

    def set_state(self, state: bytes) -> None:
        try:
            saved = json.loads(state)
            if "samples_served" not in saved:
                saved = {"samples_served": _served_by_data_loader(saved, self.loader), "source": saved["data_source"]}
            offset, source = int(saved["samples_served"]), saved["source"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise JaxbratsError(f"resume: the data iterator's saved state is unreadable ({type(e).__name__}: {e})")
        if source != self.loader.source:
            raise JaxbratsError(f"resume: the data iterator was saved over other cases ({source})")
        self.offset, self.served, self._iterator = offset, 0, None


def _served_by_data_loader(state: dict, loader: BatchLoader) -> int:
    """Samples served over all processes, from the state of the Grain DataLoader of earlier
    versions. With one process and at most one loader worker it drew the same samples in the same
    order as now; with more, its own order, so the run goes on in this one (with a note)."""
    processes = loader.samples.shard_count
    records = max(int(i) for i in state["last_seen_indices"].values()) // processes + 1
    if (state["worker_count"] > 1 or processes > 1) and loader.samples.shard_index == 0:  # process 0 notes
        print(
            f"note: the data iterator was saved by an earlier jaxbrats with {state['worker_count']} loader "
            f"worker(s) in {processes} process(es), whose order of samples this version does not repeat: the run "
            f"goes on from sample {records * processes} of this version's order",
            file=sys.stderr,
        )
    return records * processes
