"""Load a 512×512×N CT series: medfusion vs SimpleITK's ImageSeriesReader vs reading the bytes (floor).

    python benchmarks/io_load.py [--slices 200] [--repeats 5]

Prints median seconds per method and medfusion's ratios; checks identical voxels and geometry.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medfusion.io.dicom import load_series, scan_folder
from medfusion.io.volume import Volume
from medfusion.synth.export import study_info, write_series


def make_series(folder: Path, slices: int) -> None:
    rng = np.random.default_rng(0)
    vol = Volume(
        np.zeros((slices, 512, 512), np.float32), (0.7, 0.7, 1.0), (-179.0, -179.0, 0.0), modality="CT"
    )
    stored = rng.integers(0, 3000, (slices, 512, 512)).astype(np.uint16)
    write_series(
        vol,
        stored,
        folder,
        study_info("BENCH", "male", 60, 0, rng),
        rng,
        modality="CT",
        series_number=1,
        description="bench",
        intercept=-1024,
    )


def medfusion_load(folder: Path) -> Volume:
    scan = scan_folder(folder)
    return load_series(scan.series[0])


def sitk_load(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def bytes_floor(folder: Path) -> int:
    return sum(len(p.read_bytes()) for p in folder.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ct"
        make_series(folder, args.slices)
        ours, ref = medfusion_load(folder), sitk_load(folder)
        same = np.array_equal(ours.array.astype(np.int32), sitk.GetArrayFromImage(ref).astype(np.int32))
        geo = ours.same_grid(Volume.from_sitk(ref), tol=1e-4)
        times: dict[str, list[float]] = {"medfusion": [], "SimpleITK": [], "bytes (floor)": []}
        for _ in range(args.repeats):
            for name, fn in (
                ("bytes (floor)", bytes_floor),
                ("SimpleITK", sitk_load),
                ("medfusion", medfusion_load),
            ):
                t = time.perf_counter()
                fn(folder)
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"512×512×{args.slices} CT series, median of {args.repeats} (warm page cache); identical voxels: {same}, geometry: {geo}"
        )
        for k, v in med.items():
            print(f"  {k:14s} {v:.3f} s")
        print(
            f"  SimpleITK / medfusion = {med['SimpleITK'] / med['medfusion']:.2f}×   medfusion / floor = {med['medfusion'] / med['bytes (floor)']:.1f}×"
        )


if __name__ == "__main__":
    main()
