"""The JAX backbone against the PyTorch reference: same weights, same input, same outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxbrats.networks.unet import UNet, UNetConfig

torch = pytest.importorskip("torch")

from jaxbrats.interop.torch_unet import TorchUNet, load_torch_weights, torch_state_dict  # noqa: E402  (needs torch)

SMALL = {"widths": (8, 16, 16, 16), "blocks": (1, 2, 1, 2), "deep_supervision": True}


def _pair(cfg: UNetConfig):
    model = UNet(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    reference = TorchUNet(cfg).double()  # float64 on the torch side: the error measured is JAX's
    reference.load_state_dict({k: v.double() for k, v in torch_state_dict(state).items()})
    return graphdef, state, reference


def _inputs(shape=(2, 16, 16, 16, 4), seed=0):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return x, torch.from_numpy(x.transpose(0, 4, 1, 2, 3)).double()


def _channels_last(t):
    return t.detach().numpy().transpose(0, 2, 3, 4, 1)


#: The real backbone (16/32/64/128 channels, 1/2/2/4 blocks, deep supervision), as M3AE configures it.
FULL = {"deep_supervision": True}


@pytest.mark.parametrize(
    "upsample,conv_impl,size,batch",
    [
        pytest.param("nearest", "native", SMALL, 2, id="nearest-native"),
        pytest.param("nearest", "depth2d", SMALL, 2, id="nearest-depth2d"),
        pytest.param("trilinear", "native", SMALL, 2, id="trilinear-native"),
        pytest.param("trilinear", "depth2d", SMALL, 2, id="trilinear-depth2d"),
        pytest.param("trilinear", "depth2d", FULL, 1, id="full-width-trilinear-depth2d"),
    ],
)
def test_forward_matches_pytorch(upsample, conv_impl, size, batch):
    """Logits, every encoder and decoder feature map and the deep heads within 1e-4 (max abs) of float64 PyTorch."""
    cfg = UNetConfig(upsample=upsample, conv_impl=conv_impl, **size)
    graphdef, state, reference = _pair(cfg)
    x, xt = _inputs(shape=(batch, 16, 16, 16, 4))
    out = nnx.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(x))
    with torch.no_grad():
        want = reference(xt)
    assert len(out["encoder"]) == len(want["encoder"]) == 4 and len(out["deep"]) == len(want["deep"]) == 2
    pairs = [("logits", out["logits"], want["logits"])]
    for key in ("encoder", "decoder", "deep"):
        assert len(out[key]) == len(want[key])
        pairs += [(f"{key}[{i}]", got, ref) for i, (got, ref) in enumerate(zip(out[key], want[key]))]
    for name, got, ref in pairs:
        ref = _channels_last(ref)
        assert got.shape == ref.shape, name
        assert np.abs(np.asarray(got, np.float64) - ref).max() <= 1e-4, name


def test_loss_gradients_match_pytorch():
    """Gradients of a region Dice + BCE loss over the logits and deep heads, for every parameter."""
    cfg = UNetConfig(upsample="trilinear", **SMALL)
    graphdef, state, reference = _pair(cfg)
    x, xt = _inputs(seed=1)
    target = (np.random.default_rng(2).random((2, 16, 16, 16, 3)) > 0.7).astype(np.float32)

    def numpy_free_loss(outputs, target, sigmoid, bce, mean):
        total = 0
        for logits in outputs:
            p = sigmoid(logits)
            dice = (2 * (p * target).sum() + 1e-5) / (p.sum() + target.sum() + 1e-5)
            total = total + (1 - dice) + mean(bce(logits, target))
        return total

    def jax_loss(params, rest):
        out = nnx.merge(graphdef, params, rest)(jnp.asarray(x))
        return numpy_free_loss(
            [out["logits"], *out["deep"]],
            jnp.asarray(target),
            jax.nn.sigmoid,
            lambda z, t: jnp.logaddexp(0, z) - z * t,
            jnp.mean,
        )

    params, rest = nnx.split_state(state, nnx.Param, ...)
    grads = jax.jit(jax.grad(jax_loss))(params, rest)

    out = reference(xt)
    tt = torch.from_numpy(target.transpose(0, 4, 1, 2, 3)).double()
    loss = numpy_free_loss(
        [out["logits"], *out["deep"]],
        tt,
        torch.sigmoid,
        lambda z, t: torch.nn.functional.binary_cross_entropy_with_logits(z, t, reduction="none"),
        torch.mean,
    )
    loss.backward()
    want = {name: p.grad for name, p in reference.named_parameters()}
    got = torch_state_dict(grads)  # the converter maps a gradient tree like a parameter tree
    assert set(got) == set(want)
    for name in want:
        g, w = got[name].double().numpy(), want[name].numpy()
        scale = max(np.abs(w).max(), 1e-3)
        assert np.abs(g - w).max() / scale <= 1e-3, name


def test_weights_round_trip_and_refuse_a_wrong_architecture():
    cfg = UNetConfig(**SMALL)
    _, state, _ = _pair(cfg)
    other = TorchUNet(cfg)  # fresh torch weights
    loaded = load_torch_weights(state, other.state_dict())
    back = torch_state_dict(loaded)
    for name, value in other.state_dict().items():
        np.testing.assert_array_equal(back[name].numpy(), value.numpy())
    wrong = TorchUNet(UNetConfig(**{**SMALL, "widths": (8, 16, 16, 32)})).state_dict()
    with pytest.raises(KeyError, match="shape"):
        load_torch_weights(state, wrong)
    partial = dict(other.state_dict())
    partial.pop("decoder.head.bias")
    with pytest.raises(KeyError, match="decoder.head.bias"):
        load_torch_weights(state, partial)
