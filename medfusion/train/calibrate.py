"""Re-calibration of a model package on a labelled cohort: `medfusion calibrate`.

A package's calibration is fitted on its own validation split; on another site's data (scanners,
case mix, another pipeline setting) its probabilities can drift while the ranking holds. This refits
it on the scores that `medfusion run` wrote for a labelled cohort and writes a new package that
differs from the old one only in the calibration tensors (and in `model.json`: the new weights hash,
the version and the record of the fit). Both methods are monotone: AUROC, the segmentation and every
other output stay as they were.

`scores.json` holds p = sigmoid(z / T) for the network's logit z and the package's temperature T, so
logit(p) = z / T is recovered exactly from the run. Methods:

- ``platt`` (Platt 1999; the default): p' = sigmoid(a · logit(p) + c), a logistic regression on the
  logit — a slope and an intercept, so it also moves the mean probability, which a temperature cannot.
  Stored exactly in the package as temperature T / a and the stacking bias (`head_bias`, packages with
  a note head) shifted by c · T / a.
- ``temperature`` (Guo et al. 2017): p' = sigmoid(logit(p) / t), the new temperature T · t.

The scores must come from this very package (its weights hash is checked), and the fit holds for runs
with the same pipeline settings (TTA, windows, registration), which the record copies from the run's
`run.json`. Measure the new package on a cohort other than the one it was fitted on.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import brier_score_loss, log_loss

from medfusion.evaluate.diagnosis import ece, logistic_on_logit
from medfusion.hashing import sha256_of
from medfusion.io.errors import InputError
from medfusion.io.labels_csv import labels_csv_path, read_labels_table
from medfusion.package import (
    DEFAULT_PACKAGE,
    PackageMeta,
    load_package,
    read_package_meta,
    write_package_meta,
)
from medfusion.run.result import CaseResult
from medfusion.train.temperature import fit_temperature

MIN_PER_CLASS = 10  # positives and negatives each: fewer cannot place a temperature


def calibration_summary(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """How well probabilities `p` fit outcomes `y` (both shape (n_cases,); y 0/1, p in [0, 1]).

    Returns:
        {"nll": log loss in nats (scikit-learn's `log_loss`), "brier": mean squared error of p
        (`brier_score_loss`), "ece": 10-bin expected calibration error (`evaluate.diagnosis.ece`)}.
    """
    return {
        "nll": float(log_loss(y, p, labels=[0, 1])),
        "brier": float(brier_score_loss(y, p)),
        "ece": ece(y, p),
    }


def _read_run(
    pred: Path, labels: Path, sha: str | None, src: Path
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, str]], list[str]]:
    """One run's probabilities per patient (`run.result.CaseResult.load_probabilities`: any scores.json
    with "probabilities", so runs older than today's contract still read) and its labels table (rows by
    patient id, column names).

    Raises:
        InputError: no labels CSV, no patient outputs, or a scores.json written by other weights than
            `sha` (the package's).
        ValueError: a scores.json that does not fit the output contract (names the file).
    """
    table, fields = read_labels_table(labels_csv_path(labels))
    runs = (
        sorted(p for p in Path(pred).iterdir() if (p / "scores.json").exists()) if Path(pred).is_dir() else []
    )
    if not runs:
        raise InputError(pred, "no patient outputs (OUT/<id>/scores.json) found")
    probs: dict[str, dict[str, float]] = {}
    for folder in runs:
        writer = CaseResult.load_model(folder)
        made_by = writer.weights_sha256 if writer is not None else None
        if made_by != sha:
            raise InputError(
                folder / "scores.json",
                f"written by weights {str(made_by)[:12]}…, not by the package being re-calibrated "
                f"({str(sha)[:12]}…, {src})",
            )
        probs[folder.name] = CaseResult.load_probabilities(folder)
    return probs, {r["patient_id"]: r for r in table}, fields


def recalibrate(
    pred: Path | list[Path],
    labels: Path | list[Path],
    out: Path,
    model: Path | None = None,
    method: Literal["platt", "temperature"] = "platt",
    version: str | None = None,
) -> dict[str, Any]:
    """Refit the calibration of `model` (default: the shipped package) on the run(s) `pred` against
    `labels` (one labels folder or CSV per run, or one for all), write the new package to `out` (which
    must not exist; version `version`, default the old one + "+recalibrated") and return the fit's
    record. Several runs are pooled: the intercept of a few hundred cases still carries the luck of
    their labels (± 0.03 in the base rate at 300), so more cases from more cohorts fit it better.

    Returns:
        The fit's record (also stored in the new package's `model.json` "recalibration"): per score
        name the cases, the slope/intercept or factor, temperature and bias before and after, and the
        in-sample NLL/Brier/ECE before and after; or {"kept": why} for a score without labels.

    Raises:
        InputError: `out` exists; a run or labels table is missing; scores from other weights; fewer
            than `MIN_PER_CLASS` cases of either class; a Platt slope ≤ 0 (the scores do not rank the
            cases, or separate them perfectly); `platt` for a package without a note head.
        ValueError: the numbers of runs and labels do not match; a scores.json outside the contract.
        PackageError: the source package does not load.
    """
    src = Path(model) if model is not None else DEFAULT_PACKAGE
    meta = read_package_meta(src)
    if out.exists():
        raise InputError(out, "already exists; give a new folder for the re-calibrated package")
    preds = [Path(p) for p in (pred if isinstance(pred, list) else [pred])]
    labelss = [Path(p) for p in (labels if isinstance(labels, list) else [labels])]
    if len(labelss) == 1:
        labelss = labelss * len(preds)
    if not preds or len(labelss) != len(preds):
        raise ValueError(
            f"{len(preds)} runs and {len(labelss)} labels: give one labels per run, or one for all"
        )
    probs: dict[tuple[int, str], dict[str, float]] = {}
    by_pid: dict[tuple[int, str], dict[str, str]] = {}
    fields: set[str] = set()
    for k, (p_k, l_k) in enumerate(zip(preds, labelss, strict=True)):
        pr, rows, f = _read_run(p_k, l_k, meta.weights_sha256, src)
        probs.update({(k, pid): v for pid, v in pr.items()})
        by_pid.update({(k, pid): r for pid, r in rows.items()})
        fields |= set(f)
    csv_path = labels_csv_path(labelss[0])
    weights, _ = load_package(src)  # validates the package before anything is written
    t_old = weights.temperature.detach().cpu().numpy().astype(np.float64)
    t_new = t_old.copy()
    has_bias = weights.note_text is not None  # the stacking bias exists with a note head
    if method == "platt" and not has_bias:
        raise InputError(
            src, "no stacking bias to hold an intercept (no note head); use the temperature method"
        )
    b_old = weights.head_bias.detach().cpu().numpy().astype(np.float64) if has_bias else np.zeros_like(t_old)
    b_new = b_old.copy()
    record: dict[str, Any] = {
        "method": method,
        "pred": str(preds[0]) if len(preds) == 1 else [str(p) for p in preds],
        "labels": str(csv_path) if len(preds) == 1 else [str(labels_csv_path(p)) for p in labelss],
        "scores": {},
    }
    for i, name in enumerate(meta.score_names):
        ids = [p for p in probs if name in probs[p] and by_pid.get(p, {}).get(name, "") != ""]
        if name not in fields or not ids:
            record["scores"][name] = {"kept": "no labels for this score in the cohort"}
            continue
        y = np.array([float(by_pid[p][name]) for p in ids])
        p = np.clip(np.array([probs[p][name] for p in ids], float), 1e-7, 1 - 1e-7)
        n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
        if min(n_pos, n_neg) < MIN_PER_CLASS:
            msg = f"score {name!r}: {n_pos} positive and {n_neg} negative cases; re-calibration needs at least {MIN_PER_CLASS} of each"
            raise InputError(csv_path, msg)
        z = np.log(p / (1 - p))  # the network's logit over the package's temperature
        fit: dict[str, float]
        if method == "platt":
            slope, intercept = logistic_on_logit(y, z)
            if not slope > 0:  # NaN: the logit separates these cases perfectly, no finite fit
                msg = f"score {name!r}: fitted slope {slope:.3f}; the scores do not rank these cases, or separate them perfectly"
                raise InputError(csv_path, msg)
            t_new[i] = t_old[i] / slope
            b_new[i] = b_old[i] + intercept * t_new[i]
            p_new = 1 / (1 + np.exp(-(slope * z + intercept)))
            fit = {"slope": slope, "intercept": intercept}
        else:
            factor = float(fit_temperature(z[:, None], y[:, None])[0])
            t_new[i] = t_old[i] * factor
            p_new = 1 / (1 + np.exp(-z / factor))
            fit = {"factor": factor}
        record["scores"][name] = {
            "n": len(y),
            "positives": n_pos,
            **fit,
            "temperature_before": float(t_old[i]),
            "temperature_after": float(t_new[i]),
            **({"bias_before": float(b_old[i]), "bias_after": float(b_new[i])} if has_bias else {}),
            # in-sample: on the cases the temperature was fitted on
            "fitted_cohort_before": calibration_summary(y, p),
            "fitted_cohort_after": calibration_summary(y, p_new),
        }
    configs = [
        json.loads((p / "run.json").read_text()).get("config") for p in preds if (p / "run.json").exists()
    ]
    if configs:
        record["run_config"] = configs[0]
        if any(c != configs[0] for c in configs[1:]):
            record["run_config_differs"] = True  # pooled runs made with other pipeline settings
    tensors = {"temperature": torch.from_numpy(t_new.astype(np.float32))}
    if has_bias:
        tensors["head_bias"] = torch.from_numpy(b_new.astype(np.float32))
    _write(src, out, meta, tensors, record, version or f"{meta.version}+recalibrated")
    return record


def _write(
    src: Path,
    out: Path,
    meta: PackageMeta,
    tensors: dict[str, torch.Tensor],
    record: dict[str, Any],
    version: str,
) -> None:
    """The source package `src` (whose `model.json` is `meta`) with new calibration `tensors`, built
    aside and renamed into place as `out`: its `model.json` gets `version`, the new weights' SHA-256 and
    the fit's `record` under "recalibration" (with the source's identity under "from")."""
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for f in src.iterdir():
            if f.is_file() and f.name not in ("weights.safetensors", "model.json"):
                shutil.copy2(f, tmp / f.name)
        state = load_file(str(src / "weights.safetensors"))
        for key, value in tensors.items():
            state[key] = value.to(state[key].dtype)
        save_file(state, str(tmp / "weights.safetensors"))
        source = {"name": meta.name, "version": meta.version, "weights_sha256": meta.weights_sha256}
        new_meta = meta.with_extra(recalibration={**record, "from": source}).model_copy(
            update={"version": version, "weights_sha256": sha256_of(tmp / "weights.safetensors")}
        )
        write_package_meta(tmp, new_meta)
        load_package(tmp)  # the new package loads (hash, architecture, every weight)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def describe(record: dict[str, Any]) -> list[str]:
    """One line per score for the terminal."""
    lines = []
    for name, r in record["scores"].items():
        if "kept" in r:
            lines.append(f"{name}: temperature kept ({r['kept']})")
            continue
        b, a = r["fitted_cohort_before"], r["fitted_cohort_after"]
        how = (
            f"slope {r['slope']:.3f}, intercept {r['intercept']:+.3f}"
            if "slope" in r
            else f"factor {r['factor']:.3f}"
        )
        lines.append(
            f"{name}: {how}; temperature {r['temperature_before']:.3f} → {r['temperature_after']:.3f} "
            f"on {r['n']} cases ({r['positives']} positive); on those cases NLL {b['nll']:.3f} → {a['nll']:.3f}, "
            f"Brier {b['brier']:.3f} → {a['brier']:.3f}, ECE {b['ece']:.3f} → {a['ece']:.3f}"
        )
    if record.get("run_config_differs"):
        lines.append(
            "warning: the pooled runs were made with different pipeline settings (run.json); the fit "
            "holds for neither exactly — pool runs made the same way"
        )
    return lines


def recalibration_map(fit: dict[str, Any], p: np.ndarray, inverse: bool = False) -> np.ndarray:
    """The probabilities a re-calibrated package gives where its source package gave `p` (one score's
    record from `model.json`'s `recalibration.scores`), or the way back with `inverse`: exact, since only
    the temperature and the stacking bias differ. `p`: probabilities in [0, 1], any shape; returns
    the same shape.

    Raises:
        ValueError: `fit` holds neither "slope"/"intercept" nor "factor".
    """
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    z = np.log(q / (1 - q))
    if "slope" in fit:
        a, c = float(fit["slope"]), float(fit["intercept"])
        z = (z - c) / a if inverse else a * z + c
    elif "factor" in fit:
        t = float(fit["factor"])
        z = z * t if inverse else z / t
    else:
        raise ValueError("not a re-calibration record (no slope/intercept or factor)")
    return 1 / (1 + np.exp(-z))
