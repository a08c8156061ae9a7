"""The end of a training run (rank 0): the diagnosis stage on the best checkpoint (note pre-training,
score-head refit, measurement term, stacking: train/diagnosis.py), the temperature fitted on the
validation split (train/temperature.py), the model package written (medfusion/package), its domain
guard fitted (train/domain.py) and OUT/summary.json."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfusion.infer.windowed import default_sw_batch_size
from medfusion.io.atomic import atomic_path, write_json
from medfusion.measure.features import grid_spacing_zyx, lesion_features
from medfusion.models.network import MedFusionNet
from medfusion.package import save_package
from medfusion.train.batches import in_layout
from medfusion.train.checkpoint import load_weights
from medfusion.train.config import TrainConfig
from medfusion.train.diagnosis import (
    fit_measure_model,
    fit_score_head,
    mean_brier,
    pretrain_note_head,
    read_note_corpus,
    stack_logits,
    training_heads,
)
from medfusion.train.distributed import rank
from medfusion.train.temperature import fit_temperature
from medfusion.train.validate import ARRAYS, score_metrics, sigmoid, validate


def diagnosis_stage(
    model: MedFusionNet,
    train: list[dict[str, Any]],
    val: list[dict[str, Any]],
    cfg: TrainConfig,
    *,
    device: torch.device,
    out: Path,
    log: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Note pre-training, score-head refit, measurement term and stacking (train/diagnosis.py) as
    `cfg.diagnosis` configures them, then the final validation metrics with the resulting logits.

    Args:
        model: the network with the best checkpoint's weights, on `device` (changed in place).
        train, val: cached cases as `Trainer.prepare` gives them.
        cfg: the run's settings.
        device: the training device.
        out: the run's folder; rank 0 writes OUT/diagnosis_inputs.npz there when a step ran.
        log: called with one record per stage step.

    Returns:
        `validate`'s dict for `val` with "logits" (n, n_scores, before the temperature), "auroc" and
        "brier" recomputed after a refit or stacking, "calibration_logits" (out-of-fold stacked
        logits, NaN where not computed) when stacked, and "stage": each step's record.
    """
    d = cfg.diagnosis
    stage: dict[str, Any] = {}
    if d.note_epochs > 0 and d.note_corpus:
        notes, y = read_note_corpus(d.note_corpus, cfg.score_names)
        a = cfg.augment
        stage["note"] = pretrain_note_head(
            model,
            notes,
            y,
            d,
            shuffle=a.sentence_shuffle,
            drop=a.sentence_drop,
            seed=cfg.seed,
            log=log,
        )
    final = validate(model, val, cfg, device)
    model.eval()  # validate() leaves the model training: no dropout in what is fitted below
    y_val = np.stack([v["scores"] for v in val])
    inputs = {"val_heads": final["heads"], "val_note_logits": final["note_logits"], "val_y": y_val}
    if d.head_epochs > 0:
        fitted = training_heads(
            model,
            train,
            cfg.crop_size,
            d.head_windows,
            d.head_jitter,
            cfg.seed,
            lambda x: in_layout(x, cfg.channels_last),
        )
        inputs.update(train_heads=fitted[0], train_note_logits=fitted[1], train_y=fitted[2])
        stage["head"] = fit_score_head(
            model, fitted, (final["heads"], final["note_logits"], y_val), d, cfg.seed, log
        )
    if d.measures:
        spacing_zyx = grid_spacing_zyx(cfg.preprocess.target_spacing_mm)
        feats = np.array([lesion_features(r["target"], spacing_zyx, cfg.class_names) for r in train])
        with torch.inference_mode():
            notes_tr = np.concatenate([model.note_logits([r["note"]]).float().cpu().numpy() for r in train])
        y_tr = np.stack([r["scores"] for r in train])
        stage["measures"] = fit_measure_model(model, feats, notes_tr, y_tr, d.measures_c)
        log({"stage": "measures", **stage["measures"]})
        inputs.update(
            train_measures=feats,
            train_note_logits_all=notes_tr,
            train_y_all=y_tr,
            val_measures=final["measures"],
        )
    if d.stack:
        stage["stack"] = stack_logits(
            model,
            final["heads"],
            final["note_logits"],
            y_val,
            d.stack_c,
            final.get("measures"),
            stage.get("measures"),
            d.temperature_folds,
        )
        final["calibration_logits"] = stage["stack"].pop("out_of_fold_logits")  # NaN: not computed
        log({"stage": "stack", **stage["stack"]})
    if d.head_epochs > 0 or d.stack:
        with torch.no_grad():
            meas = final.get("measures")
            z = model.score_logits(
                torch.from_numpy(final["heads"]).to(device),
                torch.from_numpy(final["note_logits"]).to(device),
                None if meas is None else torch.from_numpy(meas).to(device),
            )
        final["logits"] = z.cpu().numpy()
        final.update(score_metrics(final["logits"], y_val))
    if rank() == 0 and stage:
        # the stage's inputs, to study other ways of combining them without re-running inference
        with atomic_path(out / "diagnosis_inputs.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **inputs)
    final["stage"] = stage
    return final


def package(
    model: MedFusionNet,
    train: list[dict[str, Any]],
    val: list[dict[str, Any]],
    cfg: TrainConfig,
    *,
    device: torch.device,
    out: Path,
    log: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Package the best checkpoint (rank 0): load OUT/best.safetensors into `model`, run the diagnosis
    stage, fit the temperature on the validation split, write OUT/package (and its domain guard when
    `cfg.domain.fit`) and OUT/summary.json.

    Args:
        model, train, val, cfg, device, out, log: as for `diagnosis_stage`.

    Returns:
        The summary: {"validation": metrics ("dice" per foreground class, "auroc", "brier" after the
        temperature), "temperature": one per score in [0.25, 8], "package": its folder}.

    Raises:
        RuntimeError: OUT/best.safetensors does not fit the network (`load_weights`).
    """
    load_weights(model, out / "best.safetensors")
    final = diagnosis_stage(model, train, val, cfg, device=device, out=out, log=log)
    # out of fold where the stacking made them (in-sample stacked logits are over-confident);
    # in-sample for a score without them (temperature_folds 0, or too few cases of a class)
    cal = final.get("calibration_logits")
    cal = final["logits"] if cal is None else np.where(np.isnan(cal), final["logits"], cal)
    y_val = np.stack([v["scores"] for v in val])
    # `final`'s logits are the network's own (before any temperature: an `init_from` source's
    # would otherwise divide them twice), so this is the package's temperature itself
    temps = fit_temperature(cal, y_val)
    model.temperature.copy_(torch.from_numpy(temps))
    # temperature changes neither the segmentation nor the ranking: only the Brier score moves
    p_cal = sigmoid(final["logits"] / temps)
    metrics_out = {k: v for k, v in final.items() if k not in (*ARRAYS, "stage")}
    metrics_out["brier"] = mean_brier(y_val, p_cal)
    save_package(
        model.cpu(),
        out / "package",
        cfg.preprocess,
        name=cfg.name,
        version=cfg.version,
        class_names=cfg.class_names,
        score_names=cfg.score_names,
        training={
            "config": cfg.model_dump(),
            "n_train": len(train),
            "n_val": len(val),
            "temperature": temps.tolist(),
            "diagnosis_stage": final.get("stage", {}),
        },
        metrics={"validation": metrics_out},
    )
    if cfg.domain.fit:
        from medfusion.train.domain import fit_training_domain

        fit_training_domain(
            model.to(device),
            out / "package",
            train,
            val,
            Path(cfg.data.patients),
            cfg.crop_size,
            val_probabilities=p_cal,
            val_labels=y_val,
            flag_rate=cfg.domain.flag_rate,
            max_ece=cfg.domain.max_ece,
            overlap=cfg.val_window_overlap,
            sw_batch_size=default_sw_batch_size(device),
        )
    summary = {
        "validation": metrics_out,
        "temperature": temps.tolist(),
        "package": str(out / "package"),
    }
    write_json(out / "summary.json", summary)
    return summary
