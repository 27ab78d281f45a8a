"""The U-Net factory every method builds its networks with, and the output head's probabilities.

One place for "the shared backbone as `[model]` sets it": a method asks for
a U-Net with its number of outputs (and deep supervision) and gets the
widths, blocks, norm, upsampling, dropouts, dtype, convolution lowering
and remat of the run's config.
"""

from __future__ import annotations

import jax

from jaxbrats.errors import ConfigError
from jaxbrats.labels import region_probs_from_label_probs
from jaxbrats.networks.unet import DEEP_SUPERVISION_LEVELS, UNetConfig

OUTPUTS = ("regions", "labels")  # sigmoid WT/TC/ET channels, or softmax over the 4 internal labels


def unet_config(config, out_channels: int, deep_supervision: bool = False, in_channels: int = 4) -> UNetConfig:
    """The shared backbone as set in `[model]`."""
    m = config.model
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        widths=m.widths,
        blocks=m.blocks,
        groups=m.groups,
        upsample=m.upsample,
        deep_supervision=deep_supervision,
        dropout=m.dropout,
        stem_dropout=m.stem_dropout,
        dtype=m.dtype,
        conv_impl=m.conv_impl,
        remat=m.remat,
    )


def check_deep_supervision(config, why: str) -> None:
    """Deep supervision reads the 1/4 and 1/2 resolution decoder outputs: enough levels, or one line."""
    if len(config.model.widths) < DEEP_SUPERVISION_LEVELS:
        raise ConfigError(
            f"model.widths needs at least {DEEP_SUPERVISION_LEVELS} levels for deep supervision ({why}), "
            f"got {list(config.model.widths)}"
        )


def probabilities(output: str, logits):
    """Region probabilities (..., 3) from the network's logits of either output convention."""
    logits = logits.astype("float32")
    if output == "regions":
        return jax.nn.sigmoid(logits)
    return region_probs_from_label_probs(jax.nn.softmax(logits, axis=-1), xp=jax.numpy)
