"""A PyTorch reference of the shared backbone, and weight conversion to and from the JAX one.

Optional: needs the ``torch`` extra (``pip install torch==2.13.0`` then
``pip install "jaxbrats[torch]"``). It exists for two jobs: checking that
`networks.unet.UNet` computes what the public PyTorch code computes
(tests/test_torch_parity.py), and timing the same model in both frameworks
(tools/bench_vs_torch.py).

The module mirrors the JAX attribute names, so one rule maps every parameter:
``...conv.kernel`` (D, H, W, I, O) <-> ``...conv.weight`` (O, I, D, H, W),
``...normK.norm.scale`` <-> ``...normK.weight``, biases unchanged. PyTorch
runs channels-first (N, C, D, H, W), as the public code does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

from jaxbrats.networks.unet import UNetConfig


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2)


class ResBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels, eps=1e-5)
        self.conv1 = _conv(channels, channels, 3)
        self.norm2 = nn.GroupNorm(groups, channels, eps=1e-5)
        self.conv2 = _conv(channels, channels, 3)

    def forward(self, x):
        y = self.conv1(F.relu(self.norm1(x)))
        y = self.conv2(F.relu(self.norm2(y)))
        return x + y


class Encoder(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        w = cfg.widths
        self.stem = _conv(cfg.in_channels, w[0], 3)
        self.downs = nn.ModuleList([_conv(w[i - 1], w[i], 3, stride=2) for i in range(1, len(w))])
        self.levels = nn.ModuleList(
            [nn.ModuleList([ResBlock(c, cfg.groups) for _ in range(n)]) for c, n in zip(w, cfg.blocks)]
        )

    def forward(self, x):
        x = self.stem(x)
        features = []
        for i, blocks in enumerate(self.levels):
            if i:
                x = self.downs[i - 1](x)
            for block in blocks:
                x = block(x)
            features.append(x)
        return features


class Decoder(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        w = cfg.widths
        levels = range(len(w) - 1, 0, -1)
        self.reduce = nn.ModuleList([_conv(w[i], w[i - 1], 1) for i in levels])
        self.blocks = nn.ModuleList([ResBlock(w[i - 1], cfg.groups) for i in levels])
        self.head = _conv(w[0], cfg.out_channels, 1)
        self.ds_heads = (
            nn.ModuleList([_conv(w[i], cfg.out_channels, 1) for i in (2, 1)]) if cfg.deep_supervision else None
        )
        self.mode = cfg.upsample

    def forward(self, features):
        x = features[-1]
        outputs = []
        for reduce, block, skip in zip(self.reduce, self.blocks, reversed(features[:-1])):
            x = block(F.interpolate(reduce(x), scale_factor=2, mode=self.mode) + skip)
            outputs.append(x)
        logits = self.head(x)
        deep = []
        if self.ds_heads is not None:
            for head, feature in zip(self.ds_heads, outputs[-3:-1]):
                deep.append(F.interpolate(head(feature), size=logits.shape[2:], mode="trilinear"))
        return logits, outputs, deep


class TorchUNet(nn.Module):
    """The backbone in PyTorch; `forward` returns the same dict as `UNet.__call__` (channels-first)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if cfg.dropout:
            raise ValueError("the PyTorch reference has no bottleneck dropout; compare with dropout = 0")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x):
        features = self.encoder(x)
        logits, decoded, deep = self.decoder(features)
        return {"logits": logits, "encoder": features, "decoder": decoded, "deep": deep}


# --- weight conversion -------------------------------------------------------


def _torch_name(jax_path: tuple) -> str:
    parts = [str(p) for p in jax_path]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    elif parts[-2:] == ["norm", "scale"]:
        parts[-2:] = ["weight"]
    elif parts[-2:] == ["norm", "bias"]:
        parts[-2:] = ["bias"]
    return ".".join(parts)


def _to_torch_layout(name: str, value: np.ndarray) -> np.ndarray:
    if name.endswith("weight") and value.ndim == 5:
        return value.transpose(4, 3, 0, 1, 2)  # DHWIO -> OIDHW
    return value


def _to_jax_layout(name: str, value: np.ndarray) -> np.ndarray:
    if name.endswith("weight") and value.ndim == 5:
        return value.transpose(2, 3, 4, 1, 0)  # OIDHW -> DHWIO
    return value


def _params(model_state) -> dict[tuple, object]:
    return dict(nnx.to_flat_state(nnx.filter_state(model_state, nnx.Param)))


def torch_state_dict(model_state) -> dict[str, torch.Tensor]:
    """A PyTorch state dict for `TorchUNet` from the `nnx.State` of a `UNet`."""
    out = {}
    for path, variable in _params(model_state).items():
        name = _torch_name(path)
        out[name] = torch.from_numpy(np.array(_to_torch_layout(name, np.asarray(variable[...]))))
    return out


def load_torch_weights(model_state, state_dict: dict[str, torch.Tensor]):
    """The `nnx.State` of a `UNet` with its parameters replaced by a `TorchUNet` state dict.

    Every parameter must be present with the right shape; a missing or extra
    name raises KeyError naming it, so a mismatched architecture never loads
    half a model.
    """
    params = _params(model_state)
    names = {_torch_name(path): path for path in params}
    extra = sorted(set(state_dict) - set(names))
    missing = sorted(set(names) - set(state_dict))
    if extra or missing:
        raise KeyError(f"weights do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    flat = dict(nnx.to_flat_state(model_state))
    for name, path in names.items():
        value = _to_jax_layout(name, state_dict[name].detach().cpu().float().numpy())
        old = flat[path]
        if value.shape != old[...].shape:
            raise KeyError(f"{name}: shape {value.shape} does not fit {old[...].shape}")
        flat[path] = old.replace(value=np.asarray(value, dtype=old[...].dtype))
    return nnx.from_flat_state(flat)
