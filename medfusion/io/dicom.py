"""DICOM discovery and series loading.

Files are recognised by content (the ``DICM`` magic after the 128-byte preamble, or a dataset that
starts with a group-0008 tag), at any depth, whatever their names. Series are grouped by
SeriesInstanceUID, sorted along the slice normal, and rescaled. Uncompressed little-endian pixel
data is read straight into the output array by threads (file reads release the GIL); every other
transfer syntax goes through pydicom's decoder plugins (gdcm, pylibjpeg-openjpeg, pylibjpeg-rle).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medfusion.io.errors import InputError
from medfusion.io.volume import Volume

MAX_VOXELS = 1024**3  # a header that claims more than this is refused before allocation
_UNCOMPRESSED_LE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"

# SOP classes that are not images: listed and skipped.
NON_IMAGE_SOP = {
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State",
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
}
_NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.481.",
)
_SKIP_SUFFIXES = (".nii", ".nii.gz", ".json", ".txt", ".md", ".csv", ".png", ".jpg", ".pdf", ".py")

# --- Types ---


@dataclasses.dataclass
class DicomFile:
    """What one file's header says, read without its pixel data."""

    path: Path
    series_uid: str
    sop_class: str
    sop_uid: str
    modality: str
    rows: int
    columns: int
    frames: int
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    slope: float
    intercept: float
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    samples: int
    transfer_syntax: str
    pixel_offset: int | None  # byte offset of the pixel values, for the direct-read path
    header: Dataset

    @property
    def is_image(self) -> bool:
        return non_image_kind(self.sop_class) is None and self.rows > 0 and self.columns > 0


@dataclasses.dataclass
class DicomSeries:
    uid: str
    files: list[DicomFile]

    @property
    def first(self) -> DicomFile:
        return self.files[0]

    @property
    def modality(self) -> str:
        return self.first.modality

    @property
    def description(self) -> str:
        return str(self.first.header.get("SeriesDescription", ""))

    @property
    def is_image(self) -> bool:
        return self.first.is_image


@dataclasses.dataclass
class DicomScan:
    """Result of scanning a folder: image series, skipped non-image objects, and unreadable files."""

    series: list[DicomSeries]
    skipped: list[tuple[str, str]]  # (path, why)
    errors: list[InputError]


def non_image_kind(sop_class: str) -> str | None:
    if sop_class in NON_IMAGE_SOP:
        return NON_IMAGE_SOP[sop_class]
    if sop_class.startswith(_NON_IMAGE_PREFIXES):
        return "non-image object"
    return None


# --- Discovery ---


def looks_like_dicom(path: Path) -> bool:
    """True for a DICOM Part 10 file (preamble + DICM) or a bare dataset starting with group 0008."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    return (
        len(head) >= 8
        and head[:2] in (b"\x08\x00", b"\x00\x08")
        and head[2:4] in (b"\x05\x00", b"\x08\x00", b"\x16\x00", b"\x00\x05", b"\x00\x08")
    )


def iter_candidate_files(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.lower().endswith(_SKIP_SUFFIXES):
                continue
            yield Path(root) / name


def _floats(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.size == n else None


def read_header(path: Path) -> DicomFile:
    """Parse one file's header (no pixel data). Raises InputError with a one-line reason."""
    size = path.stat().st_size
    if size == 0:
        raise InputError(path, "zero-byte file")
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=not _has_magic(path))
            offset = _pixel_value_offset(fp, ds)
    except Exception as exc:
        raise InputError(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
        raise InputError(path, "not a DICOM dataset (no SOPClassUID/SeriesInstanceUID)")
    rows = int(ds.get("Rows", 0) or 0)
    cols = int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if rows * cols * frames > MAX_VOXELS or rows > 65535 or cols > 65535:
        raise InputError(path, f"header claims {frames}×{rows}×{cols} pixels, refused before allocation")
    tsyntax = (
        str(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))
        if hasattr(ds, "file_meta")
        else str(ImplicitVRLittleEndian)
    )
    sop_class = str(ds.get("SOPClassUID", ""))
    if rows and cols and non_image_kind(sop_class) is None:
        if offset is None and "PixelData" not in ds and not _has_pixel_tag_after(path):
            raise InputError(path, "image header without pixel data (truncated file?)")
        if offset is not None and tsyntax in _UNCOMPRESSED_LE:
            need = rows * cols * frames * samples * (bits // 8)
            if offset + need > size:
                raise InputError(
                    path, f"truncated pixel data: {size - offset} bytes present, {need} expected"
                )
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    ps = _floats(ds.get("PixelSpacing"), 2)
    return DicomFile(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "")) or f"no-series-uid:{path.parent}",
        sop_class=sop_class,
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        modality=str(ds.get("Modality", "OT")),
        rows=rows,
        columns=cols,
        frames=frames,
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=(float(ps[0]), float(ps[1])) if ps is not None else None,
        slope=slope,
        intercept=intercept,
        bits_allocated=bits,
        bits_stored=int(ds.get("BitsStored", bits) or bits),
        pixel_representation=int(ds.get("PixelRepresentation", 0) or 0),
        samples=samples,
        transfer_syntax=tsyntax,
        pixel_offset=offset if tsyntax in _UNCOMPRESSED_LE else None,
        header=ds,
    )


def _has_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(128)
        return f.read(4) == b"DICM"


def _pixel_value_offset(fp: Any, ds: Dataset) -> int | None:
    """Byte offset of the Pixel Data value when pydicom stopped right before its tag, else None."""
    pos = fp.tell()
    head = fp.read(12)
    if len(head) < 8 or head[:4] != _PIXEL_DATA_TAG:
        return None
    if head[4:6] in (b"OW", b"OB"):
        if len(head) < 12:
            return None
        length = int.from_bytes(head[8:12], "little")
        return None if length == 0xFFFFFFFF else pos + 12
    length = int.from_bytes(head[4:8], "little")  # implicit VR
    return None if length == 0xFFFFFFFF else pos + 8


def _has_pixel_tag_after(path: Path) -> bool:
    try:
        full = pydicom.dcmread(path, force=True, defer_size=64)
    except Exception:
        return False
    return "PixelData" in full or "FloatPixelData" in full


def scan_folder(folder: str | Path, workers: int = 2) -> DicomScan:
    """Find every DICOM file under `folder` and group them into series."""
    folder = Path(folder)
    candidates = [
        p
        for p in iter_candidate_files(folder)
        if looks_like_dicom(p) or p.suffix.lower() in (".dcm", ".dicom", ".ima")
    ]
    headers: list[DicomFile] = []
    errors: list[InputError] = []

    def _one(p: Path) -> DicomFile | InputError:
        try:
            return read_header(p)
        except InputError as exc:
            return exc
        except OSError as exc:
            return InputError(p, f"cannot read ({exc.strerror})")

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for res in pool.map(_one, candidates):
            (errors if isinstance(res, InputError) else headers).append(res)  # type: ignore[arg-type]
    groups: dict[str, list[DicomFile]] = {}
    for h in headers:
        groups.setdefault(h.series_uid, []).append(h)
    series: list[DicomSeries] = []
    skipped: list[tuple[str, str]] = []
    for uid, files in groups.items():
        kind = non_image_kind(files[0].sop_class)
        if kind is not None or not files[0].is_image:
            for f in files:
                skipped.append((str(f.path), kind or "no image pixels"))
            continue
        series.append(DicomSeries(uid, sorted(files, key=lambda f: str(f.path))))
    return DicomScan(series, skipped, errors)


# --- Loading ---


def _dtype_for(f: DicomFile) -> np.dtype:
    if f.bits_allocated == 8:
        return np.dtype(np.int8 if f.pixel_representation else np.uint8)
    if f.bits_allocated == 16:
        return np.dtype("<i2" if f.pixel_representation else "<u2")
    if f.bits_allocated == 32:
        return np.dtype("<i4" if f.pixel_representation else "<u4")
    raise InputError(f.path, f"unsupported BitsAllocated {f.bits_allocated}")


def _read_frame_into(f: DicomFile, out: np.ndarray) -> None:
    """Read one single-frame file's stored values into `out` (rows × columns)."""
    if f.pixel_offset is not None and out.dtype == _dtype_for(f) and f.samples == 1:
        with open(f.path, "rb") as fp:
            fp.seek(f.pixel_offset)
            n = fp.readinto(memoryview(out).cast("B"))  # type: ignore[arg-type]
        if n != out.nbytes:
            raise InputError(f.path, f"truncated pixel data ({n} of {out.nbytes} bytes)")
        return
    try:
        ds = pydicom.dcmread(f.path, force=True)
        arr = ds.pixel_array
    except Exception as exc:
        raise InputError(f.path, f"cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
    if arr.shape != out.shape:
        raise InputError(f.path, f"pixel array shape {arr.shape} differs from header {out.shape}")
    out[...] = arr


def load_series(series: DicomSeries, workers: int = 4, min_slices: int = 2) -> Volume:
    """Load one image series as a Volume (LPS), with rescale applied and problems reported.

    A series of fewer than `min_slices` slices is refused (a 3D pipeline cannot use it); pass
    ``min_slices=1`` to read a lone slice, which gets its SliceThickness as third spacing.
    """
    files = series.files
    first = files[0]
    if first.frames > 1:
        if len(files) != 1:
            raise InputError(first.path, f"series mixes {len(files)} multi-frame files; load them one by one")
        return _load_multiframe(first, min_slices)
    if len(files) < min_slices:
        raise InputError(
            first.path, f"series has {len(files)} slice(s); a 3D volume needs at least {min_slices}"
        )
    warnings: list[str] = []
    for f in files:
        if f.orientation is None or f.position is None or f.pixel_spacing is None:
            raise InputError(f.path, "missing ImagePositionPatient/ImageOrientationPatient/PixelSpacing")
        if (f.rows, f.columns) != (first.rows, first.columns):
            raise InputError(
                f.path,
                f"slice size {f.rows}×{f.columns} differs from the series' {first.rows}×{first.columns}",
            )
        if not np.allclose(f.orientation, first.orientation, atol=1e-3):  # type: ignore[arg-type]
            raise InputError(f.path, "mixed slice orientations within one series")
    iop = first.orientation
    assert iop is not None and first.pixel_spacing is not None
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    dist = np.array([float(np.dot(f.position, normal)) for f in files])  # type: ignore[arg-type]
    order = np.argsort(dist, kind="stable")
    files = [files[i] for i in order]
    dist = dist[order]
    steps = np.diff(dist)
    if np.any(steps < 1e-3):
        dup = files[int(np.argmin(steps)) + 1].path
        raise InputError(dup, "two slices share one position (duplicate or conflicting geometry)")
    nominal = float(np.median(steps)) if len(steps) else float(first.header.get("SliceThickness", 1.0) or 1.0)
    # gantry tilt: consecutive positions move off the normal
    delta = files[-1].position - files[0].position  # type: ignore[operator]
    norm = float(np.linalg.norm(delta))
    tilt = (
        float(np.degrees(np.arccos(np.clip(abs(np.dot(delta, normal)) / norm, -1, 1)))) if norm > 0 else 0.0
    )
    if tilt > 0.5:
        raise InputError(
            first.path,
            f"gantry tilt of {tilt:.1f}° (slices shift in-plane); correct it (e.g. dcm2niix) before loading",
        )
    dtype = _dtype_for(first)
    n, rows, cols = len(files), first.rows, first.columns
    if n * rows * cols > MAX_VOXELS:
        raise InputError(first.path, f"series of {n}×{rows}×{cols} voxels exceeds the {MAX_VOXELS} limit")
    fast = _direct_int16(files)
    if fast is not None:
        # one pass: each thread reads a slice's bytes straight into the int16 output and adds the
        # intercept in place (BitsStored ≤ 15 unsigned values read as int16 unchanged)
        data = np.empty((n, rows, cols), dtype=np.int16)

        def _one(i: int) -> None:
            _read_frame_into(files[i], data[i].view(dtype))
            if fast:
                data[i] += np.int16(fast)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(_one, range(n)))
    else:
        stored = np.empty((n, rows, cols), dtype=dtype)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            list(pool.map(lambda i: _read_frame_into(files[i], stored[i]), range(n)))
        data = _rescale(stored, [f.slope for f in files], [f.intercept for f in files])
    if len(steps) and np.max(np.abs(steps - nominal)) > 0.01 * nominal + 1e-3:
        missing = int(round(float(np.sum(np.round(steps / nominal) - 1))))
        where = int(np.argmax(steps)) if missing else int(np.argmax(np.abs(steps - nominal)))
        what = f"{missing} missing slice(s) near slice {where}" if missing > 0 else "uneven slice spacing"
        warnings.append(f"{what}; resampled to a regular {nominal:.3g} mm spacing")
        data, dist = _regularise(data, dist, nominal)
    spacing = (first.pixel_spacing[1], first.pixel_spacing[0], nominal)
    direction = np.stack([row_dir, col_dir, normal], axis=1)
    assert first.position is not None
    origin = first.position - normal * (np.dot(first.position, normal) - dist[0])
    vol = Volume(
        data,
        spacing,
        tuple(origin),
        direction,
        first.modality,
        _meta(first.header, series.uid, [f.path for f in files]),
    )
    vol.meta["sop_instance_uids"] = [f.sop_uid for f in files]
    vol.warnings.extend(warnings)
    return vol


def _direct_int16(files: list[DicomFile]) -> int | None:
    """The common intercept when every file is uncompressed 16-bit with slope 1, an integer
    intercept, and a stored range that cannot overflow int16 after rescale; else None."""
    f0 = files[0]
    if any(f.pixel_offset is None or f.samples != 1 or f.bits_allocated != 16 for f in files):
        return None
    if any(f.slope != 1.0 or f.intercept != f0.intercept for f in files) or f0.intercept != int(f0.intercept):
        return None
    inter = int(f0.intercept)
    if f0.pixel_representation:
        lo, hi = -(2 ** (f0.bits_stored - 1)) + inter, 2 ** (f0.bits_stored - 1) - 1 + inter
    else:
        if f0.bits_stored > 15:
            return None
        lo, hi = inter, 2**f0.bits_stored - 1 + inter
    return inter if -32768 <= lo and hi <= 32767 else None


def _rescale(stored: np.ndarray, slopes: list[float], intercepts: list[float]) -> np.ndarray:
    s = np.asarray(slopes)
    b = np.asarray(intercepts)
    if np.all(s == s[0]) and np.all(b == b[0]):
        slope, inter = float(s[0]), float(b[0])
        if slope == 1.0 and inter == int(inter):
            lo, hi = int(stored.min()) + inter, int(stored.max()) + inter
            if -32768 <= lo and hi <= 32767:
                out = stored.astype(np.int16, copy=stored.dtype != np.int16)
                if inter:
                    out += np.int16(inter)
                return out
        return (stored.astype(np.float32) * np.float32(slope) + np.float32(inter)).astype(np.float32)
    return (
        stored.astype(np.float32) * s[:, None, None].astype(np.float32) + b[:, None, None].astype(np.float32)
    ).astype(np.float32)


def _regularise(data: np.ndarray, dist: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation along the slice normal onto a regular grid (fills missing slices)."""
    n = int(round((dist[-1] - dist[0]) / step)) + 1
    target = dist[0] + step * np.arange(n)
    hi = np.clip(np.searchsorted(dist, target, side="left"), 1, len(dist) - 1)
    lo = hi - 1
    w = ((target - dist[lo]) / (dist[hi] - dist[lo])).astype(np.float32)[:, None, None]
    f = data.astype(np.float32)
    out = f[lo] * (1 - w) + f[hi] * w
    if data.dtype == np.int16:
        out = np.round(out).astype(np.int16)
    return out, target


def _load_multiframe(f: DicomFile, min_slices: int = 2) -> Volume:
    """An enhanced (multi-frame) CT/MR: geometry from the functional group sequences."""
    try:
        ds = pydicom.dcmread(f.path, force=True)
        arr = ds.pixel_array
    except Exception as exc:
        raise InputError(
            f.path, f"cannot decode multi-frame pixel data ({type(exc).__name__}: {exc})"
        ) from exc
    if arr.ndim != 3:
        raise InputError(
            f.path, f"multi-frame pixel array has shape {arr.shape}, expected frames×rows×columns"
        )
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is None or len(per) != arr.shape[0]:
        raise InputError(
            f.path, "multi-frame image without one PerFrameFunctionalGroupsSequence item per frame"
        )

    def _get(item: Dataset, seq: str, attr: str) -> Any:
        for src in (item, shared):
            s = src.get(seq)
            if s and attr in s[0]:
                return s[0].get(attr)
        return None

    pos = np.array(
        [_floats(_get(it, "PlanePositionSequence", "ImagePositionPatient"), 3) for it in per],
        dtype=np.float64,
    )
    iop = _floats(_get(per[0], "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    ps = _floats(_get(per[0], "PixelMeasuresSequence", "PixelSpacing"), 2)
    if iop is None or ps is None or pos.ndim != 2:
        raise InputError(f.path, "multi-frame image lacks plane position/orientation/pixel spacing")
    slopes = [float(_get(it, "PixelValueTransformationSequence", "RescaleSlope") or f.slope) for it in per]
    inters = [
        float(_get(it, "PixelValueTransformationSequence", "RescaleIntercept") or f.intercept) for it in per
    ]
    normal = np.cross(iop[:3], iop[3:])
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    arr, dist, pos = arr[order], dist[order], pos[order]
    steps = np.diff(dist)
    if len(dist) < min_slices or np.any(steps < 1e-3):
        raise InputError(f.path, f"multi-frame image has fewer than {min_slices} distinct slice positions")
    thickness = _get(per[0], "PixelMeasuresSequence", "SliceThickness")
    nominal = float(np.median(steps)) if len(steps) else float(thickness or 1.0)
    data = _rescale(arr, [slopes[i] for i in order], [inters[i] for i in order])
    vol = Volume(
        data,
        (float(ps[1]), float(ps[0]), nominal),
        tuple(pos[0]),
        np.stack([iop[:3], iop[3:], normal], axis=1),
        str(ds.get("Modality", "OT")),
        _meta(ds, f.series_uid, [f.path]),
    )
    if len(steps) and np.max(np.abs(steps - nominal)) > 0.01 * nominal + 1e-3:
        vol.warnings.append("uneven frame spacing; resampled to a regular grid")
        reg, _ = _regularise(vol.array, dist, nominal)
        vol = vol.__class__(reg, vol.spacing, vol.origin, vol.direction, vol.modality, vol.meta, vol.warnings)
    return vol


def _meta(ds: Dataset, series_uid: str, paths: list[Path]) -> dict[str, Any]:
    # PatientName and PatientBirthDate are deliberately not carried: logs and reports stay PHI-light.
    return {
        "format": "dicom",
        "source": str(paths[0].parent),
        "files": [str(p) for p in paths],
        "patient_id": str(ds.get("PatientID", "")),
        "study_date": str(ds.get("StudyDate", "")),
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "series_uid": series_uid,
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")),
        "series_description": str(ds.get("SeriesDescription", "")),
        "manufacturer": str(ds.get("Manufacturer", "")),
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "transfer_syntax": str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", "")),
    }


def transfer_syntax_name(uid: str) -> str:
    try:
        return UID(uid).name
    except Exception:
        return uid


def read_dicom_volume(path: str | Path, min_slices: int = 1) -> Volume:
    """Read one DICOM file (a single slice or a multi-frame image) as a Volume."""
    header = read_header(Path(path))
    if not header.is_image:
        raise InputError(path, f"not an image ({non_image_kind(header.sop_class) or 'no pixel data'})")
    return load_series(DicomSeries(header.series_uid, [header]), min_slices=min_slices)
