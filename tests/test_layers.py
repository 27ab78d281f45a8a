"""Every lowering of Conv3D equals XLA's native 3D convolution, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxbrats.networks.layers import Conv3D, conv3d_depth2d, conv3d_native, resolve_conv_impl


# The last two fold into 40 and 18 2D slices: the weight gradient is summed over several pieces of 16.
@pytest.mark.parametrize(
    "kernel,stride,shape",
    [
        (3, 1, (2, 8, 6, 7, 3)),
        (3, 2, (1, 8, 8, 6, 2)),
        (3, 2, (1, 7, 5, 9, 2)),
        (1, 1, (2, 4, 4, 4, 5)),
        (3, 1, (2, 20, 6, 5, 3)),
        (3, 2, (1, 36, 6, 4, 2)),
    ],
)
def test_depth2d_equals_native(kernel, stride, shape):
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kk, (kernel,) * 3 + (shape[-1], 4))
    np.testing.assert_allclose(conv3d_depth2d(x, w, stride), conv3d_native(x, w, stride), atol=1e-4, rtol=1e-5)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, stride)))

    grads = jax.jit(jax.grad(loss(conv3d_depth2d), argnums=(0, 1)))(x, w)
    want = jax.grad(loss(conv3d_native), argnums=(0, 1))(x, w)
    for g, r in zip(grads, want):
        np.testing.assert_allclose(g, r, atol=1e-3, rtol=1e-4)


def test_conv_module_impls_agree_and_auto_resolves():
    a = Conv3D(3, 5, 3, stride=2, impl="native", rngs=nnx.Rngs(0))
    b = Conv3D(3, 5, 3, stride=2, impl="depth2d", rngs=nnx.Rngs(0))
    x = jnp.ones((1, 8, 8, 8, 3))
    np.testing.assert_allclose(a(x), b(x), atol=1e-5)
    assert resolve_conv_impl("auto") == ("depth2d" if jax.default_backend() == "cpu" else "native")
    with pytest.raises(ValueError, match="conv_impl"):
        resolve_conv_impl("winograd")
