"""Incomplete inputs, uncertainty and the indeterminate band, on the held-out cohort of
`benchmarks/domain.py` (issue #25).

Reads what `benchmarks/domain.py` measured — each held-out patient scored by one `Predictor.predict`
with everything present (CT+MR+note), with its MR removed (CT+note) and with its note removed (CT+MR),
labels from each patient's `truth.json` — and prints, side by side per situation:

- AUROC (scikit-learn `roc_auc_score`) and ECE (`medfusion.evaluate.diagnosis.ece`: 10 equal-width
  bins, Naeini et al. 2015) with 95 % percentile-bootstrap intervals over patients; the ECE a perfectly
  calibrated model would show on these probabilities (`ece_calibrated_null`, its 95th percentile), since
  the binned ECE is biased upwards on small cohorts; and the verdict of issue #25's rule: a situation
  may be scored when its ECE ≤ 0.08 (`models.domain.MAX_SITUATION_ECE`), otherwise its cases are flagged;
- uncertainty against error: the error rate (prediction p ≥ 0.5 against the label) in the top decile of
  the shown MC-dropout s.d. against the other nine; and the median s.d. of every out-of-domain group
  against the held-out cohort's;
- candidate indeterminate bands lo ≤ p < hi: the share of cases inside, the error rate inside and outside.

    python benchmarks/missing_inputs.py WORK/domain_results.json

(`benchmarks/domain.py` prints the same at the end of its run.)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from medfusion.evaluate.diagnosis import ece, ece_calibrated_null
from medfusion.models.domain import MAX_SITUATION_ECE

HELD_OUT = "held-out in-domain"
SITUATIONS = {"CT+MR+note": HELD_OUT, "CT+note": f"{HELD_OUT}, CT+note", "CT+MR": f"{HELD_OUT}, CT+MR"}
# held-out patients predicted only with their MR removed (`--ct-only`), added unpaired to the CT+note row
CT_ONLY = f"{HELD_OUT}, CT+note only"
SCORE = "malignant"
BANDS = [(0.45, 0.55), (0.4, 0.6), (0.35, 0.65), (0.3, 0.7), (0.25, 0.75)]


def _arrays(rows: list[dict[str, Any]]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Case ids, labels (0/1), probabilities and s.d. of the rows that carry a label and a score."""
    keep = [r for r in rows if r.get("label") is not None and SCORE in (r.get("scores") or {})]
    ids = [str(r["case"]) for r in keep]
    y = np.array([int(r["label"]) for r in keep])
    p = np.array([float(r["scores"][SCORE]) for r in keep])
    sd = np.array([float(r["uncertainty"][SCORE]) for r in keep])
    return ids, y, p, sd


def _auroc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if 0 < y.sum() < y.size else math.nan


def calibration_table(
    by_situation: dict[str, tuple[np.ndarray, np.ndarray]], draws: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Per situation {n, positives, auroc, auroc_ci, ece, ece_ci, ece_null_p95, brier, error_rate,
    scored}: `by_situation` maps a situation to (labels (n,), probabilities (n,)) of the same patients in
    the same order; the bootstrap resamples patients (the same draw for every situation)."""
    rng = np.random.default_rng(seed)
    n = min(len(y) for y, _ in by_situation.values())
    idx = rng.integers(0, n, size=(draws, n))
    out: dict[str, dict[str, Any]] = {}
    for sit, (y, p) in by_situation.items():
        aurocs = np.array([_auroc(y[i], p[i]) for i in idx])
        eces = np.array([ece(y[i], p[i]) for i in idx])
        e = ece(y, p)
        out[sit] = {
            "n": int(y.size),
            "positives": int(y.sum()),
            "auroc": round(_auroc(y, p), 3),
            "auroc_ci": [round(float(v), 3) for v in np.nanpercentile(aurocs, [2.5, 97.5])]
            if np.isfinite(aurocs).any()
            else [math.nan, math.nan],
            "ece": round(e, 3),
            "ece_ci": [round(float(v), 3) for v in np.percentile(eces, [2.5, 97.5])],
            "ece_null_p95": round(float(np.percentile(ece_calibrated_null(p), 95)), 3),
            "brier": round(float(np.mean((p - y) ** 2)), 3),
            "error_rate": round(float(np.mean((p >= 0.5) != y)), 3),
            "scored": bool(e <= MAX_SITUATION_ECE),
        }
    return out


def uncertainty_vs_error(y: np.ndarray, p: np.ndarray, sd: np.ndarray) -> dict[str, Any]:
    """Error rate (p ≥ 0.5 against y) among the ceil(n/10) cases of largest s.d. against the rest, and
    the Spearman correlation of s.d. with |p − y| (scipy `spearmanr`)."""
    from scipy.stats import spearmanr

    k = max(1, math.ceil(y.size / 10))
    order = np.argsort(-sd, kind="stable")
    wrong = (p >= 0.5) != y
    top, rest = wrong[order[:k]], wrong[order[k:]]
    rho = spearmanr(sd, np.abs(p - y)).statistic if y.size > 2 else math.nan
    return {
        "n": int(y.size),
        "top_decile_n": int(k),
        "top_decile_error": round(float(top.mean()), 3),
        "rest_error": round(float(rest.mean()), 3) if rest.size else None,
        "top_decile_sd_min": round(float(sd[order[k - 1]]), 4),
        "spearman_sd_abs_error": round(float(rho), 3),
    }


def band_table(y: np.ndarray, p: np.ndarray) -> list[dict[str, Any]]:
    """For each candidate band lo ≤ p < hi: cases inside (count, share) and the error rate of the
    p ≥ 0.5 prediction inside and outside it."""
    wrong = (p >= 0.5) != y
    rows = []
    for lo, hi in BANDS:
        inside = (p >= lo) & (p < hi)
        rows.append(
            {
                "band": [lo, hi],
                "inside": int(inside.sum()),
                "share": round(float(inside.mean()), 3),
                "error_inside": round(float(wrong[inside].mean()), 3) if inside.any() else None,
                "error_outside": round(float(wrong[~inside].mean()), 3) if (~inside).any() else None,
            }
        )
    return rows


def analyse(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Everything the module docstring lists, from `benchmarks/domain.py`'s per-group case rows."""
    per_sit = {sit: _arrays(results.get(group, [])) for sit, group in SITUATIONS.items()}
    common = set.intersection(*(set(ids) for ids, *_ in per_sit.values()))
    paired: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for sit, (ids, y, p, _sd) in per_sit.items():
        keep = [i for i, c in enumerate(ids) if c in common]
        order = sorted(keep, key=lambda i: ids[i])
        if order:
            paired[sit] = (y[order], p[order])
    out: dict[str, Any] = {"paired_patients": len(common)}
    if paired:
        out["calibration"] = calibration_table(paired)
    extra = _arrays(results.get(CT_ONLY, []))
    if extra[1].size:
        _i, y_mr, p_mr, _s = per_sit["CT+note"]
        both = (np.concatenate([y_mr, extra[1]]), np.concatenate([p_mr, extra[2]]))
        out["calibration_ct_note_all"] = calibration_table({"CT+note, all": both})["CT+note, all"]
    _ids, y, p, sd = per_sit["CT+MR+note"]
    if y.size:
        out["uncertainty"] = uncertainty_vs_error(y, p, sd)
        out["bands"] = band_table(y, p)
    sds = {
        g: float(np.median([r["uncertainty"][SCORE] for r in rows]))
        for g, rows in results.items()
        if rows and all(SCORE in (r.get("uncertainty") or {}) for r in rows)
    }
    out["median_sd"] = {g: round(v, 4) for g, v in sds.items()}
    return out


def _row(name: str, m: dict[str, Any]) -> str:
    return (
        f"{name:12s} {m['n']:4d} {m['positives']:4d} {m['auroc']:6.3f} "
        f"{m['auroc_ci'][0]:6.3f}–{m['auroc_ci'][1]:5.3f} {m['ece']:6.3f} "
        f"{m['ece_ci'][0]:6.3f}–{m['ece_ci'][1]:5.3f} {m['ece_null_p95']:13.3f} {m['brier']:6.3f} "
        f"{m['error_rate']:6.3f}  {'scored' if m['scored'] else 'flagged'}"
    )


def report(results: dict[str, list[dict[str, Any]]]) -> str:
    """The analysis as printable text (and its numbers at the end as one JSON line)."""
    a = analyse(results)
    lines = [f"Incomplete inputs: {a['paired_patients']} held-out patients scored in every situation"]
    cal = a.get("calibration", {})
    if cal:
        lines.append(
            f"{'situation':12s} {'n':>4s} {'pos':>4s} {'AUROC':>6s} {'95% CI':>13s} {'ECE':>6s} "
            f"{'95% CI':>13s} {'ECE|calib p95':>13s} {'Brier':>6s} {'err':>6s}  ECE ≤ {MAX_SITUATION_ECE}?"
        )
        lines += [_row(sit, m) for sit, m in cal.items()]
    if a.get("calibration_ct_note_all"):
        lines.append(
            _row("CT+note, all", a["calibration_ct_note_all"]) + "  (+ the MR-removed-only patients)"
        )
    u = a.get("uncertainty")
    if u:
        lines.append("")
        lines.append(
            f"Uncertainty (CT+MR+note, n {u['n']}): error in the top s.d. decile ({u['top_decile_n']} cases, "
            f"s.d. ≥ {u['top_decile_sd_min']}) {u['top_decile_error']:.3f} vs the rest {u['rest_error']}; "
            f"Spearman(s.d., |p − y|) {u['spearman_sd_abs_error']}"
        )
    if a["median_sd"]:
        base = a["median_sd"].get(HELD_OUT)
        lines.append(
            "Median shown s.d. per group" + (f" (ratio to held-out {base:.4f})" if base else "") + ":"
        )
        for g, v in a["median_sd"].items():
            ratio = f"  ×{v / base:.2f}" if base else ""
            lines.append(f"  {g:36s} {v:.4f}{ratio}")
    if a.get("bands"):
        lines.append("")
        lines.append(
            "Indeterminate band lo ≤ p < hi (CT+MR+note): inside / share / error inside / error outside"
        )
        for b in a["bands"]:
            lines.append(
                f"  {b['band'][0]:.2f}–{b['band'][1]:.2f}  {b['inside']:4d}  {b['share']:.3f}  "
                f"{b['error_inside']}  {b['error_outside']}"
            )
    lines.append("")
    lines.append("JSON " + json.dumps(a))
    return "\n".join(lines)


def measure_ct_only(work: Path, seed: int, start: int, stop: int, threads: int) -> None:
    """Predict held-out patients `start`…`stop − 1` of WORK/heldout-SEED with their MR removed only (no
    registration: a CT-only folder's path, a fraction of a full case's cost), into
    WORK/measured/ct-only__<id>.json. `analyse` adds them, unpaired, to the CT+note row."""
    import dataclasses

    import torch

    from medfusion.config import PipelineConfig
    from medfusion.infer.predictor import Predictor
    from medfusion.io.atomic import write_json
    from medfusion.io.case import load_case
    from medfusion.models.domain import case_facts
    from medfusion.preprocess.prepare import prepare_case
    from medfusion.run.pipeline import run_preprocess_config

    torch.set_num_threads(threads)
    cohort = work / f"heldout-{seed}"
    predictor = Predictor(None, "cpu", tta=False, mc_samples=8)  # as benchmarks/domain.py
    cfg = run_preprocess_config(PipelineConfig(), predictor.meta)
    for folder in sorted(p for p in (cohort / "patients").iterdir() if p.is_dir())[start:stop]:
        out = work / "measured" / f"ct-only__{folder.name}.json"
        if out.exists() or (work / "measured" / f"{HELD_OUT.replace(' ', '_')}__{folder.name}.json").exists():
            continue
        if not (cohort / "labels" / folder.name / "truth.json").exists():  # still being generated
            continue
        case = dataclasses.replace(load_case(folder), mr=[])
        pred = predictor.predict(prepare_case(case, cfg))
        truth = json.loads((cohort / "labels" / folder.name / "truth.json").read_text())
        rec = {
            "case": folder.name,
            "label": int(truth["malignant"]),
            "facts": case_facts(case, False),
            "features": None if pred.domain_features is None else pred.domain_features.tolist(),
            "scores": pred.scores,
            "uncertainty": pred.uncertainty,
        }
        write_json(out, rec)
        print(f"{folder.name} CT+note p={pred.scores[SCORE]:.3f} label={rec['label']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="WORK/domain_results.json written by benchmarks/domain.py")
    ap.add_argument(
        "--ct-only",
        nargs=2,
        type=int,
        metavar=("START", "STOP"),
        default=None,
        help="instead: measure held-out patients START…STOP-1 with the MR removed (WORK = the results' folder)",
    )
    ap.add_argument("--seed", type=int, default=13013)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.ct_only:
        measure_ct_only(args.results.parent, args.seed, *args.ct_only, args.threads)
        return
    try:
        data = json.loads(args.results.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{args.results}: not a readable domain_results.json ({exc})") from exc
    print(report(data["cases"]))


if __name__ == "__main__":
    main()
