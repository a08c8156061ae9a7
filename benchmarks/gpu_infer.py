"""The shipped model on a GPU against the CPU: same patients, same prepared inputs, same run.

    python benchmarks/gpu_infer.py [--cohort sample_data/patients] [--labels sample_data/labels]

Each patient is prepared once (load, register, resample: CPU work), then `Predictor.predict` (the
pipeline's inference: sliding windows, flip TTA, MC-dropout scores) runs three ways — CPU fp32 (the
baseline), CUDA fp32 and CUDA with bf16 autocast (the pipeline's default on a GPU). Printed per way:
median seconds per patient and the ratio to the CPU; agreement with the CPU (per-class Dice between
the label maps, largest |Δ probability| of any score); Dice against the reference labels. Without
CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from medfusion.config import PipelineConfig
from medfusion.evaluate.segmentation import dice
from medfusion.infer.predictor import Prediction, Predictor
from medfusion.io.case import find_patient_folders, load_case
from medfusion.io.nifti import read_nifti
from medfusion.preprocess.prepare import CaseTensors, prepare_case
from medfusion.run.pipeline import run_preprocess_config

WAYS = {"cpu fp32": ("cpu", False), "cuda fp32": ("cuda", False), "cuda bf16": ("cuda", True)}


def timed(pred: Predictor, t: CaseTensors) -> tuple[Prediction, float]:
    if pred.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = pred.predict(t)
    if pred.device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cohort", type=Path, default=Path("sample_data/patients"))
    ap.add_argument("--labels", type=Path, default=Path("sample_data/labels"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    print(
        f"{torch.cuda.get_device_name()} · torch {torch.__version__} · {torch.get_num_threads()} CPU threads"
    )
    predictors = {w: Predictor(device=d, amp=a) for w, (d, a) in WAYS.items()}
    cfg = run_preprocess_config(PipelineConfig(), predictors["cpu fp32"].meta)
    names = predictors["cpu fp32"].class_names
    secs: dict[str, list[float]] = {w: [] for w in WAYS}
    agree: dict[str, list[list[float]]] = {w: [] for w in WAYS}
    dscore: dict[str, list[float]] = {w: [] for w in WAYS}
    truth: dict[str, list[list[float]]] = {w: [] for w in WAYS}
    folders = find_patient_folders([args.cohort])
    for p in predictors.values():  # warm-up (CUDA context, cuDNN autotuning) outside the timings
        timed(p, prepare_case(load_case(folders[0]), cfg))
    for folder in folders:
        tensors = prepare_case(load_case(folder), cfg)
        ref_path = args.labels / folder.name / "segmentation.nii.gz"
        ref = read_nifti(ref_path).array if ref_path.exists() else None
        outs = {}
        for w, p in predictors.items():
            outs[w], s = timed(p, tensors)
            secs[w].append(s)
        base = outs["cpu fp32"]
        for w, o in outs.items():
            agree[w].append([dice(o.labels_ct == k, base.labels_ct == k) for k in range(1, len(names))])
            dscore[w].append(max(abs(o.scores[n] - base.scores[n]) for n in o.scores))
            if ref is not None:
                truth[w].append([dice(o.labels_ct == k, ref == k) for k in range(1, len(names))])
        print(f"  {folder.name}: " + "  ".join(f"{w} {secs[w][-1]:.2f} s" for w in WAYS), flush=True)
    cpu = statistics.median(secs["cpu fp32"])
    print(f"\n{len(folders)} patients; classes {', '.join(names[1:])}")
    print(
        f"{'way':10s} {'median s':>9s} {'CPU/way':>8s}  {'Dice vs CPU (min)':>30s}  {'max |Δp|':>8s}  Dice vs labels"
    )
    for w in WAYS:
        m = statistics.median(secs[w])
        a = np.min(np.array(agree[w]), 0)
        tr = np.mean(np.array(truth[w]), 0) if truth[w] else []
        print(
            f"{w:10s} {m:9.3f} {cpu / m:8.2f}×  {' / '.join(f'{v:.4f}' for v in a):>30s}  {max(dscore[w]):8.4f}  "
            + " / ".join(f"{v:.3f}" for v in tr)
        )


if __name__ == "__main__":
    main()
