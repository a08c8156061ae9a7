"""Registration on SimpleITK's default thread count against one thread, in one run: does one thread
make the same registration repeat bit for bit, and what does it cost?

python benchmarks/registration_threads.py [--repeats 5]

One small synthetic pair (the test suite's first patient: `synth` preset "small", seed 11, DICOM MR).
The settings alternate call by call (default, one thread, default, …), so a machine's load drifts over
both alike. Reported per setting: the median seconds of `register` (estimate + QC), the largest
difference of any matrix entry between its calls and the largest displacement between its transforms
(`target_registration_error`, mm); then the ratio of the medians (one thread / default).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medfusion.config import RegistrationConfig
from medfusion.io.case import load_case
from medfusion.io.volume import Volume
from medfusion.preprocess.registration import RegistrationResult, register, target_registration_error
from medfusion.synth.generate import generate_cohort


def spread(results: list[RegistrationResult], ct: Volume) -> tuple[float, float]:
    """The largest matrix-entry difference and the largest TRE (mm) of each result to the first."""
    first = results[0]
    entry = max(float(np.abs(r.matrix - first.matrix).max()) for r in results)
    tre = max(float(target_registration_error(r.matrix, first.matrix, ct, n=50).max()) for r in results)
    return entry, tre


def main() -> None:
    """Register the pair `--repeats` times per setting, alternating, and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    default_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    with tempfile.TemporaryDirectory() as tmp:
        generate_cohort(Path(tmp), 1, seed=11, preset="small", workers=1, plan={0: {"mr_format": "dicom"}})
        folder = next((Path(tmp) / "patients").iterdir())
        case = load_case(folder)
        assert case.ct is not None and case.mr
        ct, mr = case.ct, case.mr[0]
        register(ct, mr, RegistrationConfig())  # warm-up: imports, first allocations
        runs: dict[int, list[RegistrationResult]] = {default_threads: [], 1: []}
        for _ in range(args.repeats):
            for threads in (default_threads, 1):
                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
                runs[threads].append(register(ct, mr, RegistrationConfig()))
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(default_threads)
    med = {t: statistics.median(r.seconds for r in rs) for t, rs in runs.items()}
    for threads, rs in runs.items():
        entry, tre = spread(rs, ct)
        qc_same = all(r.qc == rs[0].qc for r in rs)
        print(
            f"{threads} thread(s): median {med[threads]:.2f} s over {len(rs)} calls; largest matrix-entry "
            f"difference {entry:.3g}, largest TRE between calls {tre:.3g} mm; QC records identical: {qc_same}"
        )
    print(f"ratio one thread / default ({default_threads}): {med[1] / med[default_threads]:.2f}")


if __name__ == "__main__":
    main()
