"""The diagnosis' label-map measurements (measure/features.py) against their floor and the report's own
measurements, on the model grid (128 × 128 × 96, 1.6 × 1.6 × 2 mm), in one run.

python benchmarks/measures.py [--repeats 7]

Floor: one 26-connected labelling of the foreground (scipy.ndimage.label), which any lesion-wise
measurement needs. Reference: `run/measure.measure`, the volumes and diameters the report prints.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from scipy import ndimage

from medfusion.io.volume import Volume
from medfusion.measure.features import lesion_features
from medfusion.run.measure import measure

NAMES = ["background", "tumour_core", "oedema", "calcification"]
SPACING_ZYX = (2.0, 1.6, 1.6)


def label_map(radius_mm: float) -> np.ndarray:
    """Two lesions: a core of `radius_mm` in oedema twice as wide with a calcified centre, and a
    smaller one."""
    z, y, x = np.ogrid[:96, :128, :128]
    lab = np.zeros((96, 128, 128), np.uint8)
    for (cz, cy, cx), r in (((40, 50, 60), radius_mm), ((60, 90, 80), radius_mm / 2)):
        d = np.sqrt(((z - cz) * SPACING_ZYX[0]) ** 2 + ((y - cy) * 1.6) ** 2 + ((x - cx) * 1.6) ** 2)
        lab[d <= 2 * r] = 2
        lab[d <= r] = 1
        lab[d <= r / 3] = 3
    return lab


def timed(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(
        f"{'core radius':>12} {'floor s':>9} {'features s':>11} {'report s':>9} {'feat/floor':>11} {'feat/report':>12}"
    )
    for radius in (3.0, 8.0, 20.0):
        lab = label_map(radius)
        vol = Volume(lab, spacing=(1.6, 1.6, 2.0))
        floor = timed(lambda lab=lab: ndimage.label(lab > 0, structure=np.ones((3, 3, 3))), args.repeats)
        feats = timed(lambda lab=lab: lesion_features(lab, SPACING_ZYX, NAMES), args.repeats)
        report = timed(lambda vol=vol: measure(vol, NAMES), args.repeats)
        print(
            f"{radius:>10.0f}mm {floor:>9.4f} {feats:>11.4f} {report:>9.4f} {feats / floor:>10.2f}× {feats / report:>11.2f}×"
        )
    f = lesion_features(label_map(8.0), SPACING_ZYX, NAMES)
    print(
        "features of the 8 mm case:",
        dict(zip(("present", "diam", "ratio", "calc", "lcore", "loed", "n"), f.round(2), strict=True)),
    )


if __name__ == "__main__":
    main()
