"""The diagnosis stage that follows segmentation training: the note path pre-trained on a notes-only
corpus, then the score head refitted on frozen image features.

Why: a note encoder trained from scratch on a few hundred image-labelled cases, through a noisy binary
label, learns little of the note (0.2.0: a logistic probe on its note vector reached AUROC 0.63 on the
test cohort against the note-only oracle's 0.74). Reports with a diagnosis are far more plentiful than
segmented scans — in a hospital as in the generator — so the late-fusion note head (`NetConfig.note_head`)
is trained on such a corpus first. The score head is then refitted with the image trunk frozen: its
inputs for the training cases come from windows centred on the labelled lesion (jittered; the volume's
centre when there is none), which is where inference centres its window on the predicted lesion.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import brier_score_loss, roc_auc_score

from medfusion.infer.windowed import centred_window
from medfusion.io.errors import InputError
from medfusion.measure.features import FEATURES as MEASURE_FEATURES
from medfusion.models.network import MedFusionNet
from medfusion.train.batches import note_augment, to_tensor
from medfusion.train.config import DiagnosisConfig


def read_note_corpus(path: str | Path, score_names: list[str]) -> tuple[list[str], np.ndarray]:
    """Notes and their labels from a corpus CSV with a 'note' column and one 0/1 column per score.

    Returns:
        (N notes, float32 (N, S) labels in `score_names` order).

    Raises:
        InputError: the file cannot be read, is empty, or lacks the 'note' or a score column.
        ValueError: a label cell is not a number.
    """
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise InputError(path, f"cannot read the note corpus ({exc.strerror})") from exc
    missing = [c for c in ("note", *score_names) if rows and c not in rows[0]]
    if not rows or missing:
        raise InputError(
            path, f"a note corpus needs rows with columns 'note' and {score_names} (missing {missing})"
        )
    y = np.array([[float(r[s]) for s in score_names] for r in rows], np.float32)
    return [r["note"] for r in rows], y


def mean_auroc(y: np.ndarray, z: np.ndarray) -> float:
    """AUROC (scikit-learn's `roc_auc_score`) averaged over scores.

    Args:
        y: (n_cases, n_scores) 0/1 outcomes.
        z: (n_cases, n_scores) scores that rise with the outcome (logits or probabilities).

    Returns:
        The mean AUROC in [0, 1]; NaN when a score has one class only.
    """
    try:
        return float(np.mean([roc_auc_score(y[:, s], z[:, s]) for s in range(y.shape[1])]))
    except ValueError:
        return float("nan")


def mean_brier(y: np.ndarray, p: np.ndarray) -> float:
    """Brier score (Brier 1950; scikit-learn's `brier_score_loss`: mean squared difference between the
    probability and the 0/1 outcome) averaged over scores.

    Args:
        y: (n_cases, n_scores) 0/1 outcomes.
        p: (n_cases, n_scores) probabilities in [0, 1].

    Returns:
        The mean Brier score in [0, 1] (0 is perfect; 0.25 is a constant 0.5).
    """
    return float(np.mean([brier_score_loss(y[:, s], p[:, s]) for s in range(y.shape[1])]))


def pretrain_note_head(
    model: MedFusionNet,
    notes: list[str],
    y: np.ndarray,
    cfg: DiagnosisConfig,
    *,
    shuffle: bool,
    drop: float,
    seed: int,
    log: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Train the note encoder and logit of `model.note_text` on the corpus alone (BCE); keeps the epoch
    with the best held-out AUROC.

    Args:
        model: a network with `network.note_head`; its note encoder and note logit are trained in place.
        notes: the corpus's notes.
        y: (len(notes), n_scores) 0/1 labels.
        cfg: epochs, batch, learning rate and the held-out share (`note_val_fraction`).
        shuffle, drop: note augmentation (`train.batches.note_augment`).
        seed: the split, the order and the augmentation's draws.
        log: receives one record per epoch.

    Returns:
        {"n_train", "n_val": corpus sizes, "val_auroc": the best held-out AUROC (NaN with no epoch)}.

    Raises:
        ValueError: the network has no note head.
    """
    if model.note_text is None:
        msg = "note pre-training needs network.note_head: true"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(notes))
    n_val = max(1, int(round(len(notes) * cfg.note_val_fraction)))
    val_idx, tr_idx = order[:n_val], order[n_val:]
    params = [*model.note_text.parameters(), *model.note_logit.parameters()]
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=cfg.note_lr, weight_decay=1e-4)
    bce = torch.nn.BCEWithLogitsLoss()
    dev = model.device
    yt = torch.from_numpy(y).to(dev)

    def logits(idx: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(idx), 256):
                chunk = [notes[j] for j in idx[i : i + 256]]
                out.append(model.note_logits(chunk).float().cpu().numpy())
        return np.concatenate(out)

    best: tuple[float, dict[str, torch.Tensor]] | None = None
    for epoch in range(cfg.note_epochs):
        model.note_text.train()
        losses = []
        perm = rng.permutation(tr_idx)
        for i in range(0, len(perm), cfg.note_batch):
            idx = perm[i : i + cfg.note_batch]
            batch = [note_augment(notes[j], rng, shuffle=shuffle, drop=drop) for j in idx]
            z = model.note_logits(batch)
            loss = bce(z.float(), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.note_text.eval()
        auroc = mean_auroc(y[val_idx], logits(val_idx))
        rec = {"stage": "note", "epoch": epoch, "loss": float(np.mean(losses)), "val_auroc": auroc}
        log(rec)
        if best is None or auroc > best[0]:
            state = {**model.note_text.state_dict(), **model.note_logit.state_dict()}
            best = (auroc, {k: v.detach().clone() for k, v in state.items()})
    if best is not None:
        enc_keys = set(model.note_text.state_dict())
        model.note_text.load_state_dict({k: v for k, v in best[1].items() if k in enc_keys})
        model.note_logit.load_state_dict({k: v for k, v in best[1].items() if k not in enc_keys})
    return {"n_train": len(tr_idx), "n_val": n_val, "val_auroc": best[0] if best else float("nan")}


@torch.inference_mode()
def training_heads(
    model: MedFusionNet,
    recs: list[dict[str, Any]],
    roi: list[int],
    windows: int,
    jitter: int,
    seed: int,
    layout: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score-head inputs (N·windows, D), note logits and labels for the training cases, from windows
    centred on the labelled lesion's centre of mass (or the volume's centre) moved by up to `jitter`."""
    rng = np.random.default_rng(seed)
    model.eval()
    dev = model.device
    heads, notes, ys = [], [], []
    for r in recs:
        target = r["target"]
        fg = np.argwhere(target > 0)
        centre = fg.mean(0) if len(fg) else (np.array(target.shape) - 1) / 2.0
        note = model.note_logits([r["note"]]).float().cpu().numpy()[0]
        has = torch.tensor([bool(r["has_mr"])], device=dev)
        for _ in range(windows):
            win = centred_window(target.shape, list(centre + rng.uniform(-jitter, jitter, 3)), roi)
            ct = layout(to_tensor(r["ct"][(slice(None), *win)])[None].to(dev))
            mr = layout(to_tensor(r["mr"][(slice(None), *win)])[None].to(dev))
            _, head_in = model.encode(ct, mr, has, [r["note"]])
            heads.append(head_in.float().cpu().numpy()[0])
            notes.append(note)
            ys.append(r["scores"])
    return np.array(heads), np.array(notes), np.array(ys, np.float32)


def fit_score_head(
    model: MedFusionNet,
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray, np.ndarray],
    cfg: DiagnosisConfig,
    seed: int,
    log: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Refit the score head (and the note logit's gain) on fixed inputs; keeps the epoch with the lowest
    validation log-loss. Each tuple is (score-head inputs (N, D), note logits (N, S), 0/1 labels (N, S)),
    as `training_heads` and validation give them. Returns the stage's record {"best_epoch" (−1: the
    starting weights), "val_loss", "val_auroc", "n_inputs"}; each epoch's record also goes to `log`."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev = model.device
    h_tr, n_tr, y_tr = (torch.from_numpy(a).float().to(dev) for a in train)
    h_va, n_va, y_va = (torch.from_numpy(a).float().to(dev) for a in val)
    params = list(model.score_head.parameters())
    if model.note_text is not None:
        params.append(model.note_scale)
    opt = torch.optim.AdamW(params, lr=cfg.head_lr, weight_decay=1e-3)
    bce = torch.nn.BCEWithLogitsLoss()

    def val_loss() -> tuple[float, float]:
        model.score_head.eval()
        with torch.no_grad():
            z = model.score_logits(h_va, n_va)
            loss = float(bce(z, y_va))
        return loss, mean_auroc(y_va.cpu().numpy(), z.cpu().numpy())

    def snapshot() -> dict[str, torch.Tensor]:
        state = {f"score_head.{k}": v for k, v in model.score_head.state_dict().items()}
        if model.note_text is not None:
            state["note_scale"] = model.note_scale
        return {k: v.detach().clone() for k, v in state.items()}

    best_loss, best_auroc = val_loss()
    best_state, best_epoch = snapshot(), -1
    log({"stage": "head", "epoch": -1, "val_loss": best_loss, "val_auroc": best_auroc})
    for epoch in range(cfg.head_epochs):
        model.score_head.train()
        perm = rng.permutation(len(h_tr))
        for i in range(0, len(perm), cfg.head_batch):
            idx = torch.from_numpy(perm[i : i + cfg.head_batch]).to(dev)
            loss = bce(model.score_logits(h_tr[idx], n_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        vl, va = val_loss()
        log({"stage": "head", "epoch": epoch, "val_loss": vl, "val_auroc": va})
        if vl < best_loss:
            best_loss, best_auroc, best_epoch, best_state = vl, va, epoch, snapshot()
    model.load_state_dict(best_state, strict=False)
    model.score_head.eval()
    return {"best_epoch": best_epoch, "val_loss": best_loss, "val_auroc": best_auroc, "n_inputs": len(h_tr)}


def nonnegative_logistic(x: np.ndarray, y: np.ndarray, c: float) -> tuple[list[float], float]:
    """L2 logistic regression whose coefficients are kept ≥ 0: a column whose fitted weight is negative
    is dropped (weight 0) and the rest refitted. Each column is a logit trained to rise with the label,
    so a negative weight is what a few validation cases say by chance — stacking with a sign flip
    turned a weak image-only model into test AUROC 0.31 (non-negative stacking as in Breiman, "Stacked
    regressions", Machine Learning 24, 1996)."""
    from sklearn.linear_model import LogisticRegression

    keep = list(range(x.shape[1]))
    while keep:
        lr = LogisticRegression(C=c, max_iter=1000).fit(x[:, keep], y)
        w = lr.coef_[0]
        if (w >= 0).all():
            coef = [0.0] * x.shape[1]
            for j, v in zip(keep, w, strict=True):
                coef[j] = float(v)
            return coef, float(lr.intercept_[0])
        keep.pop(int(np.argmin(w)))
    rate = float(np.clip(np.mean(y), 1e-6, 1 - 1e-6))
    return [0.0] * x.shape[1], float(np.log(rate / (1 - rate)))


def fit_measure_model(
    model: MedFusionNet, features: np.ndarray, note_logits: np.ndarray, y: np.ndarray, c: float
) -> dict[str, Any]:
    """Fit the measurement model of a `network.measures` network on training cases: per score, an L2
    logistic regression of the label on (note logit, standardised `features` of the reference label
    maps). The features' coefficients are stored (`measure_coef`, with the standardisation, gain 1);
    the note's coefficient and the intercept are returned (`note_coef`, `intercept`) for the stacking,
    which weighs this whole model (note included) against the image-side logit.

    The note logit is in the regression so that the features' weights are those given the note: the
    note head was trained on a separate corpus, so on these cases it is out of sample; the reference
    label maps stand for what a good segmentation measures (the trunk has seen these cases, its own
    predictions on them would be better than on new ones).

    Args:
        features: (N, F) `measure.features.FEATURES` of the training cases' reference label maps.
        note_logits, y: (N, S) the note head's logits and 0/1 labels.
        c: inverse L2 strength (scikit-learn's `C`).

    Raises:
        ValueError: the network has no measurement term (`network.measures` false).
    """
    from sklearn.linear_model import LogisticRegression

    if not model.cfg.measures:
        msg = "the measurement term needs network.measures: true"
        raise ValueError(msg)
    mean = features.mean(0)
    std = features.std(0)
    std[std < 1e-6] = 1.0  # a constant feature (e.g. one lesion in every case) gets weight 0 anyway
    z = (features - mean) / std
    coefs, note_coef, intercept, auroc = [], [], [], []
    for k in range(y.shape[1]):
        if len(np.unique(y[:, k])) < 2:
            coefs.append(np.zeros(features.shape[1]))
            note_coef.append(1.0)
            intercept.append(0.0)
            auroc.append(float("nan"))
            continue
        x = np.concatenate([note_logits[:, k : k + 1], z], 1)
        lr = LogisticRegression(C=c, max_iter=2000).fit(x, y[:, k])
        coefs.append(lr.coef_[0][1:])
        note_coef.append(float(lr.coef_[0][0]))
        intercept.append(float(lr.intercept_[0]))
        auroc.append(float(roc_auc_score(y[:, k], lr.decision_function(x))))
    with torch.no_grad():
        model.measure_mean.copy_(torch.from_numpy(mean).float())
        model.measure_std.copy_(torch.from_numpy(std).float())
        model.measure_coef.copy_(torch.from_numpy(np.array(coefs)).float())
        model.measure_gain.fill_(1.0)
    return {
        "features": list(MEASURE_FEATURES),
        "coef": [[round(float(v), 4) for v in row] for row in coefs],
        "note_coef": note_coef,
        "intercept": intercept,
        "train_auroc": auroc,  # in sample
        "n_cases": len(y),
    }


def stack_logits(
    model: MedFusionNet,
    heads: np.ndarray,
    note_logits: np.ndarray,
    y: np.ndarray,
    c: float,
    measures: np.ndarray | None = None,
    measure_fit: dict[str, Any] | None = None,
    folds: int = 0,
) -> dict[str, Any]:
    """Fit `head_gain`, `note_scale` and `head_bias` per score by an L2 logistic regression of the labels on
    (image-side logit, note logit) over the given (validation) cases, gains kept ≥ 0.

    With `measures` (the cases' predicted label maps' features) and `measure_fit` (what
    `fit_measure_model` returned), the second column is instead the whole measurement model's logit
    (note coefficient × note logit + measurement logit + intercept, fitted on the training cases): two
    gains and a bias from the validation split, the note-to-measurement balance from the larger
    training split. Its gain g is unfolded into `measure_gain` = g, `note_scale` = g × note
    coefficient and the bias.

    `out_of_fold_logits` (N, S) in the result: with `folds` ≥ 2, each case's stacked logit from the
    regression refitted without its fold (for an honest temperature); NaN where not computed.

    Args:
        heads: (N, D) score-head inputs; note_logits, y: (N, S) note logits and 0/1 labels.

    Raises:
        ValueError: the network has no note head (`network.note_head` false).
    """
    if model.note_text is None:
        msg = "stacking needs network.note_head: true"
        raise ValueError(msg)
    dev = model.device
    with torch.no_grad():
        s = model.score_head(torch.from_numpy(heads).to(dev)).float().cpu().numpy()
        m = (
            model.measure_logits(torch.from_numpy(measures).to(dev)).float().cpu().numpy()
            if measures is not None and model.cfg.measures and measure_fit is not None
            else None
        )
    gains, scales, biases, mgains = [], [], [], []
    skipped = []
    oof = np.full(y.shape, np.nan)  # out-of-fold stacked logits, for the temperature (NaN: none)
    for k in range(y.shape[1]):
        if len(np.unique(y[:, k])) < 2:  # one class only: nothing to fit, the gains stay as they are
            gains.append(float(model.head_gain[k].detach()))
            scales.append(float(model.note_scale[k].detach()))
            biases.append(float(model.head_bias[k].detach()))
            mgains.append(float(model.measure_gain[k].detach()) if m is not None else 0.0)
            skipped.append(k)
            continue
        if m is None:
            cols = np.stack([s[:, k], note_logits[:, k]], 1)
            coef, bias = nonnegative_logistic(cols, y[:, k], c)
            gains.append(coef[0])
            scales.append(coef[1])
            mgains.append(0.0)
            biases.append(bias)
        else:
            assert measure_fit is not None  # m is only set with it
            note_coef, icpt = measure_fit["note_coef"][k], measure_fit["intercept"][k]
            full = note_coef * note_logits[:, k] + m[:, k] + icpt
            cols = np.stack([s[:, k], full], 1)
            coef, bias = nonnegative_logistic(cols, y[:, k], c)
            gains.append(coef[0])
            scales.append(coef[1] * note_coef)
            mgains.append(coef[1])
            biases.append(bias + coef[1] * icpt)
        oof[:, k] = out_of_fold_logits(cols, y[:, k], c, folds)
    with torch.no_grad():
        model.head_gain.copy_(torch.tensor(gains))
        model.note_scale.copy_(torch.tensor(scales))
        model.head_bias.copy_(torch.tensor(biases))
        if m is not None:
            model.measure_gain.copy_(torch.tensor(mgains))
    return {
        "head_gain": [float(g) for g in gains],
        "note_scale": [float(v) for v in scales],
        "head_bias": [float(b) for b in biases],
        **({"measure_gain": [float(g) for g in mgains]} if m is not None else {}),
        "n_cases": len(y),
        "skipped_scores": skipped,
        "out_of_fold_logits": oof,  # an array: the caller takes it out before logging
    }


def out_of_fold_logits(x: np.ndarray, y: np.ndarray, c: float, folds: int) -> np.ndarray:
    """Each case's stacked logit from the non-negative regression fitted on the other folds (stratified,
    seeded); NaN everywhere when `folds` < 2 or a class has fewer cases than two folds need.

    Args:
        x: (N, P) the regression's inputs (e.g. image-side and note logits); y: (N,) 0/1 labels.
        c: inverse L2 strength; folds: the number of folds wanted (fewer when a class is small).

    Returns:
        float (N,) logits, NaN where not computed.
    """
    from sklearn.model_selection import StratifiedKFold

    out = np.full(len(y), np.nan)
    k = min(folds, int(np.bincount(y.astype(int), minlength=2).min()))
    if k < 2:
        return out
    for tr, te in StratifiedKFold(n_splits=k, shuffle=True, random_state=0).split(x, y):
        coef, bias = nonnegative_logistic(x[tr], y[tr], c)
        out[te] = x[te] @ np.asarray(coef) + bias
    return out
