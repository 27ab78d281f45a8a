"""Layers of the backbone, with lowerings chosen per backend behind one API.

`Conv3D` holds a DHWIO kernel and a bias like `nnx.Conv`, and computes a
channels-last 3D convolution padded by kernel // 2 on each side, as
PyTorch's ``Conv3d(padding=k // 2)`` in the public code (for a stride-2
convolution of an even size this differs from XLA's "SAME", which pads only
at the end), in one of two ways:

- ``"native"``: XLA's 3D convolution (cuDNN on GPU).
- ``"depth2d"``: the k^3 kernel as k 2D convolutions over depth-shifted
  slices, batch and depth folded together, summed. XLA:CPU's 3D convolution
  is several times slower than its 2D one: on 2 cores, 48^3 x 16 channels,
  forward + both gradients took 1027 ms native and 245 ms this way, equal to
  within float32 rounding (tests/test_layers.py checks it). Its weight
  gradient is a custom VJP that sums the 2D weight gradients of cache-sized
  pieces of the folded batch: at 128^3 x 16 channels this took the
  convolution's forward + backward from 2956 to 1206 ms.

``"auto"`` picks depth2d on CPU and native elsewhere.

Volume sharding: when the mesh in context (`jax.set_mesh`, as the engine and
the evaluation lower their programs) splits the depth axis over "space",
a 3x3x3 convolution runs on each device's slab with the neighbours' boundary
slices (halos) moved by `lax.ppermute` (`halo_conv3d`), for either
lowering. XLA's own partitioning of a depth-sharded convolution was measured
wrong here (jax 0.10.2, 8 CPU devices, native lowering, mesh data 2 x space
4: gradients off by 17 % of their largest value; jax issue 16894 reports the
same class of bug, a sharded strided convolution giving wrong numbers), and it
all-gathers where a shard is thinner than the halo. The explicit exchange moves exactly 2 x halo slices per convolution
and is tested against one device.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxbrats.config import CONV_IMPLS
from jaxbrats.runtime.sharding import SPACE_AXIS, space_shards


def conv3d_native(x, kernel, stride: int = 1, depth_padding=None):
    """`depth_padding`: (before, after) slices of zeros on the depth axis (default kernel // 2 each)."""
    p = kernel.shape[0] // 2
    pad = [tuple(depth_padding) if depth_padding is not None else (p, p), (p, p), (p, p)]
    return lax.conv_general_dilated(x, kernel, (stride,) * 3, pad, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def _depth_taps(x, k: int, stride: int, depth_padding):
    """The k depth-shifted (and strided) views of x as 2D batches: k arrays (N * D_out, H, W, C)."""
    n, d, h, w, c = x.shape
    before, after = depth_padding
    xp = jnp.pad(x, ((0, 0), (before, after), (0, 0), (0, 0), (0, 0)))
    d_out = (d + before + after - k) // stride + 1
    # Output depth j reads input depth j * stride + i of the padded volume.
    return [
        lax.slice_in_dim(xp, i, i + (d_out - 1) * stride + 1, stride, axis=1).reshape(n * d_out, h, w, c)
        for i in range(k)
    ], d_out


def _conv2d(x, kernel, stride: int):
    p = kernel.shape[0] // 2
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), [(p, p), (p, p)], dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _depth2d_forward(x, kernel, stride: int, depth_padding):
    n = x.shape[0]
    taps, d_out = _depth_taps(x, kernel.shape[0], stride, depth_padding)
    y = sum(_conv2d(t, kernel[i], stride) for i, t in enumerate(taps))
    return y.reshape(n, d_out, *y.shape[1:])


#: Target size of one piece of a weight gradient (elements of its input slab). XLA:CPU computes the
#: weight gradient of a 2D convolution several times faster on cache-sized pieces than on a whole
#: 128^3 volume (tools/profile_step.py; docs/benchmarks/README.md); 4 to 16 slices per piece.
WGRAD_CHUNK_ELEMENTS = 1 << 20


def _weight_grad_2d(x, dy, kernel, stride: int):
    """d(sum(conv2d(x, kernel) * dy)) / d kernel, summed over pieces of the batch axis."""
    m = x.shape[0]
    per_slice = x.shape[1] * x.shape[2] * x.shape[3]
    chunk = min(max(WGRAD_CHUNK_ELEMENTS // per_slice, 4), 16)
    total = None
    for start in range(0, m, chunk):
        a, g = x[start : start + chunk], dy[start : start + chunk]
        part = jax.vjp(lambda k, a=a: _conv2d(a, k, stride), kernel)[1](g)[0]
        total = part if total is None else total + part
    return total


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depth2d(x, kernel, stride: int, depth_padding):
    return _depth2d_forward(x, kernel, stride, depth_padding)


def _depth2d_fwd(x, kernel, stride: int, depth_padding):
    return _depth2d_forward(x, kernel, stride, depth_padding), (x, kernel)


def _depth2d_bwd(stride: int, depth_padding, res, dy):
    x, kernel = res
    dx = jax.vjp(lambda v: _depth2d_forward(v, kernel, stride, depth_padding), x)[1](dy)[0]
    taps, _ = _depth_taps(x, kernel.shape[0], stride, depth_padding)
    dy2 = dy.reshape(-1, *dy.shape[2:])
    dkernel = jnp.stack([_weight_grad_2d(t, dy2, kernel[i], stride) for i, t in enumerate(taps)])
    return dx, dkernel


_depth2d.defvjp(_depth2d_fwd, _depth2d_bwd)


def conv3d_depth2d(x, kernel, stride: int = 1, depth_padding=None):
    """The same 3D convolution as a sum over kernel depth of 2D convolutions.

    Its weight gradient is computed piece by piece over the folded batch and
    depth axis (`_weight_grad_2d`); the input gradient is the usual one.
    """
    if kernel.shape[0] == 1 and stride == 1:
        return jnp.einsum("ndhwc,co->ndhwo", x, kernel[0, 0, 0])
    p = kernel.shape[0] // 2
    return _depth2d(x, kernel, stride, tuple(depth_padding) if depth_padding is not None else (p, p))


def resolve_conv_impl(impl: str) -> str:
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "depth2d" if jax.default_backend() == "cpu" else "native"
    return impl


def exchange_halos(x, before: int, after: int, shards: int):
    """x (N, d, H, W, C), this device's slab of depth -> (N, before + d + after, H, W, C).

    Inside `shard_map` over "space": the last `before` slices of the previous shard and the first
    `after` of the next are appended; the volume's ends receive zeros (the zero padding).
    """
    parts = []
    if before:
        parts.append(lax.ppermute(x[:, -before:], SPACE_AXIS, [(i, i + 1) for i in range(shards - 1)]))
    parts.append(x)
    if after:
        parts.append(lax.ppermute(x[:, :after], SPACE_AXIS, [(i + 1, i) for i in range(shards - 1)]))
    return jnp.concatenate(parts, axis=1)


def halo_conv3d(conv, x, kernel, stride: int, shards: int):
    """`conv` (a lowering: x, kernel, stride, depth_padding) on a depth split over "space", halos exchanged.

    Each shard's slab must hold a whole number of output slices (its depth divisible by the
    stride): output slice j reads input slices j * stride - p .. j * stride + p, so a
    stride-1 convolution needs p slices from each side and a stride-2 one only from before.
    """
    p = kernel.shape[0] // 2
    after = p if stride == 1 else 0

    def local(xs, k):
        # The kernel enters float32 and is cast here, per shard ("varying"): cast before the
        # shard_map, its gradient's sum over "space" is a bfloat16 all-reduce that XLA:CPU's
        # AllReducePromotion pass aborts on (jax 0.10.2); cast here, the sum stays float32.
        k = lax.pcast(k, SPACE_AXIS, to="varying").astype(xs.dtype)
        return conv(exchange_halos(xs, p, after, shards), k, stride, (0, 0))

    spec = jax.sharding.PartitionSpec(None, SPACE_AXIS)
    return jax.shard_map(local, in_specs=(spec, jax.sharding.PartitionSpec()), out_specs=spec, axis_names={SPACE_AXIS})(
        x, kernel
    )


class Conv3D(nnx.Module):
    """Channels-last 3D convolution, padding kernel // 2, float32 parameters, `dtype` compute."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        *,
        stride: int = 1,
        dtype=jnp.float32,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (kernel,) * 3 + (cin, cout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.stride = stride
        self.dtype = jnp.dtype(dtype)
        self.impl = resolve_conv_impl(impl)

    def __call__(self, x):
        x = x.astype(self.dtype)
        conv = conv3d_depth2d if self.impl == "depth2d" else conv3d_native
        shards = space_shards()
        if shards > 1 and self.kernel.shape[0] > 1:  # a 1x1x1 convolution needs no neighbour
            y = halo_conv3d(conv, x, self.kernel[...], self.stride, shards)
        else:
            y = conv(x, self.kernel[...].astype(self.dtype), self.stride)
        return y + self.bias[...].astype(self.dtype)
