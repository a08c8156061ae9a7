"""Ingestion against dcm2niix on reported faults: which tool reads each case right, and how fast.

For every generator of `../shared/field-cases/` (and three members of the kinds that no case covers,
made here with the same helpers), the patient folder is read by medfusion (`load_case`, then the CT
written as NIfTI, the same work as a conversion) and by dcm2niix (`-z y`), and each result is judged
against the generator's ground truth: the CT's grid (24 × 64 × 64 at 0.9 × 0.9 × 2.5 mm, or the
tilt-corrected 82 rows), probe values, and the case's own criterion. Prints one row per case, the
counts, and the median time ratio medfusion / dcm2niix over the DICOM cases.

Usage (dcm2niix from PyPI, in the benchmark's own environment, not a medfusion dependency):
    python3 -m venv /tmp/d2n && /tmp/d2n/bin/pip install dcm2niix
    .venv/bin/python benchmarks/ingestion.py --dcm2niix /tmp/d2n/bin/dcm2niix [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from medfusion.io.case import load_case
from medfusion.io.nifti import write_nifti

FIELD = Path(__file__).resolve().parents[2] / "shared" / "field-cases"
Grid = tuple[tuple[int, ...], tuple[float, ...], np.ndarray]  # shape (x, y, z), zooms, data (x, y, z)


def _extra_cases(out: Path) -> dict[str, Path]:
    """Members of the kinds that no handed case covers, written with the field cases' helpers."""
    sys.path.insert(0, str(FIELD))
    import common  # type: ignore[import-not-found]
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    made: dict[str, Path] = {}
    hu = common.head_phantom()
    # kind 2: a two-echo MR in one SeriesInstanceUID beside a CT
    p = out / "x1_two_echoes"
    common.save_all(common.series_datasets(hu, patient_id="X1"), p / "CT")
    mr = common.head_phantom(modality="MR")
    uid = "1.2.826.0.1.3680043.8.498.77"
    for echo in (1, 2):
        dss = common.series_datasets(
            mr / echo, modality="MR", patient_id="X1", series_uid=uid, series_number=5
        )
        for ds in dss:
            ds.EchoNumbers, ds.EchoTime = echo, 10 * echo
        common.save_all(dss, p / f"MR{echo}")
    made["x1_two_echoes"] = p
    # kind 4: a comma used between the values of PixelSpacing ('0.9,0.9', pydicom#173)
    p = out / "x2_comma_separator"
    dss = common.series_datasets(hu, patient_id="X2")
    for ds in dss:
        val = b"0.9,0.9 "
        ds[0x00280030] = RawDataElement(Tag(0x00280030), "DS", len(val), val, 0, False, True)
    import pydicom

    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    common.save_all(dss, p / "CT")
    made["x2_comma_separator"] = p
    # kind 1: files without the 128-byte preamble and 'DICM' (file meta first)
    p = out / "x3_no_preamble"
    common.save_all(common.series_datasets(hu, patient_id="X3"), p / "tmp")
    (p / "CT").mkdir(parents=True)
    for f in sorted((p / "tmp").iterdir()):
        (p / "CT" / f.name).write_bytes(f.read_bytes()[132:])
    shutil.rmtree(p / "tmp")
    made["x3_no_preamble"] = p
    return made


def _judge(case: str, grid: Grid | None, extra: dict[str, object]) -> tuple[bool, str]:
    """Right or wrong, and why, for the CT (or the case's own criterion)."""
    if grid is None:
        return False, "no CT volume"
    shape, zooms, data = grid
    rows_ok = shape[:2] in ((64, 64), (64, 82)) if case.startswith("05") else shape[:2] == (64, 64)
    if not rows_ok or shape[2] != 24:
        return False, f"grid {shape}"
    if not np.allclose(zooms, (0.9, 0.9, 2.5), atol=1e-3):
        return False, f"spacing {tuple(round(z, 3) for z in zooms)} (0.9, 0.9, 2.5 expected)"
    if case.startswith("05") and shape[1] != 82:
        return False, "tilt not corrected"
    if float(data[2:8, 2:4, :].max()) != -1000.0:  # the corner (overlay box in case 07) is air
        return False, f"air reads {float(data[2:8, 2:4, :].max()):.0f} HU"
    if case.startswith("10") and not extra.get("mr_refused"):
        return False, f"MR with PixelSpacing 0\\0 kept ({extra.get('mr_zooms')})"
    if case.startswith("x1") and extra.get("n_mr") != 2:
        return False, f"{extra.get('n_mr')} MR volume(s) from a two-echo series"
    return True, "right"


def _medfusion(folder: Path, work: Path) -> tuple[Grid | None, dict[str, object], float]:
    t0 = time.perf_counter()
    case = load_case(folder)
    if case.ct is not None:
        write_nifti(case.ct, work / "ct.nii.gz")
        for k, m in enumerate(case.mr):
            write_nifti(m, work / f"mr_{k}.nii.gz")
    dt = time.perf_counter() - t0
    extra: dict[str, object] = {
        "mr_refused": any("PixelSpacing" in e.problem for e in case.errors),
        "n_mr": len(case.mr),
    }
    if case.ct is None:
        return None, extra, dt
    img = nib.load(str(work / "ct.nii.gz"))
    data = np.asanyarray(img.dataobj).astype(np.float64)
    return (tuple(img.shape), tuple(float(z) for z in img.header.get_zooms()), data), extra, dt


def _dcm2niix(exe: str, folder: Path, work: Path) -> tuple[Grid | None, dict[str, object], float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(
        [exe, "-z", "y", "-f", "%s_%d_%e", "-o", str(work), str(folder)], capture_output=True, text=True
    )
    dt = time.perf_counter() - t0
    outs = sorted(work.glob("*.nii.gz"))

    def modality(p: Path) -> str:  # dcm2niix's BIDS sidecar names it
        stem = p.name[: -len(".nii.gz")].split("_Tilt_")[0]  # the tilt-corrected copy shares the sidecar
        side = p.with_name(stem + ".json")
        return str(json.loads(side.read_text()).get("Modality", "")) if side.exists() else ""

    cts = [p for p in outs if modality(p) == "CT"]
    ct = [p for p in cts if "Tilt" in p.name] or [p for p in cts if nib.load(str(p)).shape[2:3] == (24,)]
    mrs = [p for p in outs if modality(p) == "MR"]
    extra: dict[str, object] = {
        "mr_refused": not mrs,
        "mr_zooms": [tuple(float(z) for z in nib.load(str(p)).header.get_zooms()) for p in mrs],
        "n_mr": len(mrs),
    }
    warned = "pixdim" in res.stdout or "non-zero" in res.stdout
    if not ct:
        return None, extra, dt, res.stdout
    img = nib.load(str(ct[0]))
    data = np.asanyarray(img.dataobj).astype(np.float64)
    extra["warned"] = warned
    return (tuple(img.shape), tuple(float(z) for z in img.header.get_zooms()), data), extra, dt, res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dcm2niix", default=shutil.which("dcm2niix"), help="dcm2niix executable")
    ap.add_argument("--repeats", type=int, default=3, help="timed reads per case and tool")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args()
    if not FIELD.exists():
        sys.exit(f"{FIELD} not found: the field cases live in ../shared/field-cases")
    tmp = Path(tempfile.mkdtemp(prefix="ingest-"))
    cases: dict[str, Path] = {}
    for gen in sorted(FIELD.glob("[0-9][0-9]_*.py")):
        folder = tmp / gen.stem
        subprocess.run([sys.executable, str(gen), str(folder)], cwd=FIELD, check=True, capture_output=True)
        cases[gen.stem] = folder
    cases.update(_extra_cases(tmp / "extra"))
    rows = []
    ratios = []
    for name, folder in cases.items():
        dicom = any(
            p.is_file() and not p.name.endswith((".nii.gz", ".txt", ".json")) for p in folder.rglob("*")
        )
        times: dict[str, list[float]] = {"medfusion": [], "dcm2niix": []}
        verdict: dict[str, str] = {}
        for r in range(args.repeats):
            work = tmp / "work" / name / str(r)
            (work / "m").mkdir(parents=True)
            grid, extra, dt = _medfusion(folder, work / "m")
            times["medfusion"].append(dt)
            ok, why = _judge(name, grid, extra)
            verdict["medfusion"] = why
            if args.dcm2niix and dicom and not name.startswith(("12", "14")):
                (work / "d").mkdir()
                run: Callable[..., tuple[Grid | None, dict[str, object], float, str]] = _dcm2niix
                grid, extra, dt, log = run(args.dcm2niix, folder, work / "d")
                times["dcm2niix"].append(dt)
                ok, why = _judge(name, grid, extra)
                if not ok and extra.get("warned"):
                    why += " (a warning in dcm2niix's log)"
                verdict["dcm2niix"] = why
        med = {k: statistics.median(v) for k, v in times.items() if v}
        if "dcm2niix" in med:
            ratios.append(med["medfusion"] / med["dcm2niix"])
        rows.append(
            {
                "case": name,
                **{f"{k}_verdict": v for k, v in verdict.items()},
                **{f"{k}_s": v for k, v in med.items()},
            }
        )
        print(
            f"{name:28s} medfusion: {verdict['medfusion']:48s} dcm2niix: {verdict.get('dcm2niix', 'n/a (NIfTI input)')}"
        )
    for tool in ("medfusion", "dcm2niix"):
        judged = [r for r in rows if f"{tool}_verdict" in r]
        right = sum(r[f"{tool}_verdict"] == "right" for r in judged)
        print(f"{tool}: {right}/{len(judged)} cases right")
    if ratios:
        print(
            f"time medfusion (load + NIfTI) / dcm2niix, median over {len(ratios)} DICOM cases: "
            f"{statistics.median(ratios):.2f}× (range {min(ratios):.2f}–{max(ratios):.2f})"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
