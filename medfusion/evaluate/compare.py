"""`medfusion compare`: two runs on the same patients, paired.

Two models scored on one test cohort are not independent samples: the same hard cases pull both
down. The difference is therefore bootstrapped over *patients* (each resample draws patients with
replacement and recomputes both models' metric on that draw), which gives a much narrower interval
for "is A better than B" than comparing two unpaired confidence intervals.

Segmentation: per patient and class, Dice from each run's `evaluation/metrics_per_case.csv` (written by
`medfusion evaluate`); a patient where reference and prediction are both empty scores 1 here (the model
agreed that there is nothing), so that a false positive in a lesion-free patient still counts against a
model whose rival left it empty. Diagnosis: AUROC and Brier from each run's `scores.json` against the
labels CSV. The p-value is two-sided: twice the share of resamples on the far side of zero. The result
is written as `PRED/evaluation/compare.json` (`write_comparison`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.evaluate.diagnosis import METRICS
from medfusion.io.atomic import write_json
from medfusion.io.errors import InputError
from medfusion.io.labels_csv import labels_csv_path, read_labels_table
from medfusion.run.result import SCORES, CaseResult


def _case_dice(run: Path) -> dict[tuple[str, str], float]:
    path = run / "evaluation" / "metrics_per_case.csv"
    if not path.exists():
        raise InputError(path, "missing: run `medfusion evaluate --pred` on this run first")
    with open(path, newline="") as f:
        return {
            (r["patient_id"], r["class"]): 1.0 if r["empty"] == "both" else float(r["dice"])
            for r in csv.DictReader(f)
        }


def _probabilities(run: Path) -> dict[str, dict[str, float]]:
    """Each patient's calibrated probabilities, from its scores.json (`run.result.CaseResult`)."""
    return {p.name: CaseResult.load_probabilities(p) for p in sorted(run.iterdir()) if (p / SCORES).exists()}


def _paired(rows: np.ndarray, diff: Any, n_boot: int, rng: np.random.Generator) -> dict[str, float | int]:
    """diff(rows) (A − B) on the cohort, its percentile-bootstrap 95 % CI over the rows (patients) and a
    two-sided p-value for "no difference"; resamples where the difference is undefined are dropped."""
    delta = float(diff(rows))
    n = len(rows)
    boots = []
    for _ in range(n_boot):
        with np.errstate(all="ignore"):
            d = diff(rows[rng.integers(0, n, n)])
        if np.isfinite(d):
            boots.append(d)
    arr = np.array(boots)
    if not len(arr):
        return {"delta": delta, "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan"), "n": n}
    return {
        "delta": delta,
        "ci_low": float(np.percentile(arr, 2.5)),
        "ci_high": float(np.percentile(arr, 97.5)),
        "p": min(1.0, 2 * min(float(np.mean(arr <= 0)), float(np.mean(arr >= 0)))),
        "n": n,
    }


def compare(run_a: Path, run_b: Path, labels: Path, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Paired differences A − B (Dice per class, AUROC and Brier per score) over the common patients.

    Args:
        run_a, run_b: output folders of `medfusion run` (model A, model B), each evaluated.
        labels: the labels folder (with labels.csv) or the labels CSV.
        n_boot: bootstrap resamples over patients.
        seed: seed of the resampling.

    Returns:
        {"a": run_a, "b": run_b, "segmentation": {class: {"delta", "ci_low", "ci_high", "p", "n", "a",
        "b", "better", "worse"}}, "diagnosis": {score: {"auroc" | "brier": {"delta", "ci_low",
        "ci_high", "p", "n", "a", "b"}}}}: Dice and AUROC in [0, 1], Brier in [0, 1], CI bounds of the
        percentile bootstrap (95 %), p two-sided; `write_comparison` writes it.

    Raises:
        InputError: a run has no evaluation/metrics_per_case.csv, the runs share no patient and class,
            or LABELS/labels.csv is missing.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"a": str(run_a), "b": str(run_b), "segmentation": {}, "diagnosis": {}}
    dice_a, dice_b = _case_dice(run_a), _case_dice(run_b)
    common = sorted(set(dice_a) & set(dice_b))
    if not common:
        raise InputError(run_a, f"no patient and class in common with {run_b}")
    for cname in dict.fromkeys(c for _, c in common):
        keys = [k for k in common if k[1] == cname]
        pair = np.array([[dice_a[k], dice_b[k]] for k in keys])
        rec = _paired(pair, lambda r: r[:, 0].mean() - r[:, 1].mean(), n_boot, rng)
        out["segmentation"][cname] = {
            **rec,
            "a": float(pair[:, 0].mean()),
            "b": float(pair[:, 1].mean()),
            "better": int((pair[:, 0] > pair[:, 1] + 1e-9).sum()),
            "worse": int((pair[:, 0] < pair[:, 1] - 1e-9).sum()),
        }
    csv_path = labels_csv_path(labels)
    if not csv_path.exists():
        raise InputError(csv_path, "labels CSV not found")
    table, fields = read_labels_table(csv_path)
    by_pid = {r["patient_id"]: r for r in table}
    prob_a, prob_b = _probabilities(run_a), _probabilities(run_b)
    names = sorted({k for v in prob_a.values() for k in v} & {k for v in prob_b.values() for k in v})
    for s in (n for n in names if n in fields):
        ids = [
            p
            for p in sorted(set(prob_a) & set(prob_b))
            if by_pid.get(p, {}).get(s, "") != "" and s in prob_a[p] and s in prob_b[p]
        ]
        # one row per patient (label, p_A, p_B), resampled together
        rows = np.array([[float(by_pid[p][s]), prob_a[p][s], prob_b[p][s]] for p in ids], float)
        out["diagnosis"][s] = {}
        for name in ("auroc", "brier"):
            fn = METRICS[name]  # the same functions `medfusion evaluate` reports

            def diff(r: np.ndarray, fn: Any = fn) -> float:
                return fn(r[:, 0], r[:, 1]) - fn(r[:, 0], r[:, 2])

            out["diagnosis"][s][name] = {
                **_paired(rows, diff, n_boot, rng),
                "a": fn(rows[:, 0], rows[:, 1]),
                "b": fn(rows[:, 0], rows[:, 2]),
            }
    return out


def write_comparison(result: dict[str, Any], run_a: Path, out: Path | None = None) -> Path:
    """Write `compare`'s `result` as JSON to `out`, by default `run_a`/evaluation/compare.json (the
    folder is created if missing), atomically; returns the path written.

    Raises:
        OSError: the file cannot be written.
    """
    target = out or run_a / "evaluation" / "compare.json"
    return write_json(target, result)
