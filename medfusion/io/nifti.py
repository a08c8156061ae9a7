"""NIfTI read/write through nibabel. The only place where RAS (NIfTI) meets LPS (medfusion)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medfusion.io.atomic import atomic_path
from medfusion.io.errors import InputError
from medfusion.io.volume import Volume

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
MAX_VOXELS = 1024**3  # refuse headers that claim more than this before allocating anything

_NAME_MODALITY = (("flair", "MR"), ("t1", "MR"), ("t2", "MR"), ("mr", "MR"), ("ct", "CT"))


def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def nifti_stem(path: Path) -> str:
    name = path.name
    return name[:-7] if name.lower().endswith(".nii.gz") else name[:-4]


def modality_from_name(path: Path) -> str | None:
    """Modality guessed from a file name: ct*, mr*, t1*, t2*, flair* (case-insensitive)."""
    stem = nifti_stem(path).lower()
    for prefix, modality in _NAME_MODALITY:
        if stem.startswith(prefix):
            return modality
    return None


def read_sidecar(path: Path) -> dict[str, Any]:
    """The BIDS-style JSON sidecar beside a NIfTI file, or {} when there is none."""
    side = path.with_name(nifti_stem(path) + ".json")
    if not side.exists():
        return {}
    try:
        data = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(side, f"unreadable JSON sidecar ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(side, "JSON sidecar is not an object")
    return data


def read_nifti(path: str | Path, modality: str | None = None) -> Volume:
    """Read a 3D NIfTI file into a Volume in LPS.

    The sform is used when its code is non-zero, else the qform (nibabel's ``get_best_affine``
    rule). A 4D file with one volume is squeezed; more volumes are refused.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(path, f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(path, "not a NIfTI-1/2 image")
    shape = tuple(int(s) for s in img.shape)
    if int(np.prod(shape, dtype=np.float64)) > MAX_VOXELS:
        raise InputError(path, f"header claims {shape} voxels, more than the {MAX_VOXELS} limit")
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(path, f"expected a 3D image, got shape {tuple(img.shape)}")
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except Exception as exc:
        raise InputError(path, f"truncated or corrupt voxel data ({exc})") from exc
    proxy: Any = img.dataobj
    if (
        data.dtype.kind == "f"
        or getattr(proxy, "slope", 1.0) not in (1.0, None)
        or getattr(proxy, "inter", 0.0) not in (0.0, None)
    ):
        data = data.astype(np.float32)
    affine = _RAS_TO_LPS @ img.header.get_best_affine()
    m = affine[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing <= 0):
        raise InputError(path, "affine has a zero-length axis")
    direction = m / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError(path, "affine is sheared (non-orthogonal axes); resample it first")
    sidecar = read_sidecar(path)
    mod = sidecar.get("Modality") or modality or modality_from_name(path) or "OT"
    meta: dict[str, Any] = {
        "source": str(path),
        "format": "nifti",
        "series_description": sidecar.get("SeriesDescription", nifti_stem(path)),
        "manufacturer": sidecar.get("Manufacturer", ""),
        "sidecar": sidecar,
    }
    # NIfTI (i, j, k) → SimpleITK layout (k, j, i)
    return Volume(
        np.ascontiguousarray(data.transpose(2, 1, 0)),
        tuple(spacing),
        tuple(affine[:3, 3]),
        direction,
        str(mod).upper(),
        meta,
    )


def volume_to_nifti(volume: Volume, data_xyz: np.ndarray | None = None) -> nib.Nifti1Image:
    """`volume` as NIfTI; `data_xyz` (x, y, z[, …]) replaces its array, e.g. 4-D data on its grid."""
    affine = _RAS_TO_LPS @ volume.affine
    data = volume.array.transpose(2, 1, 0) if data_xyz is None else data_xyz
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def write_probabilities(probs: np.ndarray, grid: Volume, path: str | Path, class_names: list[str]) -> Path:
    """Write (K, z, y, x) class probabilities on `grid` as one 4-D NIfTI (x, y, z, K), atomically.

    Stored as uint8 with `scl_slope` 1/255 (readers that honour the header scaling, nibabel, ITK and
    most viewers, get probabilities back to ±0.002): a quarter of float32's size before compression.
    The class order is written into the header's description."""
    if probs.ndim != 4 or probs.shape[1:] != grid.shape:
        msg = f"probabilities of shape {probs.shape} do not fit the grid {grid.shape}"
        raise ValueError(msg)
    q = np.rint(np.clip(probs, 0.0, 1.0) * 255.0).astype(np.uint8)
    out = volume_to_nifti(grid, q.transpose(3, 2, 1, 0))
    out.header.set_slope_inter(1.0 / 255.0, 0.0)
    out.header["descrip"] = ("p: " + ",".join(class_names))[:79].encode()
    with atomic_path(path) as tmp:
        nib.save(out, str(tmp))
    return Path(path)


def write_nifti(volume: Volume, path: str | Path) -> Path:
    """Write a Volume as NIfTI (RAS affine in both qform and sform), atomically."""
    with atomic_path(path) as tmp:
        nib.save(volume_to_nifti(volume), str(tmp))
    return Path(path)
