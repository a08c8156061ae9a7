"""A patient folder from the real head CT with an MR built from nilearn's MNI152 (issues #25, #26).

No real MR of the patient in `../shared/real-data/ge-head-ct/` exists, so one is made: the MNI152 T1
with a scalp and skull rim (`tests/mni_anatomy.t1_with_scalp`) is placed on the real head by an affine
registration of the MNI pseudo-CT to the real CT (SimpleITK, Mattes MI, on a 2 mm copy of the CT), then
moved by a known rigid motion (8°, 10 mm at most, seed 26) so that medfusion's registration has work to
do. The folder holds the CT's DICOM files (copied) and `nifti/mr_t1c.nii.gz`; `motion.txt` beside it
is the CT → MR matrix (LPS mm) of the motion, `fit.txt` the affine fit's final metric.

    python benchmarks/real_head_mr.py OUT        # writes OUT/REALHEAD_CTMR/

Needs nilearn (its wheel carries the template); nothing is downloaded. The CT is not a head of the
template's shape, so the MR's brain lies on the CT's brain only as well as an affine fit allows.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medfusion.io.case import load_case  # noqa: E402
from medfusion.io.nifti import write_nifti  # noqa: E402
from medfusion.io.volume import Volume  # noqa: E402
from tests.mni_anatomy import load_anatomy, mni_dir, moved, pseudo_ct, random_motion, t1_with_scalp  # noqa: E402

REAL_HEAD = Path(__file__).resolve().parents[2] / "shared" / "real-data" / "ge-head-ct"


def build(out: Path, real_head: Path = REAL_HEAD) -> Path:
    """Write OUT/REALHEAD_CTMR (the real CT's DICOM files and an MNI-built T1) and return it.

    Raises SystemExit when nilearn is not installed or `real_head` is missing."""
    if mni_dir() is None:
        raise SystemExit(
            "nilearn is not installed (pip install nilearn: its wheel carries the MNI152 template)"
        )
    if not real_head.exists():
        raise SystemExit(f"{real_head}: not found")
    folder = out / "REALHEAD_CTMR"
    if (folder / "nifti" / "mr_t1c.nii.gz").exists():
        return folder
    (folder / "CT").mkdir(parents=True, exist_ok=True)
    for f in real_head.glob("*.dcm"):
        shutil.copy(f, folder / "CT" / f.name)
    ct = load_case(folder).ct
    assert ct is not None
    anat = load_anatomy(1.5)
    pct = pseudo_ct(anat, np.random.default_rng(0))
    c = ct.to_sitk()
    fixed = sitk.Clamp(sitk.Cast(c, sitk.sitkFloat32), sitk.sitkFloat32, -200.0, 1500.0)
    size2 = [int(n * s / 2.0) for n, s in zip(fixed.GetSize(), fixed.GetSpacing(), strict=True)]
    fixed = sitk.Resample(
        sitk.SmoothingRecursiveGaussian(fixed, 0.8),
        size2,
        sitk.Transform(),
        sitk.sitkLinear,
        fixed.GetOrigin(),
        [2.0] * 3,
        fixed.GetDirection(),
        -200.0,
        sitk.sitkFloat32,
    )
    moving = sitk.Clamp(sitk.Cast(pct.to_sitk(), sitk.sitkFloat32), sitk.sitkFloat32, -200.0, 1500.0)
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 150)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SetInitialTransform(init, inPlace=False)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # the same file on every run
    tx = reg.Execute(fixed, moving)
    # the T1 (with scalp) in the CT frame on a 1.5 mm axis-aligned grid around the CT's centre
    size = [int(n * s / 1.5) for n, s in zip(c.GetSize(), c.GetSpacing(), strict=True)]
    size[2] = max(size[2], 100)
    centre = np.array(c.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in c.GetSize()]))
    origin = centre - np.array(size) * 1.5 / 2
    mr_ct = sitk.Resample(
        t1_with_scalp(anat).to_sitk(),
        size,
        tx,
        sitk.sitkLinear,
        origin.tolist(),
        [1.5] * 3,
        np.eye(3).ravel().tolist(),
        0.0,
        sitk.sitkFloat32,
    )
    motion = random_motion(np.random.default_rng(26), centre, deg=8.0, mm=10.0)
    mr = moved(Volume.from_sitk(mr_ct, "MR"), motion, 1.5)
    (folder / "nifti").mkdir(exist_ok=True)
    write_nifti(mr, folder / "nifti" / "mr_t1c.nii.gz")
    np.savetxt(out / "motion.txt", motion)
    (out / "fit.txt").write_text(f"affine fit metric {reg.GetMetricValue():.4f}\n")
    return folder


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
