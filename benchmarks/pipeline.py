"""End-to-end `medfusion run` on a cohort: per-stage median seconds per patient and peak RSS; plus
the segmentation pass alone — windows of the training crop (MONAI's Gaussian sliding window, as the
predictor runs it) side by side with the whole grid in one pass, same network and input.

    python benchmarks/pipeline.py [--cohort sample_data/patients] [--out /tmp/bench-run]

    python benchmarks/pipeline.py --size clinical --cohort CLIN/patients [--baseline PATIENT] [--n 3]

`--size clinical` (#24): the whole `medfusion run` of each clinical-size patient (`medfusion synth --size
clinical`) and of the standard sample patient (`--baseline`, default sample_data's first), each as its own
process, alternating, in the same run; the median wall time per patient, its ratio to the standard one,
and each process's peak RSS (`os.wait4`: the child's own maximum resident set, its children included
where it waited for them).
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from medfusion.config import PipelineConfig
from medfusion.infer.predictor import Predictor
from medfusion.infer.windowed import forward_case, package_roi
from medfusion.io.case import find_patient_folders, load_case
from medfusion.preprocess.prepare import prepare_case
from medfusion.run.cohort import run_cohort
from medfusion.run.pipeline import RunOptions, run_preprocess_config


def _timed_run(patient: Path, out: Path) -> tuple[float, float, int]:
    """`medfusion run PATIENT --out OUT --device cpu` as a child process: (wall s, peak RSS MiB, exit code)."""
    cmd = [sys.executable, "-m", "medfusion.cli", "run", str(patient), "--out", str(out), "--device", "cpu"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 and proc.stderr is not None:
        print(proc.stderr.read().decode(errors="replace")[-2000:], file=sys.stderr)
    return seconds, usage.ru_maxrss / 1024, proc.returncode


def clinical_ratio(clinical: Path, baseline: Path, n: int, out: Path) -> None:
    """Clinical-size patients against the standard one, each `medfusion run` in its own process, alternating."""
    patients = find_patient_folders([clinical])[:n]
    rows: dict[str, list[tuple[float, float, int]]] = {"standard": [], "clinical": []}
    for i, patient in enumerate(patients):
        for label, folder in (("standard", baseline), ("clinical", patient)):
            rec = _timed_run(folder, out / f"{label}-{i}")
            rows[label].append(rec)
            print(
                f"{label:9s} {folder.name}: {rec[0]:.1f} s, peak RSS {rec[1]:.0f} MiB, exit {rec[2]}",
                flush=True,
            )
    med = {k: statistics.median(r[0] for r in v) for k, v in rows.items()}
    peak = {k: max(r[1] for r in v) for k, v in rows.items()}
    for k in rows:
        print(f"{k:9s} {len(rows[k])} runs: median {med[k]:.1f} s per patient, peak RSS {peak[k]:.0f} MiB")
    print(f"clinical / standard median time per patient: {med['clinical'] / med['standard']:.2f}×")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cohort", type=Path, default=Path("sample_data/patients"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-run"))
    ap.add_argument("--size", choices=["standard", "clinical"], default="standard")
    ap.add_argument("--baseline", type=Path, help="the standard-size patient for --size clinical")
    ap.add_argument("--n", type=int, default=3, help="clinical patients for --size clinical")
    args = ap.parse_args()
    if args.size == "clinical":
        baseline = args.baseline or find_patient_folders([Path("sample_data/patients")])[0]
        clinical_ratio(args.cohort, baseline, args.n, args.out)
        return
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

    # the segmentation pass on its own: windows of the training crop (the predictor's way, at the
    # default overlap and at the quarter used before session 9) against the whole grid in one pass
    # (what a crop-trained network must not be run as: see infer/windowed.py), same network and input
    pred = Predictor(device="cpu", tta=False, mc_samples=0)
    tensors = prepare_case(load_case(folders[0]), run_preprocess_config(PipelineConfig(), pred.meta))
    ct = torch.from_numpy(tensors.ct)[None].float()
    mr = torch.from_numpy(tensors.mr)[None].float()
    has = torch.tensor([True])
    roi = package_roi(pred.meta)
    ways = {
        f"windows {roi}, overlap 0.5 (default)": (roi, 0.5),
        f"windows {roi}, overlap 0.25": (roi, 0.25),
        "whole grid, one pass": (None, 0.5),
    }
    tm, out = {}, {}
    for name, (r, ov) in ways.items():
        ts = []
        for _ in range(5):
            s = time.perf_counter()
            with torch.inference_mode():
                out[name] = forward_case(pred.net, ct, mr, has, tensors.note, r, [()], overlap=ov)[0]
            ts.append(time.perf_counter() - s)
        tm[name] = statistics.median(ts)
    base = tm["whole grid, one pass"]
    print(f"segmentation pass on the {tuple(ct.shape[2:])} model grid (z, y, x), median of 5:")
    ref = out[next(iter(ways))].argmax(1)
    for name, v in tm.items():
        lab = out[name].argmax(1)
        fg = (lab > 0) | (ref > 0)
        agree = float((lab == ref)[fg].float().mean()) if bool(fg.any()) else 1.0
        print(
            f"  {name:45s} {v:.3f} s  ({v / base:.2f}× the one pass; "
            f"labels as the default's over {int(fg.sum())} foreground voxels: {agree:.3f})"
        )


if __name__ == "__main__":
    main()
