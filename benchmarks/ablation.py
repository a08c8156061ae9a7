"""Ablation: image-only (CT, MR, CT+MR), note-only and each fusion strategy, every row trained the same
(short) way by `medfusion.train` and scored on the same held-out cohort, beside the generator's oracle
ceilings on those patients.

    python benchmarks/ablation.py --config pipelines/train_default.yaml --test /work/data/test \\
        --out runs/ablation [--epochs 4] [--steps 60] [--spacing 2.5] [--size 80] [--rows ...]
    python benchmarks/ablation.py ... --package medfusion/weights/default   # score one package only

Scoring runs on the preprocessed test cases (a cache built once, registration included), without
test-time augmentation, on the model grid, in windows of the training crop as `medfusion run` infers.
Dice is the mean over the cases whose reference has the class; AUROC and ECE use the calibrated probability. The shorter schedule and coarser grid make the
rows cheaper than the shipped model: compare rows with each other, not with the model card's
headline numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from sklearn.metrics import roc_auc_score

from medfusion.evaluate.diagnosis import ece
from medfusion.evaluate.segmentation import dice
from medfusion.infer.windowed import forward_case, package_roi
from medfusion.models.network import MedFusionNet
from medfusion.package import load_package
from medfusion.train.config import TrainConfig
from medfusion.train.data import build_cache, load_cached, read_labels_csv
from medfusion.train.loop import train

ROWS: dict[str, dict[str, Any]] = {
    "image only: CT": {"use_mr": False, "use_note": False},
    "image only: MR": {"use_ct": False, "use_note": False},
    "image only: CT+MR": {"use_note": False},
    "note only": {"use_ct": False, "use_mr": False},
    "fusion: spatial": {"fusion": "spatial"},
    "fusion: feature_concat": {"fusion": "feature_concat"},
    "fusion: feature_gated": {"fusion": "feature_gated"},
    "fusion: sequence": {"fusion": "sequence"},
    "fusion: film": {"fusion": "film"},
}


def test_cache(test: Path, cfg: TrainConfig, out: Path, registration_from: Path | None) -> list[str]:
    folders = sorted(p for p in (test / "patients").iterdir() if p.is_dir())
    recs = build_cache(folders, test / "labels", cfg.preprocess, out, cfg.workers, registration_from)
    return [r["patient_id"] for r in recs if "error" not in r]


@torch.inference_mode()
def score(
    model: MedFusionNet,
    cache: Path,
    pids: list[str],
    labels: dict[str, dict[str, int]],
    crop: list[int] | None,
) -> dict[str, Any]:
    model.eval()
    n_classes = model.cfg.n_classes
    dices: list[list[float]] = [[] for _ in range(n_classes - 1)]
    probs, ys = [], []
    for pid in pids:
        r = load_cached(cache, pid)
        ct = torch.from_numpy(r["ct"].astype(np.float32))[None]
        mr = torch.from_numpy(r["mr"].astype(np.float32))[None]
        has = torch.tensor([bool(r["has_mr"])])
        # as inference and validation run: windows of the training crop, the score from the
        # lesion-centred window (a whole-volume pass is a different input for a crop-trained network)
        seg, heads = forward_case(model, ct, mr, has, r["note"], crop, [()], overlap=0.25)  # as recorded
        sc = model.score_logits(heads[0], model.note_logits([r["note"]]))
        pred = seg.argmax(1)[0].numpy()
        for k in range(1, n_classes):
            if (r["target"] == k).any():
                dices[k - 1].append(dice(pred == k, r["target"] == k))
        probs.append(float(model.calibrated(sc)[0, 0]))
        ys.append(labels[pid][next(iter(labels[pid]))])
    y, p = np.asarray(ys), np.asarray(probs)
    return {
        "dice": [float(np.mean(d)) if d else float("nan") for d in dices],
        "n_with_class": [len(d) for d in dices],
        "auroc": float(roc_auc_score(y, p)),
        "ece": float(ece(y, p)),
        "n": len(pids),
    }


def oracle_rows(test: Path, pids: list[str], labels: dict[str, dict[str, int]]) -> dict[str, float]:
    with open(test / "labels" / "oracle.csv", newline="") as f:
        oracle = {r["patient_id"]: r for r in csv.DictReader(f)}
    y = np.asarray([labels[p][next(iter(labels[p]))] for p in pids])
    return {
        view: float(roc_auc_score(y, [float(oracle[p][f"p_{view}"]) for p in pids]))
        for view in ("all", "image", "note")
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="pipelines/train_default.yaml")
    ap.add_argument("--test", type=Path, required=True, help="cohort folder with patients/ and labels/")
    ap.add_argument("--out", type=Path, default=Path("runs/ablation"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--spacing", type=float, default=2.5)
    ap.add_argument("--size", type=int, default=80)
    ap.add_argument("--crop", type=int, default=48)
    ap.add_argument("--rows", nargs="*", default=list(ROWS))
    ap.add_argument(
        "--threads", type=int, default=2, help="torch threads (1 when another job shares the cores)"
    )
    ap.add_argument("--train-registrations", type=Path, help="a training cache whose registrations to reuse")
    ap.add_argument("--test-registrations", type=Path, help="a test cache whose registrations to reuse")
    ap.add_argument("--package", type=Path, help="score this package only (no training)")
    args = ap.parse_args()
    os.environ.setdefault("MEDFUSION_QUIET", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path(args.config).read_text())
    score_names = base.get("score_names", ["malignant"])
    labels = read_labels_csv(args.test / "labels" / "labels.csv", score_names)

    if args.package:
        model, meta = load_package(args.package)
        cfg = TrainConfig.model_validate({**base, "preprocess": meta.preprocess.model_dump(mode="json")})
        cache = args.out / "test-cache-package"
        pids = test_cache(args.test, cfg, cache, args.test_registrations)
        res = score(model, cache, pids, labels, package_roi(meta))
        print(
            json.dumps(
                {"package": str(args.package), **res, "oracle_auroc": oracle_rows(args.test, pids, labels)}
            )
        )
        return

    base["preprocess"] = {
        **base.get("preprocess", {}),
        "target_spacing_mm": args.spacing,
        "target_size": [args.size] * 3,
    }
    base["data"] = {
        **base["data"],
        "cache": str(args.out / f"train-cache-{args.spacing}mm-{args.size}"),
        "registration_from": str(args.train_registrations) if args.train_registrations else None,
    }
    base.update(
        {
            "epochs": args.epochs,
            "steps_per_epoch": args.steps,
            "crop_size": [args.crop] * 3,
            "threads": args.threads,
        }
    )
    torch.set_num_threads(args.threads)
    base.get("augment", {}).pop("class_crop_ratios", None)  # 48³ crops at 2.5 mm: lesion-biased crops
    probe = TrainConfig.model_validate(base)
    tcache = args.out / f"test-cache-{args.spacing}mm-{args.size}"
    pids = test_cache(args.test, probe, tcache, args.test_registrations)
    oracle = oracle_rows(args.test, pids, labels)
    results_path = args.out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.rows:
        if name in results:
            continue
        cfg = TrainConfig.model_validate({**base, "network": {**base.get("network", {}), **ROWS[name]}})
        t0 = time.perf_counter()
        summary = train(cfg, args.out / name.replace(": ", "-").replace(" ", "_").replace("+", "_"))
        model, _ = load_package(summary["package"])
        res = score(model, tcache, pids, labels, cfg.crop_size)
        res["train_minutes"] = round((time.perf_counter() - t0) / 60, 1)
        results[name] = res
        results_path.write_text(json.dumps(results, indent=1))
        print(name, json.dumps(res), flush=True)
    print(
        f"\n{len(pids)} test patients ({args.test}); {args.epochs} epochs x {args.steps} steps per row, "
        f"{args.spacing} mm grid {args.size}^3"
    )
    print("| row | Dice core | Dice oedema | Dice calcification | AUROC | ECE | train min |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        d = r["dice"]
        print(
            f"| {name} | {d[0]:.3f} | {d[1]:.3f} | {d[2]:.3f} | {r['auroc']:.3f} | {r['ece']:.3f} | "
            f"{r['train_minutes']} |"
        )
    for view, v in oracle.items():
        print(f"| oracle ({view}) | | | | {v:.3f} | | |")


if __name__ == "__main__":
    main()
