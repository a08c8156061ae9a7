"""NIfTI read/write through nibabel. The only place where RAS (NIfTI) meets LPS (medfusion)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medfusion.io.atomic import atomic_path
from medfusion.io.errors import InputError
from medfusion.io.volume import MAX_VOXELS, Volume

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

_NAME_MODALITY = (("flair", "MR"), ("t1", "MR"), ("t2", "MR"), ("mr", "MR"), ("ct", "CT"))


def is_nifti(path: Path) -> bool:
    """Whether the file name ends in .nii or .nii.gz (any case); the content is not read."""
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def nifti_stem(path: Path) -> str:
    """The file name without .nii or .nii.gz ("ct.nii.gz" → "ct"); `path` must be a NIfTI name."""
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
    """The BIDS-style JSON sidecar beside a NIfTI file, or {} when there is none.

    Raises:
        InputError: the sidecar exists but is unreadable, not JSON, or not a JSON object.
    """
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
    rule). A 4D file with one volume is squeezed; more volumes are refused. Voxels are normalised
    on read and every change is reported in ``Volume.warnings``:

    - NaN/±Inf voxels are replaced by the background value (0, or the smallest finite voxel when
      that is negative, as a CT's air), counted;
    - non-native byte order and unusual dtypes (int64, uint32, float64, bool, …) become native
      int16/int32/float32 (float32 when the values do not fit an integer type exactly);
    - scl_slope/scl_inter are applied (the result is float32), noted in ``meta["notes"]``;
    - qform_code = sform_code = 0 (no spatial transform: orientation and position unknown) and a
      qform that disagrees with the sform (> 1 mm or > 1°) are warned about.

    Raises:
        InputError: unreadable file, not 3D, complex or RGB voxels, every voxel NaN, a sheared or
            degenerate affine, or a header claiming more than `MAX_VOXELS` voxels.
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
    while len(shape) > 3 and shape[-1] == 1:  # (x, y, z, 1[, 1…]): one volume
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(path, f"expected a 3D image, got shape {tuple(img.shape)}")
    stored = img.get_data_dtype()
    if stored.kind == "c" or stored.fields is not None or stored.kind not in "biuf":
        raise InputError(path, f"voxel type {stored} (complex or RGB) cannot be read as one intensity")
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except Exception as exc:
        raise InputError(path, f"truncated or corrupt voxel data ({exc})") from exc
    warnings: list[str] = []
    notes: list[str] = []
    proxy: Any = img.dataobj
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    if slope not in (1.0, None) or inter not in (0.0, None):
        notes.append(f"scl_slope {float(slope):g} / scl_inter {float(inter):g} applied")
    data = _normalise_voxels(path, data, warnings)
    transform_warnings = _transform_warnings(img)
    warnings.extend(transform_warnings)
    best = img.header.get_best_affine()
    if _sheared(best) and int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0:
        # a sheared sform cannot hold a Volume; the qform (rotation + zooms by construction) can
        warnings.append("sform is sheared (non-orthogonal axes); the qform is used instead")
        best = img.header.get_qform()
    affine = _RAS_TO_LPS @ best
    m = affine[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(m)):
        raise InputError(path, "affine has a zero-length or non-finite axis")
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
        "notes": notes,
        # no qform/sform: written back without a transform too (volume_to_nifti), never as if known
        "orientation_unknown": any(w.startswith("no spatial transform") for w in transform_warnings),
    }
    # NIfTI (i, j, k) → SimpleITK layout (k, j, i)
    vol = Volume(
        np.ascontiguousarray(data.transpose(2, 1, 0)),
        tuple(spacing),
        tuple(affine[:3, 3]),
        direction,
        str(mod).upper(),
        meta,
    )
    vol.warnings.extend(warnings)
    return vol


def _sheared(affine: np.ndarray) -> bool:
    m = affine[:3, :3]
    n = np.linalg.norm(m, axis=0)
    if np.any(n <= 0):
        return False
    d = m / n
    return not np.allclose(d.T @ d, np.eye(3), atol=1e-4)


def _normalise_voxels(path: Path, data: np.ndarray, warnings: list[str]) -> np.ndarray:
    """Native byte order, a dtype the pipeline handles, and no NaN/Inf (see `read_nifti`)."""
    if data.dtype.byteorder not in ("=", "|") and data.dtype.byteorder != ("<" if np.little_endian else ">"):
        data = data.astype(data.dtype.newbyteorder("="))
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    if data.dtype.kind == "f":
        if data.dtype != np.float32:
            data = data.astype(np.float32)
        bad = ~np.isfinite(data)
        n_bad = int(bad.sum())
        if n_bad:
            if n_bad == data.size:
                raise InputError(path, "every voxel is NaN or infinite")
            # NaN marks "no data" (masked background): 0 for a non-negative image, else its minimum
            background = min(0.0, float(np.min(data[~bad])))
            data = np.where(bad, np.float32(background), data)
            warnings.append(
                f"{n_bad} NaN/Inf voxel(s) ({100.0 * n_bad / data.size:.1f} %) replaced by the "
                f"background value {background:g}"
            )
        return data
    if data.dtype.itemsize > 4 or data.dtype == np.uint32:
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        if -(2**31) <= lo and hi < 2**31:
            return data.astype(np.int32)
        warnings.append(f"{data.dtype} voxels beyond the int32 range stored as float32 (rounded)")
        return data.astype(np.float32)
    return data


def _transform_warnings(img: Any) -> list[str]:
    """Warnings about the header's spatial transform (qform/sform codes and agreement)."""
    header = img.header
    q_code, s_code = int(header["qform_code"]), int(header["sform_code"])
    if q_code == 0 and s_code == 0:
        return [
            "no spatial transform (qform_code = sform_code = 0): orientation and position are "
            "unknown; read with the voxel sizes only (axes assumed LAS, NIfTI's fall-back), "
            "so registration starts from a guess and left/right may be wrong"
        ]
    if q_code > 0 and s_code > 0 and not _sheared(header.get_sform()):
        q, s = header.get_qform(), header.get_sform()
        shift = float(np.linalg.norm(q[:3, 3] - s[:3, 3]))
        qa = q[:3, :3] / np.linalg.norm(q[:3, :3], axis=0)
        sa = s[:3, :3] / np.linalg.norm(s[:3, :3], axis=0)
        cos = np.clip((np.trace(qa.T @ sa) - 1.0) / 2.0, -1.0, 1.0)
        angle = float(np.degrees(np.arccos(cos)))
        if shift > 1.0 or angle > 1.0:
            return [
                f"qform and sform disagree by {shift:.1f} mm and {angle:.1f}°; the sform is used "
                "(nibabel's rule) — check which one the writer meant"
            ]
    return []


def volume_to_nifti(volume: Volume, data_xyz: np.ndarray | None = None) -> nib.Nifti1Image:
    """`volume` as NIfTI (LPS → RAS affine in qform and sform, code 1; 0 when the orientation was
    unknown on input). The array is stored (x, y, z), or (x, y, z, C) for a volume with channels;
    `data_xyz` replaces it (same grid)."""
    affine = _RAS_TO_LPS @ volume.affine
    if data_xyz is not None:
        data = data_xyz
    else:
        data = (
            volume.array.transpose(3, 2, 1, 0) if volume.array.ndim == 4 else volume.array.transpose(2, 1, 0)
        )
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    code = 0 if volume.meta.get("orientation_unknown") else 1
    img.header.set_qform(affine, code=code)
    img.header.set_sform(affine, code=code)
    img.header.set_xyzt_units("mm")
    return img


def write_probabilities(probabilities: Volume, path: str | Path, class_names: list[str]) -> Path:
    """Write (K, z, y, x) class probabilities (a `Volume` with channels) as one 4-D NIfTI (x, y, z, K),
    atomically.

    Stored as uint8 with `scl_slope` 1/255 (readers that honour the header scaling, nibabel, ITK and
    most viewers, get probabilities back to ±0.002): a quarter of float32's size before compression.
    The class order is written into the header's description.

    Raises:
        ValueError: the volume has no channel axis, or not one channel per class.
    """
    if probabilities.array.ndim != 4 or probabilities.channels != len(class_names):
        msg = f"probabilities of shape {probabilities.array.shape} do not hold one channel per class ({len(class_names)})"
        raise ValueError(msg)
    q = np.rint(np.clip(probabilities.array, 0.0, 1.0) * 255.0).astype(np.uint8)
    out = volume_to_nifti(probabilities, q.transpose(3, 2, 1, 0))
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
