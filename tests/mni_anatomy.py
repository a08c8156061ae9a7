"""Real-anatomy CT/MR pairs built at test time from nilearn's MNI152 2009 template (in its wheel).

The template T1 is brain-extracted; the brain mask is T1 > 0.2 × max (nilearn's own definition), CSF
is the brain minus grey and white matter. The pseudo-CT gives each tissue its HU and grows CSF, a
skull and a scalp outward from the brain surface; the MR is the T1 (optionally with a scalp and skull
signal: bright fat, dark bone) seen through a known rigid motion. Nothing is written to the repository.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medfusion.io.volume import Volume
from medfusion.preprocess.registration import matrix_to_sitk, sitk_to_matrix


def mni_dir() -> Path | None:
    """nilearn's bundled data folder, or None when nilearn is not installed."""
    try:
        import nilearn
    except ImportError:
        return None
    return Path(nilearn.__file__).parent / "datasets" / "data"


@dataclasses.dataclass
class Anatomy:
    """The template's tissues on one LPS grid (arrays (nz, ny, nx), float32)."""

    t1: Volume
    gm: np.ndarray
    wm: np.ndarray


def load_anatomy(spacing_mm: float) -> Anatomy:
    """The MNI152 T1 and GM/WM probability maps, resampled to `spacing_mm` isotropic (LPS)."""
    from medfusion.io.nifti import read_nifti

    data = mni_dir()
    assert data is not None
    vols = [
        read_nifti(data / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
        for name in ("t1", "gm", "wm")
    ]
    ref = vols[0].to_sitk()
    size = [int(n * s / spacing_mm) for n, s in zip(ref.GetSize(), ref.GetSpacing(), strict=True)]
    out = [
        sitk.GetArrayFromImage(
            sitk.Resample(
                sitk.Cast(v.to_sitk(), sitk.sitkFloat32),
                size,
                sitk.Transform(),
                sitk.sitkLinear,
                ref.GetOrigin(),
                [spacing_mm] * 3,
                ref.GetDirection(),
                0.0,
                sitk.sitkFloat32,
            )
        )
        for v in vols
    ]
    t1 = Volume(out[0], (spacing_mm,) * 3, ref.GetOrigin(), np.array(ref.GetDirection()).reshape(3, 3), "MR")
    return Anatomy(t1, out[1], out[2])


def _layers(anat: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """The brain mask and each voxel's distance (mm) outside it."""
    brain = anat.t1.array > 0.2 * float(anat.t1.array.max())
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(brain, iterations=2))
    dist = ndimage.distance_transform_edt(~brain, sampling=anat.t1.spacing[::-1])
    return brain, dist.astype(np.float32)


def pseudo_ct(anat: Anatomy, rng: np.random.Generator) -> Volume:
    """HU: GM 40, WM 28, CSF 8 inside the brain; 0–3 mm CSF, 3–10 mm bone (≈ 1100), 10–16 mm scalp
    (−60 fat/soft tissue), air beyond; a little noise."""
    brain, dist = _layers(anat)
    gm, wm = anat.gm, anat.wm
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    hu = np.full(dist.shape, -1000.0, np.float32)
    hu[brain] = (40.0 * gm + 28.0 * wm + 8.0 * csf)[brain]
    hu[~brain & (dist <= 3)] = 8.0
    hu[(dist > 3) & (dist <= 10)] = 1100.0
    hu[(dist > 10) & (dist <= 16)] = -60.0
    hu = ndimage.gaussian_filter(hu, 0.6 / anat.t1.spacing[0])
    hu += rng.normal(0.0, 4.0, hu.shape).astype(np.float32)
    return anat.t1.with_array(hu.astype(np.float32), "CT")


def t1_with_scalp(anat: Anatomy) -> Volume:
    """The T1 with a head around the brain as T1 shows it: dark CSF rim and bone, bright scalp fat."""
    brain, dist = _layers(anat)
    t1 = anat.t1.array.copy()
    top = float(np.percentile(t1[brain], 99))
    t1[~brain & (dist <= 3)] = 0.1 * top
    t1[(dist > 3) & (dist <= 10)] = 0.05 * top
    t1[(dist > 10) & (dist <= 16)] = 1.1 * top
    return anat.t1.with_array(ndimage.gaussian_filter(t1, 0.5).astype(np.float32), "MR")


def moved(
    mr: Volume, matrix: np.ndarray, spacing_mm: float, slab: tuple[float, float] = (0.0, 1.0)
) -> Volume:
    """`mr` (in the CT's frame) as a scanner would see it after the motion `matrix` (CT point → MR point),
    on an axis-aligned grid of `spacing_mm`; `slab` keeps that fraction (from, to) of the head along z."""
    src = mr.to_sitk()
    lo, hi = _extent(mr)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    moved_corners = corners @ matrix[:3, :3].T + matrix[:3, 3]
    a, b = moved_corners.min(0), moved_corners.max(0)
    z0, z1 = a[2] + slab[0] * (b[2] - a[2]), a[2] + slab[1] * (b[2] - a[2])
    a[2], b[2] = z0, z1
    size = [int(n) for n in np.ceil((b - a) / spacing_mm)]
    img = sitk.Resample(
        src,
        size,
        matrix_to_sitk(np.linalg.inv(matrix)),
        sitk.sitkLinear,
        a.tolist(),
        [spacing_mm] * 3,
        np.eye(3).ravel().tolist(),
        0.0,
        sitk.sitkFloat32,
    )
    out = Volume.from_sitk(img, "MR")
    out.array = np.clip(out.array, 0, None).astype(np.float32)
    return out


def _extent(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array(
        [
            [i, j, k]
            for i in (0, vol.size_xyz[0] - 1)
            for j in (0, vol.size_xyz[1] - 1)
            for k in (0, vol.size_xyz[2] - 1)
        ]
    )
    pts = vol.index_to_world(corners.astype(float))
    return pts.min(0), pts.max(0)


def random_motion(
    rng: np.random.Generator, centre: np.ndarray, deg: float = 10.0, mm: float = 15.0
) -> np.ndarray:
    """A rigid CT → MR matrix: a rotation of up to `deg` per axis about `centre`, a shift of up to `mm`."""
    angles = np.radians(rng.uniform(-deg, deg, 3))
    tx = sitk.Euler3DTransform(centre.tolist(), *angles, rng.uniform(-mm, mm, 3).tolist())

    return sitk_to_matrix(tx)
