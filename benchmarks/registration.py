"""MR→CT registration on synthetic pairs with known truth: medfusion vs the SimpleITK tutorial recipe
(Mattes MI, 1 % random sampling, plain gradient descent, geometry-centred start), same pairs, same
error measure (TRE at 20 random points inside the CT head mask).

    python benchmarks/registration.py --cohort DIR [--n 10]

    python benchmarks/registration.py --size clinical --cohort CLINICAL_DIR --baseline-cohort STANDARD_DIR [--n 10]

`--size clinical`: the cost of the matrix. Each pair of the clinical-size cohort (`medfusion synth --size
clinical`) and of the standard-size one is registered in the same run; medians and their ratio, TRE
against the generator's truth, and the process's peak RSS are printed.

    python benchmarks/registration.py --cohort DIR --n 10 \
        --ants-python /path/to/ants-venv/bin/python --elastix-python /path/to/elastix-venv/bin/python

ANTsPy and itk-elastix are not dependencies of medfusion (≈ 650 MB and ≈ 1.6 GB). Give the Python of a
separate environment that has them (`pip install antspyx` / `pip install itk-elastix`) and each pair
is also registered there, with that tool's own default rigid settings (benchmarks/external/): the
pair goes over as NIfTI, the fixed→moving matrix comes back, and the time of the registration call
alone is counted (not the interpreter start or the file reads). `--greedy-python` (`pip install
picsl-greedy`: Greedy's rigid mode with NMI and a random rotation search) and `--simpleelastix-python`
(`pip install simpleitk-simpleelastix`: elastix's default rigid map through SimpleITK, ≈ 0.4 GB
instead of itk-elastix's 1.7 GB) work the same way.

    python benchmarks/registration.py --mni --motions 20

Real anatomy (#24): pairs built from nilearn's MNI152 template as tests/mni_anatomy.py builds them (a
pseudo-CT with skull and scalp; the T1 brain-only, with a scalp and skull signal, as a slab of 40-60 %
of the head, and at 1 mm instead of 1.5 mm), each variant under MOTIONS random known rigid motions;
median TRE and the QC's verdicts (every one of these registrations is right, so a failed QC is a
false alarm). Nothing is written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medfusion.config import RegistrationConfig
from medfusion.io.case import load_case
from medfusion.preprocess.registration import (
    quality_check,
    register,
    sitk_to_matrix,
    target_registration_error,
)


def tutorial_recipe(ct: sitk.Image, mr: sitk.Image) -> np.ndarray:
    fixed, moving = sitk.Cast(ct, sitk.sitkFloat32), sitk.Cast(mr, sitk.sitkFloat32)
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.01, 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsGradientDescent(
        learningRate=1.0, numberOfIterations=100, convergenceMinimumValue=1e-6, convergenceWindowSize=10
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(init, inPlace=False)
    return sitk_to_matrix(reg.Execute(fixed, moving))


EXTERNAL = Path(__file__).resolve().parent / "external"


def external(python: str, script: str, case: Any, tmp: Path) -> tuple[np.ndarray, float]:
    from medfusion.io.nifti import write_nifti

    fixed, moving = tmp / "ct.nii.gz", tmp / "mr.nii.gz"
    if not fixed.exists():
        write_nifti(case.ct, fixed)
        write_nifti(case.mr[0], moving)
    out = subprocess.run(
        [python, str(EXTERNAL / script), str(fixed), str(moving)], capture_output=True, text=True, check=True
    )
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    return np.asarray(rec["matrix_lps"]), float(rec["seconds"])


def run_method(name: str, case: Any) -> Any:
    if name == "medfusion":
        return register(case.ct, case.mr[0], RegistrationConfig(consistency_check=False)).matrix
    if name == "medfusion (+QC)":
        return register(case.ct, case.mr[0], RegistrationConfig())
    if name == "medfusion, no polishing pass (≤ 0.4)":
        cfg = RegistrationConfig(consistency_check=False, polish_iterations=0)
        return register(case.ct, case.mr[0], cfg).matrix
    return tutorial_recipe(case.ct.to_sitk(), case.mr[0].to_sitk())


REAL = Path(__file__).resolve().parents[2] / "shared" / "real-data"
WRONG_KINDS = (
    "spoiled transform",
    "another patient's MR",
    "MR outside the CT's field of view",
    "abdominal CT",
)


def qc_on_wrong_inputs(cohort: Path, pids: list[str], seed: int = 5) -> None:
    """The QC's verdict on wrong inputs, one kind per pair in turn (`WRONG_KINDS`): the true transform
    spoiled by a random 6-12° rotation and 6-12 mm shift; the MR of the next patient of the cohort (under
    this pair's true transform); the MR moved 300 mm along the patient (under the true transform); the real
    abdominal CT of ../shared/real-data/abdomen-ct with this head MR (registered, then checked; skipped
    when that folder is absent). Every one should fail."""
    import dataclasses

    rng = np.random.default_rng(seed)
    cfg = RegistrationConfig()
    abdomen = REAL / "abdomen-ct" / "dicom"
    abd_ct = load_case(abdomen).ct if abdomen.exists() else None
    kinds = [k for k in WRONG_KINDS if k != "abdominal CT" or abd_ct is not None]
    caught: dict[str, list[bool]] = {k: [] for k in kinds}
    for i, pid in enumerate(pids):
        kind = kinds[i % len(kinds)]
        case = load_case(cohort / "patients" / pid)
        assert case.ct is not None
        truth = np.array(
            json.loads((cohort / "labels" / pid / "truth.json").read_text())["registration"]["matrix_lps"]
        )
        ct, mr, matrix = case.ct, case.mr[0], truth
        if kind == "spoiled transform":
            axis = rng.normal(size=3)
            angle = np.radians(rng.uniform(6, 12))
            rot = sitk.VersorTransform((axis / np.linalg.norm(axis)).tolist(), float(angle))
            shift = rng.normal(size=3)
            shift *= rng.uniform(6, 12) / np.linalg.norm(shift)
            matrix = truth.copy()
            matrix[:3, :3] = truth[:3, :3] @ np.array(rot.GetMatrix()).reshape(3, 3)
            matrix[:3, 3] += shift
        elif kind == "another patient's MR":
            names = sorted(p.name for p in (cohort / "patients").iterdir())
            other = load_case(cohort / "patients" / names[(names.index(pid) + 1) % len(names)])
            mr = other.mr[0]
        elif kind == "MR outside the CT's field of view":
            mr = dataclasses.replace(mr, origin=(mr.origin[0], mr.origin[1], mr.origin[2] - 300.0))
        if kind == "abdominal CT":
            assert abd_ct is not None
            qc = register(abd_ct, mr, cfg).qc
        else:
            qc = quality_check(ct, mr, matrix, cfg)
        caught[kind].append(not qc["passed"])
        verdict = "fail" if not qc["passed"] else "PASS (missed)"
        values = {k: c["value"] for k, c in qc["checks"].items()}
        print(pid, kind, verdict, values, flush=True)
    total = sum(sum(v) for v in caught.values())
    print(f"\nQC failed {total} of {len(pids)} wrong inputs")
    for kind, v in caught.items():
        print(f"  {kind:36s} {sum(v)} of {len(v)}")


def size_ratio(clinical: Path, standard: Path, n: int) -> None:
    """Registration time and TRE per pair at clinical and at standard size, same run, same settings."""
    import resource

    cfg = RegistrationConfig(consistency_check=False)
    rows: dict[str, dict[str, list[float]]] = {}
    for label, cohort in (("standard", standard), ("clinical", clinical)):
        rows[label] = {"s": [], "tre": [], "worst": []}
        for pid in sorted(p.name for p in (cohort / "patients").iterdir())[:n]:
            case = load_case(cohort / "patients" / pid)
            assert case.ct is not None
            truth = np.array(
                json.loads((cohort / "labels" / pid / "truth.json").read_text())["registration"]["matrix_lps"]
            )
            t = time.perf_counter()
            res = register(case.ct, case.mr[0], cfg)
            dt = time.perf_counter() - t
            e = target_registration_error(res.matrix, truth, case.ct, n=20)
            rows[label]["s"].append(dt)
            rows[label]["tre"].append(float(np.median(e)))
            rows[label]["worst"].append(float(e.max()))
            print(label, pid, case.ct.shape, f"{dt:.1f} s, TRE median {np.median(e):.2f} mm", flush=True)
    print(f"\n{'size':10s} {'pairs':>5s} {'median s':>9s} {'median TRE':>10s} {'worst pt':>9s}")
    for label, v in rows.items():
        print(
            f"{label:10s} {len(v['s']):5d} {statistics.median(v['s']):9.2f} "
            f"{statistics.median(v['tre']):10.2f} {max(v['worst']):9.2f}"
        )
    ratio = statistics.median(rows["clinical"]["s"]) / statistics.median(rows["standard"]["s"])
    print(f"clinical / standard median time: {ratio:.2f}×")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


MNI_VARIANTS = ("brain-only", "with scalp", "slab 40-60 %", "1 mm MR")


def mni_variants(motions: int, seed: int = 11, only: tuple[str, ...] = MNI_VARIANTS) -> None:
    """Each real-anatomy variant under `motions` random rigid motions: TRE (50 CT head points) and the QC.

    `only`: the variants to run (each keeps its own random draws, so a variant's pairs are the same
    whether it runs alone or with the others)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.mni_anatomy import load_anatomy, mni_dir, moved, pseudo_ct, random_motion, t1_with_scalp

    if mni_dir() is None:
        raise SystemExit(
            "nilearn is not installed (pip install nilearn: its wheel carries the MNI152 template)"
        )
    anat = load_anatomy(2.0)
    scalp = t1_with_scalp(anat)
    rows: dict[str, dict[str, list[Any]]] = {}
    for index, variant in enumerate(MNI_VARIANTS):
        if variant not in only:
            continue
        rng = np.random.default_rng([seed, index])
        rows[variant] = {"tre": [], "worst": [], "s": [], "failed_qc": []}
        for k in range(motions):
            ct = pseudo_ct(anat, rng)
            centre = ct.index_to_world((np.array(ct.size_xyz, float)[None] - 1) / 2)[0]
            truth = random_motion(rng, centre)
            slab = (0.0, 1.0)
            if variant.startswith("slab"):
                frac = rng.uniform(0.4, 0.6)
                start = rng.uniform(0.0, 1.0 - frac)
                slab = (start, start + frac)
            mr = moved(
                anat.t1 if variant == "brain-only" else scalp,
                truth,
                1.0 if variant == "1 mm MR" else 1.5,
                slab,
            )
            t = time.perf_counter()
            res = register(ct, mr, RegistrationConfig())
            dt = time.perf_counter() - t
            e = target_registration_error(res.matrix, truth, ct, n=50)
            rows[variant]["tre"].append(float(np.median(e)))
            rows[variant]["worst"].append(float(e.max()))
            rows[variant]["s"].append(dt)
            rows[variant]["failed_qc"].append(not res.passed)
            print(
                variant,
                k,
                f"slab {slab[0]:.2f}-{slab[1]:.2f}",
                f"{dt:.1f} s, TRE median {np.median(e):.2f} mm",
                "QC",
                "passed" if res.passed else f"FAILED {res.qc['reasons']}",
                flush=True,
            )
    print(
        f"\n{'variant':14s} {'pairs':>5s} {'median TRE':>10s} {'worst pt':>9s} {'median s':>9s} "
        f"{'> 1.5 mm':>8s} {'QC false alarms':>16s} {'QC misses':>10s}"
    )
    # a pair whose own median TRE is over 1.5 mm is a failed registration: the QC should fail it (a
    # miss if it passes); a failed QC on a pair under 1.5 mm is a false alarm
    for variant, v in rows.items():
        bad = [t > 1.5 for t in v["tre"]]
        print(
            f"{variant:14s} {len(v['s']):5d} {statistics.median(v['tre']):10.2f} {max(v['worst']):9.2f} "
            f"{statistics.median(v['s']):9.2f} {sum(bad):8d} "
            f"{sum(f and not b for b, f in zip(bad, v['failed_qc'], strict=True)):16d} "
            f"{sum(b and not f for b, f in zip(bad, v['failed_qc'], strict=True)):10d}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cohort", type=Path)
    ap.add_argument("--size", choices=["standard", "clinical"], default="standard")
    ap.add_argument("--baseline-cohort", type=Path, help="standard-size cohort for --size clinical")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--ants-python", help="Python of an environment with antspyx")
    ap.add_argument("--elastix-python", help="Python of an environment with itk-elastix")
    ap.add_argument("--greedy-python", help="Python of an environment with picsl-greedy")
    ap.add_argument("--simpleelastix-python", help="Python of an environment with simpleitk-simpleelastix")
    ap.add_argument("--mni", action="store_true", help="real-anatomy pairs from nilearn's MNI152 instead")
    ap.add_argument("--motions", type=int, default=20, help="random motions per variant for --mni")
    ap.add_argument(
        "--mni-variant",
        action="append",
        choices=MNI_VARIANTS,
        help="run only this --mni variant (repeatable; default: all four)",
    )
    ap.add_argument(
        "--only-medfusion",
        action="store_true",
        help="medfusion with its QC only (a large-n TRE run: its TRE and how its verdict flags failures)",
    )
    ap.add_argument(
        "--no-variants",
        action="store_true",
        help="medfusion's default registration and the external tools only (no QC, no older variants)",
    )
    ap.add_argument("--start", type=int, default=0, help="skip the first START patients of the cohort")
    ap.add_argument(
        "--qc-wrong",
        action="store_true",
        help="the QC's sensitivity instead: its verdict on wrong inputs, one kind per pair in turn (a spoiled "
        "transform, another patient's MR, an MR outside the CT's field of view, the real abdominal CT; every "
        "one should fail)",
    )
    args = ap.parse_args()
    externals = {
        name: (py, script)
        for name, py, script in (
            ("ANTsPy rigid", args.ants_python, "ants_rigid.py"),
            ("itk-elastix rigid", args.elastix_python, "elastix_rigid.py"),
            ("Greedy rigid", args.greedy_python, "greedy_rigid.py"),
            ("SimpleElastix rigid", args.simpleelastix_python, "elastix_sitk_rigid.py"),
        )
        if py
    }
    if args.mni:
        mni_variants(args.motions, only=tuple(args.mni_variant or MNI_VARIANTS))
        return
    if args.cohort is None:
        ap.error("--cohort is needed (except with --mni)")
    if args.size == "clinical":
        if args.baseline_cohort is None:
            ap.error("--size clinical needs --baseline-cohort (a standard-size cohort)")
        size_ratio(args.cohort, args.baseline_cohort, args.n)
        return
    pids = sorted(p.name for p in (args.cohort / "patients").iterdir())[args.start : args.start + args.n]
    if args.qc_wrong:
        qc_on_wrong_inputs(args.cohort, pids)
        return
    res: dict[str, dict[str, list[float]]] = {
        "medfusion": {"err": [], "worst": [], "s": []},
        "medfusion (+QC)": {"err": [], "worst": [], "s": []},
        "medfusion, no polishing pass (≤ 0.4)": {"err": [], "worst": [], "s": []},
        "SimpleITK tutorial": {"err": [], "worst": [], "s": []},
        **{name: {"err": [], "worst": [], "s": []} for name in externals},
    }
    if args.only_medfusion:
        res = {k: v for k, v in res.items() if k == "medfusion (+QC)"}
    elif args.no_variants:
        res = {k: v for k, v in res.items() if k == "medfusion" or k in externals}
    fails = 0
    flagged: list[bool] = []
    for pid in pids:
        case = load_case(args.cohort / "patients" / pid)
        truth = np.array(
            json.loads((args.cohort / "labels" / pid / "truth.json").read_text())["registration"][
                "matrix_lps"
            ]
        )
        assert case.ct is not None
        tmp = Path(tempfile.mkdtemp())
        for name in res:
            t = time.perf_counter()
            out: Any
            if name in externals:
                out, dt = external(*externals[name], case, tmp)
            else:
                out = run_method(name, case)
                dt = time.perf_counter() - t
            if name == "medfusion (+QC)":
                fails += int(not out.passed)
                flagged.append(not out.passed)
                m = out.matrix
            else:
                m = out
            e = target_registration_error(m, truth, case.ct, n=20)
            res[name]["err"].append(float(np.mean(e)))
            res[name]["worst"].append(float(np.max(e)))
            res[name]["s"].append(dt)
        shutil.rmtree(tmp)
        print(pid, {k: round(v["err"][-1], 2) for k, v in res.items()}, flush=True)
    print(f"\n{len(pids)} pairs; TRE = mean over 20 head points per pair")
    print(f"{'method':34s} {'median TRE':>10s} {'p95 TRE':>8s} {'worst pt':>9s} {'median s':>9s}")
    for k, v in res.items():
        print(
            f"{k:34s} {statistics.median(v['err']):10.2f} {np.percentile(v['err'], 95):8.2f} {max(v['worst']):9.2f} {statistics.median(v['s']):9.2f}"
        )
    ours = res["medfusion"] if "medfusion" in res else res["medfusion (+QC)"]
    for name, v in res.items():
        if name.startswith("medfusion"):
            continue
        print(
            f"{name} / medfusion: error {statistics.median(v['err']) / statistics.median(ours['err']):.2f}×, "
            f"time {statistics.median(v['s']) / statistics.median(ours['s']):.2f}×"
        )
    if "medfusion (+QC)" not in res:
        return
    qc_err = res["medfusion (+QC)"]["err"]
    bad = [e > 2.0 for e in qc_err]
    print(
        f"QC verdicts 'fail': {fails} of {len(pids)}; registrations with TRE > 2 mm: {sum(bad)}, "
        f"of which flagged: {sum(b and f for b, f in zip(bad, flagged, strict=True))}; "
        f"flagged with TRE ≤ 2 mm (false alarms): {sum(f and not b for b, f in zip(bad, flagged, strict=True))}"
    )


if __name__ == "__main__":
    main()
