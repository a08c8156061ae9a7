"""Is `medfusion run` repeatable? The same patients run twice (what `make demo` runs), then every JSON
number and every label map compared (issue #25).

    python benchmarks/determinism.py sample_data/patients --work /tmp/det [--device cpu] [-- RUN OPTIONS]

Each run is its own `medfusion run` process (`WORK/A`, `WORK/B`; existing outputs are reused, so a
stopped comparison can be resumed). Compared per patient: every `*.json` output with the fields that
are times or dates removed (`timings_s`, `seconds`, `created`, ... and any key containing "time" or
"second") and the output folder's path replaced, then every `*.nii.gz` output voxel for voxel (the
decoded array's bytes) with its affine. Prints one line per file, the time of each run and their ratio,
and exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

VOLATILE = {"timings_s", "seconds", "created", "started", "finished", "run_id", "elapsed_s", "generated"}


def strip(x: Any, outs: tuple[str, ...]) -> Any:
    """`x` without its time and date fields, the run folders' paths replaced by "OUT"."""
    if isinstance(x, dict):
        return {
            k: strip(v, outs)
            for k, v in x.items()
            if k not in VOLATILE and "time" not in k.lower() and "second" not in k.lower()
        }
    if isinstance(x, list):
        return [strip(v, outs) for v in x]
    if isinstance(x, str):
        for o in outs:
            x = x.replace(o, "OUT")
    return x


def diff(x: Any, y: Any, path: str = "") -> list[str]:
    """Where two JSON values differ, one line per leaf (numbers compared exactly)."""
    if type(x) is not type(y):
        return [f"{path}: {x!r} vs {y!r}"]
    if isinstance(x, dict):
        out = []
        for k in sorted(set(x) | set(y)):
            if k not in x or k not in y:
                out.append(f"{path}/{k}: only in one")
            else:
                out += diff(x[k], y[k], f"{path}/{k}")
        return out
    if isinstance(x, list):
        if len(x) != len(y):
            return [f"{path}: length {len(x)} vs {len(y)}"]
        return [d for i, (u, v) in enumerate(zip(x, y, strict=True)) for d in diff(u, v, f"{path}[{i}]")]
    return [] if x == y else [f"{path}: {x!r} vs {y!r}"]


def compare(a: Path, b: Path) -> int:
    """Print the comparison of two run folders; returns the number of files that differ."""
    outs = (str(a), str(b))
    bad = 0
    for pa in sorted(p for p in a.iterdir() if p.is_dir()):
        pb = b / pa.name
        for j in sorted(pa.glob("*.json")):
            d = diff(
                strip(json.loads(j.read_text()), outs), strip(json.loads((pb / j.name).read_text()), outs)
            )
            bad += bool(d)
            print(pa.name, j.name, "identical" if not d else f"{len(d)} differences: " + "; ".join(d[:5]))
        for n in sorted(pa.glob("*.nii.gz")):
            x, y = nib.load(n), nib.load(pb / n.name)
            ax, ay = np.asarray(x.dataobj), np.asarray(y.dataobj)
            same = ax.tobytes() == ay.tobytes() and np.array_equal(x.affine, y.affine)
            bad += not same
            print(
                pa.name,
                n.name,
                "voxels and affine identical" if same else "DIFFERENT",
                f"({int((ax > 0).sum())} non-zero voxels)",
            )
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("patients", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("run_options", nargs="*", help="more `medfusion run` options (after --)")
    args = ap.parse_args()
    exe = Path(sys.executable).with_name("medfusion")
    seconds = []
    for name in ("A", "B"):
        out = args.work / name
        if (out / "summary.csv").exists():
            print(f"{out}: reused")
            continue
        t = time.perf_counter()
        cmd = [
            str(exe),
            "run",
            str(args.patients),
            "--out",
            str(out),
            "--device",
            args.device,
            *args.run_options,
        ]
        subprocess.run(cmd, check=True)
        seconds.append(time.perf_counter() - t)
        print(f"run {name}: {seconds[-1]:.0f} s")
    if len(seconds) == 2:
        print(f"run B / run A time: {seconds[1] / seconds[0]:.2f}×")
    bad = compare(args.work / "A", args.work / "B")
    print("all outputs identical" if not bad else f"{bad} files differ")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
