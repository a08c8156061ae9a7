"""The shipped model on a GPU against the CPU: same patients, same prepared inputs, same run.

    python benchmarks/gpu_infer.py [--cohort sample_data/patients] [--labels sample_data/labels]
                                   [--ways cpu:fp32:1,cuda:fp32:1,cuda:fp32:4,cuda:fp32:8,cuda:bf16:4]

Each patient is prepared once (load, register, resample: CPU work), then `Predictor.predict` (the
pipeline's inference: sliding windows, flip TTA, MC-dropout scores) runs each way DEVICE:PRECISION:
WINDOWS (windows per network call); the first way is the baseline (CPU fp32). Printed per way:
median seconds per patient and the ratio to the CPU; agreement with the CPU (per-class Dice between
the label maps, largest |Δ probability| of any score); Dice against the reference labels. Without
CUDA, ways on the CUDA device are refused with a line and exit 0; CPU-only ways run anywhere.
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
from medfusion.preprocess.prepare import ModelInputs, prepare_case
from medfusion.run.pipeline import run_preprocess_config

WAYS = "cpu:fp32:1,cuda:fp32:1,cuda:fp32:4,cuda:fp32:8,cuda:bf16:4"


def timed(pred: Predictor, t: ModelInputs) -> tuple[Prediction, float]:
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
    ap.add_argument("--ways", default=WAYS)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if "cuda" in args.ways and not cuda:
        print("no CUDA device: nothing to measure (ways on the CPU alone: --ways cpu:fp32:1,cpu:fp32:4)")
        return
    print(
        f"{torch.cuda.get_device_name() if cuda else 'CPU'} · torch {torch.__version__} · {torch.get_num_threads()} CPU threads"
    )
    ways = args.ways.split(",")
    predictors = {}
    for w in ways:
        dev, prec, win = w.split(":")
        predictors[w] = Predictor(device=dev, amp=prec == "bf16", sw_batch_size=int(win))
    first = predictors[ways[0]]
    cfg = run_preprocess_config(PipelineConfig(), first.meta)
    names = first.class_names
    secs: dict[str, list[float]] = {w: [] for w in ways}
    agree: dict[str, list[list[float]]] = {w: [] for w in ways}
    dscore: dict[str, list[float]] = {w: [] for w in ways}
    truth: dict[str, list[list[float]]] = {w: [] for w in ways}
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
        base = outs[ways[0]]
        for w, o in outs.items():
            agree[w].append([dice(o.labels.array == k, base.labels.array == k) for k in range(1, len(names))])
            dscore[w].append(max(abs(o.scores[n] - base.scores[n]) for n in o.scores))
            if ref is not None:
                truth[w].append([dice(o.labels.array == k, ref == k) for k in range(1, len(names))])
        print(f"  {folder.name}: " + "  ".join(f"{w} {secs[w][-1]:.2f} s" for w in ways), flush=True)
    cpu = statistics.median(secs[ways[0]])
    print(f"\n{len(folders)} patients; classes {', '.join(names[1:])}")
    print(
        f"{'way':14s} {'median s':>9s} {'base/way':>8s}  {'Dice vs CPU (min)':>30s}  {'max |Δp|':>8s}  Dice vs labels"
    )
    for w in ways:
        m = statistics.median(secs[w])
        a = np.min(np.array(agree[w]), 0)
        tr = np.mean(np.array(truth[w]), 0) if truth[w] else []
        print(
            f"{w:14s} {m:9.3f} {cpu / m:8.2f}×  {' / '.join(f'{v:.4f}' for v in a):>30s}  {max(dscore[w]):8.4f}  "
            + " / ".join(f"{v:.3f}" for v in tr)
        )


if __name__ == "__main__":
    main()
