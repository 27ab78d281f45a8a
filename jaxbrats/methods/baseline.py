"""The catch-all baseline: one U-Net trained with modality dropout, missing inputs zero-filled.

Every method is compared against it. Each training sample keeps a random
non-empty subset of its modalities (uniform over the 15 subsets by default,
or M3AE's drop-k), the dropped channels are set to 0, and the U-Net is
trained with the segmentation loss; at inference the missing modalities are
zeros as well. Decoding (`eval.decoding = "auto"`): sigmoid regions
thresholded, a softmax over labels (`output = "labels"`) by its argmax.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from jaxbrats.config import check_entries
from jaxbrats.errors import ConfigError
from jaxbrats.labels import NUM_LABELS, REGIONS
from jaxbrats.losses import segmentation_loss
from jaxbrats.methods.base import Method, Update
from jaxbrats.modalities import drop_modalities
from jaxbrats.networks.factory import check_deep_supervision, probabilities, unet_config
from jaxbrats.networks.unet import UNet


@dataclasses.dataclass(frozen=True)
class BaselineOptions:
    output: str = "regions"  # "regions": sigmoid WT/TC/ET + Dice + BCE; "labels": softmax + CE + Dice
    dropout_mode: str = "uniform"  # uniform over the 15 subsets | drop_k (M3AE) | none
    deep_supervision: bool = False
    batch_dice: bool = False
    class_weights: tuple[float, ...] = ()  # "labels" output only: CE weight per internal label

    def validate(self, where: str) -> None:
        if self.output not in ("regions", "labels"):
            raise ConfigError(f"{where}.output must be 'regions' or 'labels', got {self.output!r}")
        if self.dropout_mode not in ("uniform", "drop_k", "none"):
            raise ConfigError(f"{where}.dropout_mode must be uniform, drop_k or none, got {self.dropout_mode!r}")
        if self.class_weights and len(self.class_weights) != NUM_LABELS:
            raise ConfigError(f"{where}.class_weights needs {NUM_LABELS} values, got {list(self.class_weights)}")
        check_entries(f"{where}.class_weights", self.class_weights, 0)


class Baseline(Method):
    name = "baseline"
    Options = BaselineOptions
    stages = ("train",)

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        if cls.parse_options(config).deep_supervision:
            check_deep_supervision(config, "method.deep_supervision = true")

    @property
    def decoding(self) -> str:
        """A softmax network's labels are the argmax of its softmax; sigmoid regions are thresholded."""
        return "argmax" if self.options.output == "labels" else "threshold"

    def out_channels(self) -> int:
        return len(REGIONS) if self.options.output == "regions" else NUM_LABELS

    def init_models(self, stage, rngs):
        return {"unet": UNet(unet_config(self.config, self.out_channels(), self.options.deep_supervision), rngs)}

    def pipeline(self, stage):
        return {"dropout": self.options.dropout_mode, "instantiations": 1}

    def seg_loss(self, out: dict, batch: dict):
        opts = {"batch_dice": self.options.batch_dice}
        if self.options.output == "labels" and self.options.class_weights:
            opts["class_weights"] = self.options.class_weights
        loss, parts = segmentation_loss(self.options.output, out["logits"], batch["label"], batch["valid"], **opts)
        for deep in out["deep"]:  # deep supervision: unweighted sum (M3AE)
            loss = loss + segmentation_loss(self.options.output, deep, batch["label"], batch["valid"], **opts)[0]
        return loss, parts

    def loss(self, models, batch, key, context=None):
        image = drop_modalities(batch["image"], batch["modality_mask"][:, 0])
        out = models["unet"](image, dropout_key=key)
        return self.seg_loss(out, batch)

    def updates(self, stage):
        return [Update(group="model", trainable={"unet": nnx.Param}, loss=self.loss)]

    def predict(self, models, image, modality_mask, subset=None):
        logits = models["unet"](drop_modalities(image, modality_mask))["logits"]
        return probabilities(self.options.output, logits)
