"""Calibration of a re-calibrated package against its source package, on one scored cohort.

`medfusion calibrate` writes a package that differs from its source only in the temperature and the
stacking bias, and records the map in `model.json`. So one `medfusion run` of a labelled cohort with
either package gives both packages' probabilities exactly; this script scores the two side by side:
Brier, log loss and ECE (10 bins) against the labels, ECE's spread for a perfectly calibrated model with
the same probabilities (the calibrated null), and paired bootstrap differences. On a synthetic cohort,
where every patient's true probability of malignancy is known (`labels/<id>/truth.json`), it also scores
against that probability: the mean squared distance to it and the ECE with it in place of the 0/1 label —
the same reliability curve without the label's coin flip, so a few hundred patients suffice to see a
mean shift that the label-based measures cannot separate from chance.

    python benchmarks/calibration.py --pred RUN --labels LABELS --package PKG [--bootstrap 2000]

PKG is the re-calibrated package; RUN may hold the scores of PKG or of the package it came from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medfusion.evaluate.cohort import _labels_table, labels_csv_path
from medfusion.evaluate.diagnosis import ece, ece_calibrated_null
from medfusion.package import read_meta
from medfusion.train.calibrate import calibration_summary, recalibration_map


def _measures(y: np.ndarray, p: np.ndarray, truth: np.ndarray | None) -> dict[str, float]:
    out = calibration_summary(y, p)
    if truth is not None:
        out["mse_to_true"] = float(np.mean((p - truth) ** 2))
        out["ece_vs_true"] = ece(truth, p)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pred", type=Path, required=True)
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--package", type=Path, required=True, help="a package written by `medfusion calibrate`")
    ap.add_argument("--score", default="malignant")
    ap.add_argument("--bootstrap", type=int, default=2000)
    args = ap.parse_args()

    meta = read_meta(args.package)
    rec = meta.get("recalibration")
    if not rec:
        raise SystemExit(f"{args.package}: not written by `medfusion calibrate` (no recalibration record)")
    fit = rec["scores"][args.score]
    src_sha, new_sha = rec["from"]["weights_sha256"], meta["weights_sha256"]
    table, _ = _labels_table(labels_csv_path(args.labels))
    label = {r["patient_id"]: r[args.score] for r in table if r.get(args.score, "") != ""}
    labels_dir = args.labels if args.labels.is_dir() else args.labels.parent

    ids, probs, shas, truths = [], [], set(), []
    for f in sorted(args.pred.glob("*/scores.json")):
        sc = json.loads(f.read_text())
        pid = sc.get("patient_id", f.parent.name)
        if pid not in label or args.score not in sc.get("probabilities", {}):
            continue
        ids.append(pid)
        probs.append(sc["probabilities"][args.score])
        shas.add(sc.get("model", {}).get("weights_sha256"))
        t = labels_dir / pid / "truth.json"
        truths.append(json.loads(t.read_text()).get(f"probability_{args.score}") if t.exists() else None)
    if not ids:
        raise SystemExit(f"{args.pred}: no scored patient with a {args.score!r} label")
    if shas == {src_sha}:
        old = np.clip(np.array(probs, float), 1e-7, 1 - 1e-7)
        new = recalibration_map(fit, old)
    elif shas == {new_sha}:
        new = np.clip(np.array(probs, float), 1e-7, 1 - 1e-7)
        old = recalibration_map(fit, new, inverse=True)
    else:
        raise SystemExit(f"{args.pred}: scores from other weights than {args.package} or its source")
    y = np.array([float(label[i]) for i in ids])
    truth = np.array(truths, float) if all(t is not None for t in truths) else None

    names = (f"source {rec['from']['version']}", f"re-calibrated {meta['version']}")
    print(f"{len(y)} patients, {int(y.sum())} positive (prevalence {y.mean():.3f})", end="")
    print(f"; mean true probability {truth.mean():.3f}" if truth is not None else "")
    res = {}
    for name, p in zip(names, (old, new), strict=True):
        m = res[name] = _measures(y, p, truth)
        null = ece_calibrated_null(p, n_draws=args.bootstrap)
        line = (
            f"{name:>28}: mean p {p.mean():.3f}  Brier {m['brier']:.4f}  NLL {m['nll']:.4f}  ECE {m['ece']:.4f} "
            f"(calibrated null median {np.median(null):.4f}, P(null >= ECE) {np.mean(null >= m['ece']):.3f})"
        )
        if truth is not None:
            line += f"  MSE to true p {m['mse_to_true']:.4f}  ECE vs true p {m['ece_vs_true']:.4f}"
        print(line)
    rng = np.random.default_rng(0)
    boots = []
    for _ in range(args.bootstrap):
        i = rng.integers(0, len(y), len(y))
        if len(np.unique(y[i])) < 2:
            continue
        a, b = (_measures(y[i], p[i], None if truth is None else truth[i]) for p in (old, new))
        boots.append({k: b[k] - a[k] for k in a})
    a, b = res[names[0]], res[names[1]]
    print(
        f"paired, re-calibrated − source (95 % bootstrap CI, {len(boots)} resamples); ratio re-calibrated / source:"
    )
    for k in a:
        d = np.array([x[k] for x in boots])
        print(
            f"  {k:>12}: {b[k] - a[k]:+.4f} ({np.percentile(d, 2.5):+.4f} … {np.percentile(d, 97.5):+.4f})"
            f"  ratio {b[k] / a[k]:.3f}"
        )


if __name__ == "__main__":
    main()
