"""Validation during training, the way inference runs: each validation case through
`infer/windowed.forward_case` (crop-sized windows, the score from the lesion-centred window, no
test-time flips), scored by per-class Dice, mean AUROC and mean Brier score; and the checkpoint
selection score built from them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medfusion.evaluate.segmentation import dice
from medfusion.infer.windowed import default_sw_batch_size, forward_case
from medfusion.measure.features import grid_spacing_zyx, lesion_features
from medfusion.models.network import MedFusionNet
from medfusion.train.batches import in_layout, to_tensor
from medfusion.train.config import TrainConfig
from medfusion.train.diagnosis import mean_auroc, mean_brier

# validation outputs that are arrays (kept out of the logged metrics)
ARRAYS = ("logits", "heads", "note_logits", "measures", "calibration_logits")


def dice_per_class(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> list[float]:
    """`evaluate.segmentation.dice` (2|P∩R| / (|P| + |R|)) per foreground class 1 … n_classes − 1 of two
    label maps of the same shape, but NaN where both are empty (evaluate scores that 1, for a cohort
    report), so that the selection score's mean leaves such a class out rather than rewarding it."""
    out = []
    for k in range(1, n_classes):
        a, b = pred == k, ref == k
        out.append(dice(a, b) if a.any() or b.any() else float("nan"))
    return out


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function 1 / (1 + e^(−z)), elementwise: logits → probabilities in [0, 1]."""
    return 1 / (1 + np.exp(-z))


def score_metrics(lg: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """{"auroc": mean AUROC, "brier": mean Brier score} over the scores of logits `lg` (n_cases,
    n_scores) for 0/1 outcomes `y` of the same shape (train/diagnosis.mean_auroc, mean_brier)."""
    return {"auroc": mean_auroc(y, lg), "brier": mean_brier(y, sigmoid(lg))}


def selection_score(metrics: dict[str, Any]) -> float:
    """The checkpoint selection score: mean Dice over foreground classes + mean AUROC (a NaN AUROC
    counts 0), in [0, 2]; higher is better."""
    return float(np.nanmean(metrics["dice"])) + float(np.nan_to_num(metrics["auroc"]))


@torch.inference_mode()
def validate(
    model: MedFusionNet, val: list[dict[str, Any]], cfg: TrainConfig, device: torch.device
) -> dict[str, Any]:
    """Validation the way inference runs: windows of `cfg.crop_size` overlapping by
    `cfg.val_window_overlap`, the score from the lesion-centred window (infer/windowed.py), no test-time
    flips.

    Args:
        model: the network, on `device`.
        val: cached cases as `Trainer.prepare` gives them ("ct", "mr", "has_mr", "note", "target",
            "scores").
        cfg: the run's settings (crop, overlap, classes, memory layout, model-grid spacing).
        device: where the cases are sent.

    Returns:
        "dice": mean Dice per foreground class (classes empty in both maps left out); "auroc",
        "brier": of the model's current probabilities, sigmoid(logit / temperature); and arrays
        (`ARRAYS`, n = len(val)): "logits" (n, n_scores) the network's score logits *before* the
        temperature, "heads" (n, D) score-head inputs, "note_logits" (n, n_scores), and with
        `network.measures` "measures" (n, F) the predicted label maps' lesion features.
        Leaves the model in training mode.
    """
    model.eval()
    spacing_zyx = grid_spacing_zyx(cfg.preprocess.target_spacing_mm)
    dices, logits, ys, heads_out, notes = [], [], [], [], []
    measures: list[np.ndarray] = []
    for r in val:
        ct = in_layout(to_tensor(r["ct"])[None].to(device), cfg.channels_last)
        mr = in_layout(to_tensor(r["mr"])[None].to(device), cfg.channels_last)
        has = torch.tensor([bool(r["has_mr"])], device=device)
        probs, heads = forward_case(
            model,
            ct,
            mr,
            has,
            r["note"],
            cfg.crop_size,
            [()],
            overlap=cfg.val_window_overlap,
            sw_batch_size=default_sw_batch_size(device),
        )
        pred = probs.argmax(1)[0].cpu().numpy()
        dices.append(dice_per_class(pred, r["target"], cfg.network.n_classes))
        note = model.note_logits([r["note"]]).float()
        meas = None
        if model.cfg.measures:
            feats = lesion_features(pred, spacing_zyx, cfg.class_names)
            measures.append(feats)
            meas = torch.from_numpy(feats)[None].to(device)
        logits.append(model.score_logits(heads[0], note, meas).float().cpu().numpy()[0])
        heads_out.append(heads[0].cpu().numpy()[0])
        notes.append(note.cpu().numpy()[0])
        ys.append(r["scores"])
    model.train()
    d = np.array(dices)
    lg, y = np.array(logits), np.array(ys)
    temperature = model.temperature.detach().float().cpu().numpy()
    return {
        "dice": [float(x) for x in np.nanmean(d, 0)],
        **score_metrics(lg / temperature, y),
        "logits": lg,
        "heads": np.array(heads_out, np.float32),
        "note_logits": np.array(notes, np.float32),
        **({"measures": np.array(measures, np.float32)} if measures else {}),
    }
