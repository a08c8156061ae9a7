"""The segmentation loss of training: MONAI's Dice + cross-entropy, or a Dice over only the classes the
reference holds (`TrainConfig.dice_present_only`), optionally with a false-positive term on crops
without foreground (`TrainConfig.empty_topk_weight`). The diagnosis loss is torch's BCE-with-logits and
needs no code of its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss

from medfusion.train.config import TrainConfig


class PresentDiceCELoss(torch.nn.Module):
    """Soft Dice over the foreground classes present in the reference, plus (weighted) cross-entropy.

    Plain batch Dice charges a class absent from the batch for every probability it gets; for a class
    present in few crops (calcification: ≈ 20 voxels in 1 crop of 5) that drives its logit to −∞
    everywhere before the network can localise it. Here an absent class is left to the cross-entropy.
    With every class present it equals MONAI's `DiceCELoss` (softmax, one-hot reference, background
    excluded from the Dice; Milletari et al. 2016's soft Dice, 1 − 2|P·G| / (|P| + |G|)).

    Args:
        batch: one Dice per class over the whole batch (a class counts when any crop holds it), else per
            crop (a class counts in the crops that hold it).
        smooth: added to the Dice's numerator and denominator, > 0.
        weight: cross-entropy weight per class, shape (n_classes,), or None for equal weights.

    Call: `loss(logits, label)` with logits (B, K, z, y, x) float and label (B, 1, z, y, x) holding class
    codes 0 … K − 1; returns a scalar tensor (mean Dice loss over present classes, in [0, 1], plus the
    mean cross-entropy, nats).
    """

    def __init__(self, batch: bool, smooth: float, weight: torch.Tensor | None) -> None:
        super().__init__()
        self.batch = batch
        self.dice = DiceLoss(
            to_onehot_y=True,
            softmax=True,
            include_background=False,
            batch=batch,
            smooth_nr=smooth,
            smooth_dr=smooth,
            reduction="none",
        )
        self.weight = weight

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The loss of one batch; see the class docstring for shapes."""
        k = logits.shape[1]
        per_class = self.dice(logits, label).reshape(-1 if self.batch else logits.shape[0], k - 1)
        ref = label[:, 0]
        # (crops, classes): which foreground classes each crop's reference holds
        present = torch.stack([(ref == c).flatten(1).any(1) for c in range(1, k)], 1)
        if self.batch:
            present = present.any(0, keepdim=True)
        pres = present.to(per_class.dtype)
        dice = (per_class * pres).sum() / pres.sum().clamp(min=1.0)
        ce = F.cross_entropy(logits, ref.long(), weight=self.weight)
        return dice + ce


class EmptyCropTopK(torch.nn.Module):
    """A segmentation loss plus a false-positive term on the crops whose reference is all background.

    On such a crop the term is the mean cross-entropy −log(p_background) of its `k` voxels with the
    lowest background probability — the top-k ("bootstrapped") cross-entropy of Wu, Shen & van den
    Hengel (2016), applied where the reference says there is nothing to find. A lesion-like normal
    structure of a few dozen voxels is thus charged in full instead of being averaged over the crop,
    which is what a lesion-level false positive is made of. Crops with any foreground are left to `base`.

    Args:
        base: the segmentation loss (called as `base(logits, label)`).
        weight: the term's weight, ≥ 0.
        k: voxels read per empty crop, ≥ 1 (all of them when the crop is smaller).

    Call: `loss(logits, label)`, shapes as `PresentDiceCELoss`; returns a scalar tensor: `base`'s value
    plus `weight` × the mean of the term over the batch's empty crops (nats; 0 without one).
    """

    def __init__(self, base: torch.nn.Module, weight: float, k: int) -> None:
        super().__init__()
        self.base, self.weight, self.k = base, weight, k

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The loss of one batch; see the class docstring for shapes."""
        loss = self.base(logits, label)
        empty = ~(label[:, 0] > 0).flatten(1).any(1)
        if self.weight <= 0 or not bool(empty.any()):
            return loss
        log_bg = F.log_softmax(logits[empty].float(), dim=1)[:, 0].flatten(1)  # (empty crops, voxels)
        worst = torch.topk(-log_bg, min(self.k, log_bg.shape[1]), dim=1).values
        return loss + self.weight * worst.mean()


def segmentation_loss(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The segmentation loss a training config asks for: `PresentDiceCELoss` with `dice_present_only`,
    else MONAI's `DiceCELoss`; both softmax over (B, K, z, y, x) logits against (B, 1, z, y, x) class
    codes, background left out of the Dice, with `dice_batch`, `dice_smooth` and `ce_class_weights`
    (moved to `device`); wrapped in `EmptyCropTopK` when `empty_topk_weight` > 0."""
    base = _base_loss(cfg, device)
    if cfg.empty_topk_weight > 0:
        return EmptyCropTopK(base, cfg.empty_topk_weight, cfg.empty_topk_voxels)
    return base


def _base_loss(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    weight = torch.tensor(cfg.ce_class_weights, device=device) if cfg.ce_class_weights else None
    if cfg.dice_present_only:
        return PresentDiceCELoss(cfg.dice_batch, cfg.dice_smooth, weight)
    return DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        include_background=False,
        batch=cfg.dice_batch,
        smooth_nr=cfg.dice_smooth,
        smooth_dr=cfg.dice_smooth,
        weight=weight,
    )
