"""HD95 and surface Dice on two 256³ masks with anisotropic spacing: medfusion vs MONAI, one run.

python benchmarks/metrics.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from medfusion.evaluate.segmentation import surface_metrics


def masks(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    z, y, x = np.ogrid[:n, :n, :n]
    a = (z - 128) ** 2 / 40**2 + (y - 120) ** 2 / 60**2 + (x - 130) ** 2 / 50**2 < 1
    b = (z - 131) ** 2 / 38**2 + (y - 124) ** 2 / 62**2 + (x - 127) ** 2 / 49**2 < 1
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    a, b = masks()
    spacing = (2.0, 0.8, 0.8)
    ta, tb = (
        torch.from_numpy(a[None, None].astype(np.float32)),
        torch.from_numpy(b[None, None].astype(np.float32)),
    )
    t: dict[str, list[float]] = {"medfusion (HD95+NSD+ASSD)": [], "MONAI HD95": [], "MONAI surface Dice": []}
    for _ in range(args.repeats):
        s = time.perf_counter()
        ours = surface_metrics(a, b, spacing, 2.0)
        t["medfusion (HD95+NSD+ASSD)"].append(time.perf_counter() - s)
        s = time.perf_counter()
        hd = float(compute_hausdorff_distance(ta, tb, percentile=95, spacing=list(spacing))[0, 0])
        t["MONAI HD95"].append(time.perf_counter() - s)
        s = time.perf_counter()
        nsd = float(
            compute_surface_dice(
                ta, tb, class_thresholds=[2.0], spacing=list(spacing), include_background=True
            )[0, 0]
        )
        t["MONAI surface Dice"].append(time.perf_counter() - s)
    med = {k: statistics.median(v) for k, v in t.items()}
    print(f"256³ masks, spacing {spacing} mm, median of {args.repeats}")
    print(
        f"  values: HD95 medfusion {ours['hd95_mm']:.6f} / MONAI {hd:.6f} mm; NSD medfusion {ours['nsd']:.6f} / MONAI {nsd:.6f}"
    )
    for k, v in med.items():
        print(f"  {k:28s} {v:.3f} s")
    monai_both = med["MONAI HD95"] + med["MONAI surface Dice"]
    print(
        f"  MONAI (HD95 + surface Dice) / medfusion (all three) = {monai_both / med['medfusion (HD95+NSD+ASSD)']:.1f}×"
    )


if __name__ == "__main__":
    main()
