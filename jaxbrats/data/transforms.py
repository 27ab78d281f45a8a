"""On-device transforms of training crops, drawn inside the jitted step.

- `visible_patches` / `patch_mask_to_voxels`: M3AE's masking (arXiv:2303.05302):
  after whole modalities are dropped, an exact number of 16^3
  patches over all modalities stays visible, drawn from the kept modalities.
- `read_window` (`read_windows` for a batch): a crop-sized window of a volume-sized array (M3AE's
  substitute image x_sub), located with the batch's ``crop_start``,
  ``flipped``, ``case_shape`` and ``box_start`` (data.pipeline), in one
  coordinate frame for training and inference (`case_corner`): "template",
  the source volume's grid (BraTS cases are co-registered to one atlas, so
  a voxel of that grid is the same place in every case), or "centred", the
  cached case centred in the volume (for data not in one atlas space).
  `place_case` is the numpy counterpart that puts a whole case into that
  frame (M3AE's mean-image ablation).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxbrats.modalities import NUM_MODALITIES
from jaxbrats.runtime.sharding import SPACE_AXIS, space_shards


def patch_grid(crop, patch: int) -> tuple[int, int, int]:
    if any(c % patch for c in crop):
        raise ValueError(f"crop {tuple(crop)} is not a multiple of the patch size {patch}")
    return tuple(c // patch for c in crop)


def visible_patches(key, modality_mask, grid, visible_fraction: float):
    """(*grid, 4) bool: exactly round(visible_fraction * 4 * prod(grid)) visible patches.

    Patches of dropped modalities (``modality_mask`` False) are never visible;
    the visible ones are a uniform draw from the patches of the kept
    modalities. With M3AE's 12.5 % and at least one kept modality there are
    always enough (one modality has 4x the patches needed).
    """
    total = NUM_MODALITIES * math.prod(grid)
    count = round(visible_fraction * total)
    scores = jax.random.uniform(key, tuple(grid) + (NUM_MODALITIES,))
    scores = jnp.where(modality_mask, scores, 2.0).reshape(-1)  # dropped patches sort last
    rank = jnp.zeros(total, jnp.int32).at[jnp.argsort(scores)].set(jnp.arange(total, dtype=jnp.int32))
    return (rank < count).reshape(tuple(grid) + (NUM_MODALITIES,)) & modality_mask


def patch_mask_to_voxels(mask, patch: int):
    """(g0, g1, g2, C) patch mask -> (g0 * patch, g1 * patch, g2 * patch, C) voxel mask."""
    g0, g1, g2, c = mask.shape
    big = jnp.broadcast_to(mask[:, None, :, None, :, None, :], (g0, patch, g1, patch, g2, patch, c))
    return big.reshape(g0 * patch, g1 * patch, g2 * patch, c)


FRAMES = ("template", "centred")


def case_origin(case_shape, volume_shape):
    """Corner of a case inside a volume-sized array: the case is centred (either may be larger)."""
    return (jnp.asarray(volume_shape) - jnp.asarray(case_shape)) // 2


def case_corner(frame: str, case_shape, box_start, volume_shape, xp=jnp):
    """Where a cached case's voxel (0, 0, 0) lies in a volume-sized array, per case (..., 3).

    "template": at the case's place in its source grid (`box_start`, the brain crop box's
    corner); "centred": the case centred in the volume (`case_origin`).
    """
    if frame == "template":
        return xp.asarray(box_start)
    return (xp.asarray(volume_shape) - xp.asarray(case_shape)) // 2


def read_windows(volume, starts, flips, size):
    """`read_window` for each crop of a batch: (B, *size, C) from starts (B, 3) and flips (B, 3).

    In a trace under a mesh that splits volumes along "space" (x_sub in a depth-split run),
    with the batch along "data": `read_windows_split`, so no device gathers the volume.
    """
    shards = space_shards()
    mesh = jax.sharding.get_abstract_mesh()
    if (
        shards > 1
        and volume.shape[0] % shards == 0
        and size[0] % shards == 0
        and starts.shape[0] % mesh.shape["data"] == 0
    ):
        return read_windows_split(volume, starts, flips, size, shards)
    return jax.vmap(lambda start, flipped: read_window(volume, start, flipped, size))(starts, flips)


def read_windows_split(volume, starts, flips, size, shards: int):
    """`read_windows` of a volume whose depth is split in `shards` slabs along "space".

    Each device reads, from its own slab, the rows of its samples' windows that lie there
    (zeros for the others: a row lies on exactly one slab, or outside the volume), cut into
    the window's `shards` slabs; an all-to-all sends slab k to device k, which sums what it
    receives. One window per sample moves, and its gradient (the transpose) the same way
    back: no device holds the whole volume. The batch is split along "data" inside too:
    left to XLA, the all-to-all of a batch gathered it.
    """
    n = size[0]

    def one(slab, start, flipped):
        rows = slab.shape[0]
        index = (
            start[0]
            + jnp.where(flipped[0], jnp.arange(n - 1, -1, -1), jnp.arange(n))
            - lax.axis_index(SPACE_AXIS) * rows
        )
        mine = (index >= 0) & (index < rows)
        window = read_window(
            jnp.take(slab, jnp.clip(index, 0, rows - 1), axis=0),
            jnp.stack([jnp.int32(0), start[1], start[2]]),
            flipped.at[0].set(False),
            size,
        )
        return jnp.where(mine[:, None, None, None], window, jnp.zeros((), window.dtype))

    def local(slab, starts, flips):
        windows = jax.vmap(lambda s, f: one(slab, s, f))(starts, flips)
        pieces = windows.reshape(windows.shape[0], shards, n // shards, *windows.shape[2:])
        return lax.all_to_all(pieces, SPACE_AXIS, 1, 1, tiled=False).sum(axis=1)

    return jax.shard_map(
        local,
        in_specs=(P(SPACE_AXIS), P("data"), P("data")),
        out_specs=P("data", SPACE_AXIS),
        axis_names={SPACE_AXIS, "data"},
    )(volume, jnp.asarray(starts, jnp.int32), jnp.asarray(flips, bool))


def read_window(volume, start, flipped, size):
    """The window of `volume` (S0, S1, S2, C) at `start` (may lie partly outside: zeros), flipped like the crop.

    ``start`` is in the volume's frame (e.g. ``crop_start + case_origin``);
    ``flipped`` (3,) bool flips the window along each axis, as the pipeline
    flipped the image crop, so voxel for voxel the window lines up with it.
    One gather per axis: no padded copy of the (large) volume; the gradient
    is volume-sized, non-zero only at the voxels read.
    """
    window, inside = volume, jnp.ones((1, 1, 1, 1), bool)
    for axis, n in enumerate(size):
        offsets = jnp.where(flipped[axis], jnp.arange(n - 1, -1, -1), jnp.arange(n))
        index = jnp.asarray(start[axis]) + offsets
        ok = (index >= 0) & (index < volume.shape[axis])
        window = jnp.take(window, jnp.clip(index, 0, volume.shape[axis] - 1), axis=axis)
        inside = inside & ok.reshape([n if a == axis else 1 for a in range(4)])
    return jnp.where(inside, window, jnp.zeros((), window.dtype))


def place_centred(case, volume_shape):
    """Numpy: `case` (D, H, W, C) put into a zero volume of `volume_shape` in `case_origin`'s frame."""
    return place_case(case, [(v - c) // 2 for v, c in zip(volume_shape, case.shape)], volume_shape)


def place_case(case, origin, volume_shape):
    """Numpy: `case` (D, H, W, C) put into a zero volume of `volume_shape` with its voxel 0 at `origin`."""
    out = np.zeros(tuple(volume_shape) + case.shape[3:], case.dtype)
    lo = [max(int(o), 0) for o in origin]
    hi = [min(int(o) + c, v) for o, c, v in zip(origin, case.shape, volume_shape)]
    if any(b <= a for a, b in zip(lo, hi)):
        return out  # the case lies outside the volume
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = case[
        tuple(slice(a - int(o), b - int(o)) for a, b, o in zip(lo, hi, origin))
    ]
    return out
