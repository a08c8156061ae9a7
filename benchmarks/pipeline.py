"""End-to-end `medfusion run` on a cohort: per-stage median seconds per patient and peak RSS; plus
the predictor's forward pass side by side with MONAI's `sliding_window_inference` on the same
network and input.

    python benchmarks/pipeline.py [--cohort sample_data/patients] [--out /tmp/bench-run]
"""

from __future__ import annotations

import argparse
import csv
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from medfusion.config import PipelineConfig
from medfusion.infer.predictor import Predictor
from medfusion.io.case import find_patient_folders, load_case
from medfusion.models.package import preprocess_config
from medfusion.preprocess.prepare import prepare_case
from medfusion.run.pipeline import RunOptions, run_cohort


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cohort", type=Path, default=Path("sample_data/patients"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-run"))
    args = ap.parse_args()
    folders = find_patient_folders([args.cohort])
    t = time.perf_counter()
    run_cohort(folders, RunOptions(out=args.out, pipeline=PipelineConfig(), device="cpu"))
    total = time.perf_counter() - t
    rows = list(csv.DictReader(open(args.out / "summary.csv")))
    stages = [k for k in rows[0] if k.startswith("t_")]
    print(
        f"{len(rows)} patients, {total:.1f} s in all ({total / len(rows):.1f} s per patient, model loaded once)"
    )
    for k in stages:
        vals = [float(r[k]) for r in rows if r.get(k)]
        print(f"  {k[2:]:9s} median {statistics.median(vals):6.2f} s")
    print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")

    pred = Predictor(device="cpu", tta=False, mc_samples=0)
    tensors = prepare_case(load_case(folders[0]), preprocess_config(pred.meta))
    ct = torch.from_numpy(tensors.ct)[None].float()
    mr = torch.from_numpy(tensors.mr)[None].float()
    has = torch.tensor([True])
    net = pred.net

    def ours() -> torch.Tensor:
        with torch.inference_mode():
            return net.encode(ct, mr, has, [tensors.note])[0]

    def monai_swi() -> torch.Tensor:
        x = torch.cat([ct, mr], 1)
        with torch.inference_mode():
            return sliding_window_inference(
                x,
                roi_size=tuple(x.shape[2:]),
                sw_batch_size=1,
                predictor=lambda w: net.encode(w[:, :2], w[:, 2:], has, [tensors.note])[0],
            )  # type: ignore[arg-type,return-value]

    a, b = ours(), monai_swi()
    tm = {}
    for name, fn in (("medfusion", ours), ("MONAI sliding_window_inference", monai_swi)):
        ts = []
        for _ in range(5):
            s = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - s)
        tm[name] = statistics.median(ts)
    print(
        f"forward on the {tuple(ct.shape[2:])} model grid, median of 5: "
        + ", ".join(f"{k} {v:.3f} s" for k, v in tm.items())
    )
    print(
        f"  MONAI / medfusion = {tm['MONAI sliding_window_inference'] / tm['medfusion']:.2f}×, max |difference| = {float(np.abs((a - b).numpy()).max()):.2e}"
    )


if __name__ == "__main__":
    main()
