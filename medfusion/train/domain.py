"""Fitting a model package's domain guard (models/domain.py) on in-domain cases.

Two callers: `medfusion train`, which fits it on its own training split with the validation split held
out, and `medfusion domain fit`, which fits it for an existing package (the shipped one included) on a
cohort of patient folders like those it was trained on.

The threshold is calibrated on distances the density did not see: the held-out cases' distances under
the density fitted on all fitting cases, together with the fitting cases' own out-of-fold distances
(5 folds). Its ``1 − flag_rate`` quantile flags ≈ `flag_rate` of in-domain cases.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfusion.models.domain import (
    DEFAULT_FLAG_RATE,
    MAX_SITUATION_ECE,
    MIN_DENSITY_CASES,
    DomainGuard,
    FeatureDensity,
    case_facts,
    out_of_fold_distances,
    situation,
    summarise_facts,
)
from medfusion.models.network import MedFusionNet, channels_last
from medfusion.package import save_domain_guard


def fit_densities(
    fit: dict[str, list[np.ndarray]], heldout: dict[str, list[np.ndarray]], flag_rate: float
) -> tuple[dict[str, FeatureDensity], dict[str, dict[str, Any]]]:
    """One density per situation with ≥ MIN_DENSITY_CASES fitting cases, its threshold calibrated (module docstring);
    and per situation the calibration record: {"n_fit", "n_calibration", "threshold", "heldout_flagged"}.

    `fit`, `heldout`: situation → feature vectors (D,)."""
    densities: dict[str, FeatureDensity] = {}
    report: dict[str, dict[str, Any]] = {}
    for sit, vecs in sorted(fit.items()):
        if len(vecs) < MIN_DENSITY_CASES:
            report[sit] = {"n_fit": len(vecs), "not_fitted": f"fewer than {MIN_DENSITY_CASES} cases"}
            continue
        x = np.stack(vecs)
        dens = FeatureDensity.fit(x)
        held = heldout.get(sit, [])
        d_held = dens.distance(np.stack(held)) if held else np.zeros(0)
        d_oof = out_of_fold_distances(x) if len(vecs) >= 4 else np.zeros(0)
        cal = np.concatenate([d_held, d_oof])
        if cal.size == 0:
            cal = dens.distance(x)  # nothing held out and too few for folds: in-sample, said so below
        dens.calibrate(cal, flag_rate)
        densities[sit] = dens
        report[sit] = {
            "n_fit": len(vecs),
            "n_heldout": len(held),
            "n_calibration": int(cal.size),
            "threshold": round(float(dens.threshold or 0.0), 4),
            "heldout_flagged": int((d_held > (dens.threshold or 0.0)).sum()),
            "in_sample_calibration": bool(d_held.size == 0 and d_oof.size == 0),
        }
    return densities, report


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error in [0, 1] of probabilities `p` (n,) for 0/1 outcomes `y` (n,), over
    `bins` equal-width bins (evaluate/diagnosis.ece: Naeini et al., AAAI 2015)."""
    from medfusion.evaluate.diagnosis import ece as _ece

    return _ece(np.asarray(y, float), np.asarray(p, float), bins)


# --- For an existing package: `medfusion domain fit` ---


def _case_features(
    folder: Path, predictor: Any, pipeline: Any, with_ct_only: bool
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Load, register and prepare one patient as `medfusion run` does; its facts and its encoder features
    per situation (the case's own, and with the MR left out when `with_ct_only`)."""
    from medfusion.infer.windowed import encoder_features
    from medfusion.io.case import load_case
    from medfusion.preprocess.prepare import prepare_case
    from medfusion.run.pipeline import run_preprocess_config

    case = load_case(folder)
    if case.ct is None:
        msg = f"{folder}: no usable CT volume"
        raise ValueError(msg)
    tensors = prepare_case(case, run_preprocess_config(pipeline, predictor.meta))
    mr_used = bool(tensors.has_mr and (tensors.registration is None or tensors.registration.passed))
    facts = case_facts(case, mr_used)
    dev = predictor.device
    ct = channels_last(torch.from_numpy(tensors.ct).float()[None].to(dev))
    mr = channels_last(torch.from_numpy(tensors.mr).float()[None].to(dev))
    feats: dict[str, np.ndarray] = {}
    variants = [mr_used] + ([False] if with_ct_only and mr_used else [])
    for has in variants:
        sit = situation(has, bool(case.note))
        feats[sit] = encoder_features(
            predictor.model,
            ct,
            mr,
            torch.tensor([has], device=dev),
            predictor.roi,
            predictor.window_overlap,
            predictor.sw_batch_size,
        )
    return facts, feats


def fit_package_domain(
    package: str | Path | None,
    fit_folders: Sequence[Path],
    heldout_folders: Sequence[Path] = (),
    *,
    flag_rate: float = DEFAULT_FLAG_RATE,
    calibration: dict[str, dict[str, Any]] | None = None,
    with_ct_only: bool = True,
    device: str = "cpu",
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, Any]:
    """Fit and store the domain guard of `package` (None: the shipped default) on the patient folders
    `fit_folders` (in-domain cases, e.g. its training cohort), calibrating thresholds with
    `heldout_folders` too. `calibration`: measured calibration per situation ({situation: {"n", "auroc",
    "ece", "source"}}) kept with any the package already records. Returns the `"domain"` block written
    into model.json. A folder that fails to load is skipped and listed.

    Raises:
        ValueError: no fitting folder could be read; what `Predictor` raises for `package`/`device`.
        PackageError: the package cannot be loaded.
    """
    from medfusion.config import PipelineConfig
    from medfusion.infer.predictor import Predictor

    predictor = Predictor(package, device, tta=False, mc_samples=0)
    pipeline = PipelineConfig()
    facts: list[dict[str, Any]] = []
    fit: dict[str, list[np.ndarray]] = {}
    held: dict[str, list[np.ndarray]] = {}
    skipped: list[str] = []
    for folders, into, keep_facts in ((fit_folders, fit, True), (heldout_folders, held, False)):
        for folder in folders:
            t0 = time.perf_counter()
            try:
                f, feats = _case_features(Path(folder), predictor, pipeline, with_ct_only)
            except Exception as exc:  # one bad folder never stops the fit; it is listed
                skipped.append(
                    f"{Path(folder).name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                )
                continue
            if keep_facts:
                facts.append(f)
            for sit, v in feats.items():
                into.setdefault(sit, []).append(v)
            if progress:
                progress(Path(folder).name, time.perf_counter() - t0)
    if not facts:
        msg = "no fitting case could be read"
        raise ValueError(msg)
    densities, report = fit_densities(fit, held, flag_rate)
    old = (predictor.guard.calibration if predictor.guard else {}) or {}
    guard = DomainGuard(
        summarise_facts(facts),
        densities,
        {**old, **(calibration or {})},
        flag_rate,
        {
            "by": "medfusion domain fit",
            "fit_cases": len(facts),
            "heldout_cases": sum(len(v) for v in held.values()) // max(1, len(held)),
            "thresholds": report,
            "skipped": skipped,
        },
    )
    return save_domain_guard(predictor.package, guard)


# --- At the end of `medfusion train` ---


@torch.inference_mode()
def fit_training_domain(
    model: MedFusionNet,
    package: Path,
    train: Sequence[dict[str, Any]],
    val: Sequence[dict[str, Any]],
    patients: Path,
    roi: list[int] | None,
    *,
    val_probabilities: np.ndarray,
    val_labels: np.ndarray,
    flag_rate: float = DEFAULT_FLAG_RATE,
    max_ece: float = MAX_SITUATION_ECE,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
) -> dict[str, Any]:
    """Fit the guard of a freshly written package on the training split (cached tensors: "ct", "mr",
    "has_mr", "note", "patient_id"; facts from the patient folders under `patients`), thresholds
    calibrated with the validation split, and the full-input calibration measured on the validation
    split (`val_probabilities`, `val_labels` of shape (n_val, S); ECE is the mean over scores)."""
    from medfusion.infer.windowed import encoder_features
    from medfusion.io.case import load_case

    model.eval()
    dev = model.device

    def feats(r: dict[str, Any]) -> tuple[str, np.ndarray]:
        ct = channels_last(torch.from_numpy(np.asarray(r["ct"], np.float32))[None].to(dev))
        mr = channels_last(torch.from_numpy(np.asarray(r["mr"], np.float32))[None].to(dev))
        has = bool(r["has_mr"])
        v = encoder_features(model, ct, mr, torch.tensor([has], device=dev), roi, overlap, sw_batch_size)
        return situation(has, bool(r.get("note"))), v

    fit: dict[str, list[np.ndarray]] = {}
    held: dict[str, list[np.ndarray]] = {}
    for recs, into in ((train, fit), (val, held)):
        for r in recs:
            sit, v = feats(r)
            into.setdefault(sit, []).append(v)
    facts = []
    for r in train:
        case = load_case(patients / r["patient_id"])
        if case.ct is not None:
            facts.append(case_facts(case, bool(r["has_mr"])))
    densities, report = fit_densities(fit, held, flag_rate)
    val_sits = [situation(bool(r["has_mr"]), bool(r.get("note"))) for r in val]
    calibration: dict[str, dict[str, Any]] = {}
    for sit in sorted(set(val_sits)):
        m = np.array([s == sit for s in val_sits])
        eces = [ece(val_labels[m, j], val_probabilities[m, j]) for j in range(val_labels.shape[1])]
        calibration[sit] = {
            "n": int(m.sum()),
            "ece": round(float(np.mean(eces)), 4),
            "source": "validation split of this training run",
        }
    guard = DomainGuard(
        summarise_facts(facts),
        densities,
        calibration,
        flag_rate,
        {"by": "medfusion train", "fit_cases": len(train), "heldout_cases": len(val), "thresholds": report},
        max_ece,
    )
    return save_domain_guard(package, guard)
