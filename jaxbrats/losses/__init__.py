"""Losses, one module per family (MONAI-style: one file per family).

- `segmentation`: soft Dice, BCE and CE on region or label outputs, and the
  masked MSE of image reconstruction (every method's supervised term);
- `relation`: RIRN's relational distillation, class-relative (CRR, eqs. 2-5)
  and class-agnostic (CAR, eqs. 6-7) relations between teacher and student;
- `adversarial`: RIRN's discriminator and student terms (eq. 8);
- `alignment`: Mind the Gap's anchors; `distillation`: the KD losses of its baselines;
- `consistency`: ACDIS's ACCT (windowed variance and covariance), its Table 2
  alternatives and the synthesis loss L_syn.

The segmentation names are re-exported here, so ``from jaxbrats.losses import
segmentation_loss`` keeps working; the other families are imported by module,
e.g. ``from jaxbrats.losses.relation import crr_loss``.
"""

from jaxbrats.losses import adversarial, relation, segmentation
from jaxbrats.losses.segmentation import SMOOTH, label_loss, masked_mse, region_loss, segmentation_loss, soft_dice_loss

__all__ = [
    "SMOOTH",
    "adversarial",
    "label_loss",
    "masked_mse",
    "region_loss",
    "relation",
    "segmentation",
    "segmentation_loss",
    "soft_dice_loss",
]
