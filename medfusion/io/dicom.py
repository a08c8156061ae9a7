"""DICOM discovery and series loading.

Files are recognised by content (the ``DICM`` magic after the 128-byte preamble, or a dataset that
starts with a group-0008 tag), at any depth, whatever their names. Series are grouped by
SeriesInstanceUID, sorted along the slice normal, and rescaled. Uncompressed little-endian pixel
data is read straight into the output array by threads (file reads release the GIL); every other
transfer syntax goes through pydicom's decoder plugins (gdcm, pylibjpeg-openjpeg, pylibjpeg-rle).
Enhanced (multi-frame) CT/MR objects are read by highdicom (`Image.get_volume`); one that is not a
single regular volume (missing or unevenly spaced frames) is refused in one line, where a series of
single-frame files would be interpolated.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medfusion.io.errors import InputError
from medfusion.io.volume import MAX_VOXELS, Volume

_UNCOMPRESSED_LE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"

# SOP classes that are not images: listed and skipped.
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
NON_IMAGE_SOP = {
    MEDIA_STORAGE_DIRECTORY: "DICOMDIR index (Media Storage Directory)",
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
# image storage SOP classes whose objects must carry pixels (CT, enhanced CT, MR, enhanced MR, PET, …)
IMAGE_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.10008.5.1.4.1.1.4.1",
    "1.2.840.10008.5.1.4.1.1.128",
    "1.2.840.10008.5.1.4.1.1.130",
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
    """What one file's header says, read without its pixel data.

    `problems` are faults that forbid building a volume from this file (a malformed or
    non-positive PixelSpacing, …); `warnings` are faults that were repaired on read (a decimal
    comma, …). Both are one-line texts that name the attribute and its value as stored.
    """

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
    high_bit: int = -1
    rescale_given: bool = True
    problems: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def is_image(self) -> bool:
        """True for an image object with pixels (not an SR, SEG, RT, presentation state, …)."""
        return non_image_kind(self.sop_class) is None and self.rows > 0 and self.columns > 0

    @property
    def image_type(self) -> tuple[str, ...]:
        """ImageType (0008,0008) values, upper-cased and stripped, e.g. ("ORIGINAL", "PRIMARY", "AXIAL");
        () when absent or unreadable."""
        try:
            value = self.header.get("ImageType", ())
        except Exception:  # an unconvertible element reads as absent
            return ()
        if isinstance(value, str):
            value = value.split("\\")
        return tuple(str(v).strip().upper() for v in value)

    @property
    def is_localizer(self) -> bool:
        """True when ImageType names a LOCALIZER (scout/topogram), which is never part of a volume."""
        return "LOCALIZER" in self.image_type


@dataclasses.dataclass
class DicomSeries:
    """The files of one volume: one SeriesInstanceUID, or one part of it when the series had to be
    split (`part` then says by what, e.g. "EchoNumbers 2"); `notes` are warnings for the volume
    (duplicates dropped, …)."""

    uid: str
    files: list[DicomFile]
    part: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def first(self) -> DicomFile:
        """The series' first file (its header stands for the series' shared attributes)."""
        return self.files[0]

    @property
    def modality(self) -> str:
        """Modality (0008,0060) of the series, e.g. "CT", "MR"."""
        return self.first.modality

    @property
    def is_image(self) -> bool:
        """True when the series holds image objects (see `DicomFile.is_image`)."""
        return self.first.is_image


@dataclasses.dataclass
class DicomScan:
    """Result of scanning a folder: image series (split into consistent volumes), skipped objects
    (path, why), unreadable files, and notes on how series were split."""

    series: list[DicomSeries]
    skipped: list[tuple[str, str]]  # (path, why)
    errors: list[InputError]
    notes: list[str] = dataclasses.field(default_factory=list)


def non_image_kind(sop_class: str) -> str | None:
    """What a non-image SOP Class UID is ("structured report", "segmentation", …), or None for an
    image storage class."""
    if sop_class in NON_IMAGE_SOP:
        return NON_IMAGE_SOP[sop_class]
    if sop_class.startswith(_NON_IMAGE_PREFIXES):
        return "non-image object"
    return None


# --- Discovery ---


def looks_like_dicom(path: Path) -> bool:
    """True for a DICOM Part 10 file (preamble + ``DICM``) or a bare stream of data elements.

    A bare stream (no preamble, as some older exporters and PACS caches write) is recognised by
    its first tag: group 0002 (file meta without preamble) or group 0008, in either byte order,
    including a leading group-length element (gggg,0000).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    for order in ("little", "big"):
        group = int.from_bytes(head[0:2], order)  # type: ignore[arg-type]
        element = int.from_bytes(head[2:4], order)  # type: ignore[arg-type]
        if group in (0x0002, 0x0008) and element <= 0x0100:
            return True
    return False


def iter_candidate_files(folder: Path) -> Iterable[Path]:
    """Every file under `folder` that may be DICOM, in sorted order: hidden files and folders and
    known non-DICOM suffixes (NIfTI, JSON, notes, CSV, PNG/JPEG, PDF, Python) are left out."""
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


_DECIMAL_COMMA = re.compile(r"^[+-]?\d*,\d+$|^[+-]?\d+,\d*$")


def raw_decimal_text(ds: Dataset, keyword: str) -> str | None:
    """The stored text of a decimal-string attribute (values joined by backslash), or None when
    absent or empty. Reads the raw bytes, so an invalid DS never raises here."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    try:
        elem = ds.get_item(tag)
    except Exception:
        return None
    value = getattr(elem, "value", None)
    if value is None:
        return None
    if isinstance(value, bytes):
        text = value.decode("ascii", "replace")
    elif isinstance(value, str):
        text = value
    elif isinstance(value, Iterable):
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    text = text.strip(" \x00")
    return text or None


def parse_decimal_string(text: str, n: int, keyword: str) -> tuple[np.ndarray, str | None]:
    """Parse a DICOM decimal string (DS, PS3.5 §6.2) of `n` values, forgiving two faults seen in
    exports: a locale decimal comma (``0,9\\0,9`` → 0.9, 0.9, as fo-dicom reads it) and a comma
    used as the value separator (``0.58,0.58`` → 0.58, 0.58, pydicom#173).

    Returns:
        (values, warning): float64 array of shape (n,), and a one-line warning when a fault was
        repaired (None otherwise).

    Raises:
        ValueError: the text cannot be read as `n` finite numbers; the message quotes it.
    """
    parts = [p.strip() for p in text.split("\\")]
    warning = None
    if len(parts) == 1 and n > 1 and "," in parts[0] and ("." in parts[0] or parts[0].count(",") == n - 1):
        candidate = [p.strip() for p in parts[0].split(",")]
        if len(candidate) == n and not (n == 2 and "." not in parts[0]):
            parts = candidate
            joined = "\\".join(parts)
            warning = f"{keyword} '{text}' uses ',' between values; read as {joined}"
    fixed = []
    for p in parts:
        if _DECIMAL_COMMA.match(p):
            p = p.replace(",", ".")
            warning = f"{keyword} '{text}' uses a decimal comma; read with a decimal point"
        fixed.append(p)
    try:
        values = np.array([float(p) for p in fixed], dtype=np.float64)
    except ValueError:
        msg = f"{keyword} '{text}' is not a valid decimal string"
        raise ValueError(msg) from None
    if values.size != n:
        msg = f"{keyword} '{text}' holds {values.size} value(s), {n} expected"
        raise ValueError(msg)
    if not np.all(np.isfinite(values)):
        msg = f"{keyword} '{text}' is not finite"
        raise ValueError(msg)
    return values, warning


def _geometry(
    ds: Dataset, keyword: str, n: int, problems: list[str], warnings: list[str]
) -> np.ndarray | None:
    text = raw_decimal_text(ds, keyword)
    if text is None:
        return None
    try:
        values, warning = parse_decimal_string(text, n, keyword)
    except ValueError as exc:
        problems.append(str(exc))
        return None
    if warning:
        warnings.append(warning)
    return values


def _number(ds: Dataset, keyword: str, default: float, problems: list[str], warnings: list[str]) -> float:
    values = _geometry(ds, keyword, 1, problems, warnings)
    return float(values[0]) if values is not None else default


def _int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword, default)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def read_header(path: Path) -> DicomFile:
    """Parse one file's header (no pixel data). Raises InputError with a one-line reason.

    Non-image objects (DICOMDIR, SR, PDF, …) are returned too, with ``is_image`` False, so that
    the caller can list them as skipped rather than unreadable. An element pydicom cannot convert
    (an unknown VR, a length that does not fit its VR, …) refuses the file, never the folder.
    """
    try:
        return _read_header(path)
    except InputError:
        raise
    except OSError:
        raise
    except Exception as exc:  # deferred element conversion in pydicom raises many types
        raise InputError(path, f"malformed header ({type(exc).__name__}: {exc})") from exc


def _read_header(path: Path) -> DicomFile:
    size = path.stat().st_size
    if size == 0:
        raise InputError(path, "zero-byte file")
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=not _has_magic(path))
            offset = _pixel_value_offset(fp, ds)
    except Exception as exc:
        raise InputError(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    file_meta = getattr(ds, "file_meta", None) or Dataset()
    sop_class = str(ds.get("SOPClassUID", "") or file_meta.get("MediaStorageSOPClassUID", "") or "")
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        sop_class = MEDIA_STORAGE_DIRECTORY
    elif not sop_class and "SeriesInstanceUID" not in ds:
        raise InputError(path, "not a DICOM dataset (no SOPClassUID/SeriesInstanceUID)")
    problems: list[str] = []
    warnings: list[str] = []
    rows = _int(ds, "Rows", 0)
    cols = _int(ds, "Columns", 0)
    frames = max(1, _int(ds, "NumberOfFrames", 1))
    bits = _int(ds, "BitsAllocated", 16)
    samples = max(1, _int(ds, "SamplesPerPixel", 1))
    bits_stored = _int(ds, "BitsStored", bits)
    if rows * cols * frames > MAX_VOXELS or rows > 65535 or cols > 65535:
        raise InputError(path, f"header claims {frames}×{rows}×{cols} pixels, refused before allocation")
    tsyntax = str(file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))
    if rows and cols and non_image_kind(sop_class) is None:
        if offset is None and "PixelData" not in ds and not _has_pixel_tag_after(path):
            raise InputError(path, "image header without pixel data (truncated file?)")
        if offset is not None and tsyntax in _UNCOMPRESSED_LE:
            need = rows * cols * frames * samples * (bits // 8)
            if offset + need > size:
                raise InputError(
                    path, f"truncated pixel data: {size - offset} bytes present, {need} expected"
                )
    slope = _number(ds, "RescaleSlope", 1.0, problems, warnings)
    if slope == 0.0:
        warnings.append("RescaleSlope '0' is not valid; read as 1")
        slope = 1.0
    intercept = _number(ds, "RescaleIntercept", 0.0, problems, warnings)
    rescale_given = (
        raw_decimal_text(ds, "RescaleIntercept") is not None
        or raw_decimal_text(ds, "RescaleSlope") is not None
    )
    ps = _geometry(ds, "PixelSpacing", 2, problems, warnings)
    if ps is not None and not np.all(ps > 0):
        problems.append(f"PixelSpacing '{raw_decimal_text(ds, 'PixelSpacing')}' is not positive")
        ps = None
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    return DicomFile(
        path=path,
        series_uid=uid or f"no-series-uid:{path.parent}",
        sop_class=sop_class,
        sop_uid=str(ds.get("SOPInstanceUID", "") or "").strip(),
        modality=str(ds.get("Modality", "OT") or "OT"),
        rows=rows,
        columns=cols,
        frames=frames,
        position=_geometry(ds, "ImagePositionPatient", 3, problems, warnings),
        orientation=_geometry(ds, "ImageOrientationPatient", 6, problems, warnings),
        pixel_spacing=(float(ps[0]), float(ps[1])) if ps is not None else None,
        slope=slope,
        intercept=intercept,
        bits_allocated=bits,
        bits_stored=bits_stored,
        pixel_representation=_int(ds, "PixelRepresentation", 0),
        samples=samples,
        transfer_syntax=tsyntax,
        pixel_offset=offset if tsyntax in _UNCOMPRESSED_LE else None,
        header=ds,
        high_bit=_int(ds, "HighBit", bits_stored - 1),
        rescale_given=rescale_given,
        problems=problems,
        warnings=warnings,
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
    """Find every DICOM file under `folder`, group them by SeriesInstanceUID and split each series
    into consistent volumes (see `split_series`)."""
    folder = Path(folder)
    candidates = [
        p
        for p in iter_candidate_files(folder)
        if looks_like_dicom(p) or p.suffix.lower() in (".dcm", ".dicom", ".ima") or p.name == "DICOMDIR"
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
        except Exception as exc:  # whatever one file does, the others are read
            return InputError(p, f"unreadable ({type(exc).__name__}: {exc})")

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for res in pool.map(_one, candidates):
            (errors if isinstance(res, InputError) else headers).append(res)  # type: ignore[arg-type]
    groups: dict[str, list[DicomFile]] = {}
    skipped: list[tuple[str, str]] = []
    for h in headers:
        kind = non_image_kind(h.sop_class)
        if kind is None and h.sop_class in IMAGE_STORAGE and not h.is_image:
            errors.append(InputError(h.path, "image object without Rows/Columns (truncated header?)"))
            continue
        if kind is not None or not h.is_image:
            skipped.append((str(h.path), kind or "no image pixels"))
            continue
        groups.setdefault(h.series_uid, []).append(h)
    series: list[DicomSeries] = []
    notes: list[str] = []
    for uid, files in groups.items():
        try:
            split = split_series(uid, sorted(files, key=lambda f: str(f.path)))
        except (InputError, OSError) as exc:
            errors.append(exc if isinstance(exc, InputError) else InputError(files[0].path, str(exc)))
            continue
        series.extend(split.parts)
        skipped.extend(split.skipped)
        notes.extend(split.notes)
        errors.extend(split.errors)
    return DicomScan(series, skipped, errors, notes)


# --- Splitting a series into volumes ---

# Attributes that tell apart images sharing one slice position within one SeriesInstanceUID, in the
# order they are tried. After dcm2niix's and dicom2nifti's handling (dcm2niix splits by echo, by
# image type (magnitude/phase), by acquisition and by time when positions repeat).
SPLIT_ATTRIBUTES = (
    "EchoNumbers",
    "EchoTime",
    "TemporalPositionIdentifier",
    "TriggerTime",
    "DiffusionBValue",
    "ImageType",
    "AcquisitionNumber",
    "AcquisitionTime",
    "ContentTime",
)


@dataclasses.dataclass
class SeriesSplit:
    """What `split_series` made of one SeriesInstanceUID."""

    parts: list[DicomSeries]
    skipped: list[tuple[str, str]]
    notes: list[str]
    errors: list[InputError]


def _pixel_digest(f: DicomFile) -> str:
    """A digest of the file's pixel data (the whole file when the offset is unknown)."""
    with open(f.path, "rb") as fp:
        if f.pixel_offset is not None:
            fp.seek(f.pixel_offset)
        return hashlib.blake2b(fp.read(), digest_size=16).hexdigest()


def _position_key(f: DicomFile) -> tuple[float, ...]:
    assert f.position is not None
    return tuple(np.round(f.position, 2).tolist())


def _attribute_key(f: DicomFile, keyword: str) -> str:
    try:
        value = f.header.get(keyword)
    except Exception:  # an unconvertible element reads as absent
        return ""
    if value is None or value == "":
        return ""
    if keyword == "ImageType":
        return "\\".join(f.image_type)
    return str(value)


def split_series(uid: str, files: list[DicomFile]) -> SeriesSplit:
    """Split the image files of one SeriesInstanceUID into consistent volumes, in this order:

    1. exact duplicates (same SOPInstanceUID, same pixel data) are dropped with a warning;
    2. localizers (ImageType value LOCALIZER) are left out with a note;
    3. files are grouped by geometry: ImageOrientationPatient, Rows × Columns, PixelSpacing
       (each volume needs one of each);
    4. within a geometry group whose slice positions repeat, the first attribute of
       `SPLIT_ATTRIBUTES` that gives every part distinct positions splits it; identical pixel data
       at one position (copies under new SOPInstanceUIDs) is dropped as a duplicate.

    A part with one slice beside a part with more is listed as skipped (a stray image), not an
    error. Files with malformed geometry stay in one part so that the loader reports them.
    """
    notes: list[str] = []
    skipped: list[tuple[str, str]] = []
    errors: list[InputError] = []
    volume_notes: list[str] = []
    # 1. exact duplicates by SOPInstanceUID
    by_sop: dict[str, list[DicomFile]] = {}
    unique: list[DicomFile] = []
    for f in files:
        if f.sop_uid:
            by_sop.setdefault(f.sop_uid, []).append(f)
        else:
            unique.append(f)
    n_dup = 0
    for same in by_sop.values():
        unique.append(same[0])
        if len(same) > 1:
            ref = _pixel_digest(same[0])
            for other in same[1:]:
                if _pixel_digest(other) == ref:
                    n_dup += 1
                    skipped.append((str(other.path), f"exact duplicate of {same[0].path.name}"))
                else:
                    errors.append(
                        InputError(
                            other.path,
                            f"shares SOPInstanceUID with {same[0].path.name} but holds other pixels; left out",
                        )
                    )
    if n_dup:
        volume_notes.append(f"{n_dup} exact duplicate file(s) (same SOPInstanceUID and pixels) dropped")
    unique.sort(key=lambda f: str(f.path))
    # 2. localizers
    images = [f for f in unique if not f.is_localizer]
    for f in unique:
        if f.is_localizer and len(images) > 0:
            skipped.append((str(f.path), "localizer (ImageType LOCALIZER), left out of the series"))
    if not images:
        images = unique  # a series of localizers only: let the loader judge it
    elif len(images) < len(unique):
        notes.append(f"series {uid}: {len(unique) - len(images)} localizer image(s) left out")
    # 3. slices whose own header is faulty: each is an error when the others can make a volume; when
    #    every slice shares the fault, the loader refuses the series in one line
    faulty = [f for f in images if _slice_fault(f)]
    if faulty and len(faulty) < len(images):
        for f in faulty:
            errors.append(InputError(f.path, f"{_slice_fault(f)}; slice left out of its series"))
        images = [f for f in images if not _slice_fault(f)]
    # 4. geometry groups, by tolerance (a DS rounded differently must not split a series)
    groups: list[list[DicomFile]] = []
    for f in images:
        for g in groups:
            if _same_geometry(g[0], f):
                g.append(f)
                break
        else:
            groups.append([f])
    labels = [""] * len(groups)
    if len(groups) > 1:
        labels = [
            f"geometry {i + 1}/{len(groups)} ({g[0].rows}×{g[0].columns})" for i, g in enumerate(groups)
        ]
    # 5. repeated positions, then gaps along the normal
    parts: list[tuple[str, list[DicomFile], list[str]]] = []
    for label, group in zip(labels, groups, strict=True):
        for sub_label, sub, extra in _split_repeats(uid, label, group, notes):
            parts.extend(_split_gaps(sub_label, sub, extra))
    multi = [p for p in parts if len(p[1]) > 1 or p[1][0].frames > 1]
    result: list[DicomSeries] = []
    for label, group, extra in parts:
        if multi and len(group) == 1 and group[0].frames == 1 and len(parts) > 1:
            skipped.append(
                (str(group[0].path), f"a lone image ({label or 'other geometry'}) beside the series' volume")
            )
            continue
        result.append(DicomSeries(uid, group, label, [*volume_notes, *extra]))
    if len(result) > 1:
        notes.append(f"series {uid} split into {len(result)} volumes: " + "; ".join(p.part for p in result))
    return SeriesSplit(result, skipped, notes, errors)


def _missing_geometry(f: DicomFile) -> str | None:
    """ "missing ImagePositionPatient/…" for the geometry attributes a slice lacks, or None."""
    absent = [
        k
        for k, v in (
            ("ImagePositionPatient", f.position),
            ("ImageOrientationPatient", f.orientation),
            ("PixelSpacing", f.pixel_spacing),
        )
        if v is None
    ]
    return f"missing {'/'.join(absent)}" if absent else None


def _slice_fault(f: DicomFile) -> str | None:
    """Why one slice cannot join a volume (malformed geometry or pixel layout), or None."""
    if f.problems:
        return f.problems[0]
    missing = _missing_geometry(f)
    if missing:
        return missing
    if f.pixel_representation not in (0, 1):
        return f"PixelRepresentation {f.pixel_representation} is neither 0 nor 1"
    if f.bits_allocated not in (1, 8, 16, 32) or not 1 <= f.bits_stored <= f.bits_allocated:
        return f"BitsAllocated {f.bits_allocated} / BitsStored {f.bits_stored} is not a valid layout"
    return None


def _same_geometry(a: DicomFile, b: DicomFile) -> bool:
    """One volume's slices: orientation within 1e-3, same matrix, spacing within 1e-3 mm."""
    if _slice_fault(a) or _slice_fault(b):
        return bool(_slice_fault(a)) and bool(_slice_fault(b))
    assert a.orientation is not None and b.orientation is not None
    assert a.pixel_spacing is not None and b.pixel_spacing is not None
    return (
        (a.rows, a.columns, a.frames > 1) == (b.rows, b.columns, b.frames > 1)
        and bool(np.allclose(a.orientation, b.orientation, atol=1e-3))
        and bool(np.allclose(a.pixel_spacing, b.pixel_spacing, atol=1e-3))
    )


GAP_FACTOR = 4.0  # a step along the normal this many times the median step splits a series into slabs


def _split_gaps(
    label: str, group: list[DicomFile], extra: list[str]
) -> list[tuple[str, list[DicomFile], list[str]]]:
    """Split a geometry group at gaps of more than GAP_FACTOR × its median slice step (two slabs of
    one series): interpolating across a gap that wide would invent anatomy."""
    if len(group) < 4 or group[0].frames > 1 or _slice_fault(group[0]):
        return [(label, group, extra)]
    assert group[0].orientation is not None
    normal = np.cross(group[0].orientation[:3], group[0].orientation[3:])
    dist = np.array([float(np.dot(f.position, normal)) for f in group])  # type: ignore[arg-type]
    order = np.argsort(dist, kind="stable")
    steps = np.diff(dist[order])
    positive = steps[steps > 1e-3]
    if not len(positive):
        return [(label, group, extra)]
    median = float(np.median(positive))
    cuts = [i + 1 for i, s in enumerate(steps) if s > GAP_FACTOR * median]
    if not cuts:
        return [(label, group, extra)]
    bounds = [0, *cuts, len(group)]
    slabs = [[group[i] for i in order[lo:hi]] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    widest = float(steps.max())
    return [
        (
            ", ".join(x for x in (label, f"slab {k + 1}/{len(slabs)}") if x),
            slab,
            [*extra, f"series split at a {widest:.0f} mm gap between slices (median step {median:.3g} mm)"],
        )
        for k, slab in enumerate(slabs)
    ]


def _split_repeats(
    uid: str, label: str, group: list[DicomFile], notes: list[str]
) -> list[tuple[str, list[DicomFile], list[str]]]:
    """Split one geometry group whose slice positions repeat (see `split_series`, step 4)."""
    if group[0].position is None or group[0].frames > 1 or group[0].problems:
        return [(label, group, [])]
    positions = [_position_key(f) for f in group]
    if len(set(positions)) == len(positions):
        return [(label, group, [])]
    repeats = max(positions.count(p) for p in set(positions))
    for keyword in SPLIT_ATTRIBUTES:
        values: dict[str, list[DicomFile]] = {}
        for f in group:
            values.setdefault(_attribute_key(f, keyword), []).append(f)
        # a split must reduce the repeats: no more values than copies of a position, none a lone
        # slice, and fewer copies in every part; parts that still repeat are split further (two
        # echoes × magnitude/phase, echoes × temporal positions, …)
        if not 2 <= len(values) <= repeats or min(len(v) for v in values.values()) < 2:
            continue
        within = [max(Counter(_position_key(f) for f in v).values()) for v in values.values()]
        if max(within) < repeats:
            out: list[tuple[str, list[DicomFile], list[str]]] = []
            for k, v in sorted(values.items()):
                sub = ", ".join(x for x in (label, f"{keyword} {k or 'none'}") if x)
                out.extend(_split_repeats(uid, sub, v, notes))
            return out
    # copies under new SOPInstanceUIDs: same position, same pixels
    kept: dict[tuple[float, ...], tuple[DicomFile, str]] = {}
    remaining: list[DicomFile] = []
    dropped = 0
    for f in group:
        pos = _position_key(f)
        digest = _pixel_digest(f)
        if pos in kept:
            if kept[pos][1] == digest:
                dropped += 1
                continue
            remaining.append(f)  # a conflict: the loader refuses the group and names the file
            continue
        kept[pos] = (f, digest)
        remaining.append(f)
    extra = (
        [f"{dropped} duplicate slice(s) (same position and pixels, new SOPInstanceUID) dropped"]
        if dropped
        else []
    )
    return [(label, remaining, extra)]


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
        shift = f.bits_allocated - f.bits_stored
        if 0 < shift < f.bits_allocated:
            # PS3.5 §8.1.1: bits above BitsStored may hold anything (old overlay planes); drop them,
            # sign-extending signed values, exactly as pydicom's pixel_array does
            np.left_shift(out, shift, out=out)
            np.right_shift(out, shift, out=out)
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
    """Load one image series (or one part of a split series) as a Volume (LPS), with rescale
    applied and problems reported.

    Stored values are masked to BitsStored (sign-extended from HighBit when signed), as PS3.5
    §8.1.1 asks and pydicom's ``pixel_array`` does. A gantry-tilted (sheared) series is resampled
    onto an orthogonal grid with a warning; missing slices are interpolated with a warning.

    Raises:
        InputError: fewer than `min_slices` slices, unreadable or non-positive geometry, two
            different images at one position, pixel data that cannot be decoded. The message
            names one file and the problem.
    """
    files = series.files
    first = files[0]
    for f in files:
        if f.problems:
            raise InputError(f.path, f"{f.problems[0]}; series refused")
    if first.frames > 1:
        if len(files) != 1:
            raise InputError(first.path, f"series mixes {len(files)} multi-frame files; load them one by one")
        return _load_multiframe(first, min_slices)
    if len(files) < min_slices:
        raise InputError(
            first.path, f"series has {len(files)} slice(s); a 3D volume needs at least {min_slices}"
        )
    warnings: list[str] = list(series.notes)
    warnings.extend(_merged_file_warnings(files))
    for f in files:
        missing = _missing_geometry(f)
        if missing:
            raise InputError(f.path, missing)
        if (f.rows, f.columns) != (first.rows, first.columns):
            raise InputError(
                f.path,
                f"slice size {f.rows}×{f.columns} differs from the series' {first.rows}×{first.columns}",
            )
        if not np.allclose(f.orientation, first.orientation, atol=1e-3):  # type: ignore[arg-type]
            raise InputError(f.path, "mixed slice orientations within one series")
    iop = first.orientation
    assert iop is not None and first.pixel_spacing is not None
    row_dir, col_dir = _unit_axes(first.path, iop)
    normal = np.cross(row_dir, col_dir)
    positions = np.array([f.position for f in files], dtype=np.float64)
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    files = [files[i] for i in order]
    dist, positions = dist[order], positions[order]
    steps = np.diff(dist)
    if np.any(steps < 1e-3):
        dup = files[int(np.argmin(steps)) + 1].path
        raise InputError(dup, "two slices share one position (duplicate or conflicting geometry)")
    nominal = float(np.median(steps)) if len(steps) else float(first.header.get("SliceThickness", 1.0) or 1.0)
    _dtype_for(first)  # refuses an unsupported BitsAllocated before any read
    n, rows, cols = len(files), first.rows, first.columns
    if n * rows * cols > MAX_VOXELS:
        raise InputError(first.path, f"series of {n}×{rows}×{cols} voxels exceeds the {MAX_VOXELS} limit")
    files, rescale_note = _fill_missing_rescale(files)
    if rescale_note:
        warnings.append(rescale_note)
    data, failed = _read_pixels(files, workers)
    if failed:
        if len(failed) > len(files) // 2:
            i, exc = failed[0]
            raise InputError(
                files[i].path, f"{len(failed)} of {len(files)} slices cannot be decoded: {exc.problem}"
            )
        keep = np.setdiff1d(np.arange(len(files)), [i for i, _ in failed])
        names = ", ".join(files[i].path.name for i, _ in failed[:3]) + ("…" if len(failed) > 3 else "")
        warnings.append(
            f"{len(failed)} slice(s) could not be decoded ({names}: {failed[0][1].problem}); left out and "
            "the gap interpolated"
        )
        files = [files[i] for i in keep]
        data, dist, positions = data[keep], dist[keep], positions[keep]
        steps = np.diff(dist)
    spacing_xy = (first.pixel_spacing[1], first.pixel_spacing[0])
    origin = positions[0]
    # gantry tilt (or any in-plane drift of the slice origins): shift each slice back onto one column
    inplane = positions - positions[0] - np.outer(dist - dist[0], normal)
    u = inplane @ row_dir / spacing_xy[0]
    v = inplane @ col_dir / spacing_xy[1]
    if max(np.ptp(u), np.ptp(v)) > 0.05:
        span = float(dist[-1] - dist[0])
        data, origin, note = _deshear(data, positions[0], row_dir, col_dir, spacing_xy, u, v, span, first)
        warnings.append(note)
    if len(steps) and np.max(np.abs(steps - nominal)) > 0.01 * nominal + 1e-3:
        missing_n = int(round(float(np.sum(np.round(steps / nominal) - 1))))
        where = int(np.argmax(steps)) if missing_n else int(np.argmax(np.abs(steps - nominal)))
        what = f"{missing_n} missing slice(s) near slice {where}" if missing_n > 0 else "uneven slice spacing"
        warnings.append(f"{what}; resampled to a regular {nominal:.3g} mm spacing")
        data, dist = _regularise(data, dist, nominal)
    spacing = (spacing_xy[0], spacing_xy[1], nominal)
    direction = np.stack([row_dir, col_dir, normal], axis=1)
    meta = _meta(first.header, series.uid, [f.path for f in files])
    if series.part:
        meta["series_part"] = series.part
        meta["series_description"] = f"{meta['series_description']} [{series.part}]".strip()
    vol = Volume(data, spacing, tuple(origin), direction, first.modality, meta)
    vol.meta["sop_instance_uids"] = [f.sop_uid for f in files]
    vol.warnings.extend(warnings)
    return vol


def _unit_axes(path: Path, iop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines of ImageOrientationPatient, normalised; InputError when
    they are zero-length or not perpendicular (beyond the rounding of a 6-decimal DS)."""
    row, col = iop[:3], iop[3:]
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if nr < 0.5 or nc < 0.5 or abs(float(np.dot(row, col))) / (nr * nc) > 1e-2:
        text = "\\".join(f"{x:g}" for x in iop)
        raise InputError(path, f"ImageOrientationPatient '{text}' is not two perpendicular unit vectors")
    row = row / nr
    col = col - np.dot(col, row) * row
    return row, col / np.linalg.norm(col)


def _deshear(
    data: np.ndarray,
    origin: np.ndarray,
    row: np.ndarray,
    col: np.ndarray,
    spacing_xy: tuple[float, float],
    u: np.ndarray,
    v: np.ndarray,
    span_mm: float,
    first: DicomFile,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Resample slices whose origins drift in-plane (gantry tilt) onto an orthogonal grid.

    `u`, `v` (shape (n,)) are each slice origin's in-plane drift in columns and rows; `span_mm`
    the distance between the first and last slice along the normal. Slice k is shifted by
    (v[k] − min v, u[k] − min u) pixels (linear interpolation, scipy.ndimage.shift), and
    the grid grows so that no voxel is cut; voxels outside the acquired slices take the series'
    minimum value. Returns the new array (dtype kept), the new origin (LPS mm) and a warning.
    """
    from scipy import ndimage

    umin, vmin = float(u.min()), float(v.min())
    grow_c, grow_r = int(np.ceil(float(u.max()) - umin - 1e-6)), int(np.ceil(float(v.max()) - vmin - 1e-6))
    n, rows, cols = data.shape
    fill = float(data.min())
    out = np.empty((n, rows + grow_r, cols + grow_c), dtype=np.float32)
    for k in range(n):
        canvas = np.full(out.shape[1:], fill, dtype=np.float32)
        canvas[:rows, :cols] = data[k]
        ndimage.shift(canvas, (v[k] - vmin, u[k] - umin), output=out[k], order=1, mode="constant", cval=fill)
    if data.dtype.kind in "iu":
        out = np.round(out).astype(data.dtype)
    new_origin = origin + umin * spacing_xy[0] * row + vmin * spacing_xy[1] * col
    drift = float(np.hypot(np.ptp(u) * spacing_xy[0], np.ptp(v) * spacing_xy[1]))
    tag = first.header.get("GantryDetectorTilt")
    said = f" (GantryDetectorTilt {tag})" if tag not in (None, "") else ""
    tilt = float(np.degrees(np.arctan2(drift, span_mm))) if span_mm > 0 else 0.0
    note = (
        f"gantry tilt {tilt:.1f}°{said}: slices resampled onto an orthogonal grid "
        f"(in-plane shifts up to {drift:.1f} mm, linear interpolation; grid {rows}×{cols} → "
        f"{rows + grow_r}×{cols + grow_c})"
    )
    return out, new_origin, note


def _merged_file_warnings(files: list[DicomFile]) -> list[str]:
    """The files' repair warnings, one per attribute: "… (in 24 of 24 slices)" instead of 24 lines."""
    by_key: dict[str, list[str]] = {}
    for f in files:
        for w in f.warnings:
            by_key.setdefault(w.split(" ", 1)[0] + w.split("'")[-1], []).append(w)
    out = []
    for texts in by_key.values():
        suffix = f" (in {len(texts)} of {len(files)} slices)" if len(files) > 1 else ""
        out.append(texts[0] + suffix)
    return out


def _fill_missing_rescale(files: list[DicomFile]) -> tuple[list[DicomFile], str | None]:
    """A series whose RescaleSlope/RescaleIntercept is absent from some slices but the same in all
    others: the absent ones take that value (read as 1 / 0 they would be off by the intercept)."""
    given = [f for f in files if f.rescale_given]
    if not given or len(given) == len(files):
        return files, None
    pairs = {(f.slope, f.intercept) for f in given}
    n_missing = len(files) - len(given)
    if len(pairs) != 1:
        return files, (
            f"RescaleSlope/RescaleIntercept absent from {n_missing} of {len(files)} slices and not the same "
            "in the others; those slices read unscaled — check the values"
        )
    slope, intercept = next(iter(pairs))
    fixed = [
        f if f.rescale_given else dataclasses.replace(f, slope=slope, intercept=intercept) for f in files
    ]
    return fixed, (
        f"RescaleSlope/RescaleIntercept absent from {n_missing} of {len(files)} slices; the series' "
        f"{slope:g}/{intercept:g} applied to them"
    )


def _read_pixels(files: list[DicomFile], workers: int) -> tuple[np.ndarray, list[tuple[int, InputError]]]:
    """Every slice's rescaled values, (n, rows, columns), and the slices that could not be decoded
    (index, error); their planes are left as the series' minimum for the caller to drop.

    One pass straight into int16 when the layout allows it (`_direct_int16`); one dtype for the
    series when every slice shares BitsAllocated/BitsStored/PixelRepresentation; otherwise each slice
    is read with its own layout and rescale (mixed exports) into float32.
    """
    n, rows, cols = len(files), files[0].rows, files[0].columns
    failed: list[tuple[int, InputError]] = []
    layouts = {(f.bits_allocated, f.bits_stored, f.pixel_representation) for f in files}
    fast = _direct_int16(files)

    def guarded(fn: Any) -> Any:
        def run(i: int) -> None:
            try:
                fn(i)
            except InputError as exc:
                failed.append((i, exc))

        return run

    with _quiet_decoders(), ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        if fast is not None:
            # each thread reads a slice's bytes into the int16 output, masks the unused high bits
            # and adds the intercept in place
            data = np.empty((n, rows, cols), dtype=np.int16)
            dtype = _dtype_for(files[0])

            def _fast(i: int) -> None:
                _read_frame_into(files[i], data[i].view(dtype))
                if fast:
                    data[i] += np.int16(fast)

            list(pool.map(guarded(_fast), range(n)))
        elif len(layouts) == 1:
            stored = np.zeros((n, rows, cols), dtype=_dtype_for(files[0]))
            list(pool.map(guarded(lambda i: _read_frame_into(files[i], stored[i])), range(n)))
            data = _rescale(stored, [f.slope for f in files], [f.intercept for f in files])
        else:
            data = np.zeros((n, rows, cols), dtype=np.float32)

            def _own(i: int) -> None:
                one = np.empty((rows, cols), dtype=_dtype_for(files[i]))
                _read_frame_into(files[i], one)
                data[i] = one.astype(np.float32) * np.float32(files[i].slope) + np.float32(files[i].intercept)

            list(pool.map(guarded(_own), range(n)))
    return data, sorted(failed, key=lambda t: t[0])


@contextlib.contextmanager
def _quiet_decoders() -> Iterator[None]:
    """pydicom logs each decoder plugin's failure with its traceback; the caller reports one line."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _direct_int16(files: list[DicomFile]) -> int | None:
    """The common intercept when every file is uncompressed 16-bit with slope 1, an integer
    intercept, and a stored range that cannot overflow int16 after rescale; else None."""
    f0 = files[0]
    if any(f.pixel_offset is None or f.samples != 1 or f.bits_allocated != 16 for f in files):
        return None
    if any(f.slope != 1.0 or f.intercept != f0.intercept for f in files) or f0.intercept != int(f0.intercept):
        return None
    if (
        any(
            (f.bits_stored, f.pixel_representation) != (f0.bits_stored, f0.pixel_representation)
            for f in files
        )
        or not 1 <= f0.bits_stored <= 16
    ):
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
            # wider integers stay exact: int32 when they fit, else float64 (never a rounded float32)
            wide = np.dtype(np.int32 if -(2**31) <= lo and hi < 2**31 else np.float64)
            out_wide: np.ndarray = stored.astype(wide)
            out_wide += np.asarray(inter, dtype=wide)
            return out_wide
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
    """An enhanced (multi-frame) CT/MR as a Volume, read by highdicom (`Image.get_volume`): frames
    sorted along the slice normal, geometry from the functional groups, the modality rescale applied
    (per frame where the frames carry their own); no VOI window, presentation LUT or real-world map.

    Several stacks in one object (echoes, temporal positions, StackIDs) at the same positions: the
    first frame's stack is read, with a warning. Values stay int16/int32 when they are whole numbers
    in range (as single-frame series do), else float32.

    Raises:
        InputError: a file pydicom cannot read, no PerFrameFunctionalGroupsSequence item per frame,
            fewer than `min_slices` frames, more than one sample per pixel, or frames highdicom cannot
            form into one regularly spaced volume (missing or unevenly spaced frames, repeated
            positions nothing tells apart, undecodable pixel data): one line naming the file.
    """
    try:
        ds = pydicom.dcmread(f.path, force=True)
    except Exception as exc:
        raise InputError(f.path, f"cannot read multi-frame image ({type(exc).__name__}: {exc})") from exc
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is None or len(per) != f.frames:
        raise InputError(
            f.path, "multi-frame image without one PerFrameFunctionalGroupsSequence item per frame"
        )
    note = None
    try:
        hv = _highdicom_volume(ds)
    except Exception as exc:
        keys = [_frame_stack_key(it) for it in per]
        if len(set(keys)) < 2:
            raise _refusal(f.path, exc) from exc
        # several stacks in one object at the same positions: read the first frame's
        take = [i for i, k in enumerate(keys) if k == keys[0]]
        try:
            hv = _highdicom_volume(_frames_subset(ds, take))
        except Exception as exc2:
            raise _refusal(f.path, exc2) from exc2
        note = (
            f"multi-frame image holds {len(set(keys))} stacks (by StackID / TemporalPositionIndex / "
            f"EffectiveEchoTime); the first frame's ({'/'.join(str(x) for x in keys[0])}) is read"
        )
    if hv.array.ndim != 3:
        raise InputError(f.path, f"multi-frame image has {hv.array.shape[3:]} samples per pixel; expected 1")
    n = hv.spatial_shape[0]
    if n < min_slices:
        raise InputError(f.path, f"multi-frame image has {n} frame(s); a 3D volume needs {min_slices}")
    # medfusion's k axis runs along row × column (LPS), highdicom's first axis may run against it
    hv = hv.ensure_handedness("LEFT_HANDED", flip_axis=0)
    d = np.asarray(hv.direction, dtype=np.float64)  # columns: the (slice, row, column) unit axes
    slice_mm, row_mm, col_mm = (float(v) for v in hv.spacing)
    if n == 1:
        slice_mm = _slice_thickness(ds)
    vol = Volume(
        _compact(hv.array),
        (col_mm, row_mm, slice_mm),
        (float(hv.position[0]), float(hv.position[1]), float(hv.position[2])),
        np.stack([d[:, 2], d[:, 1], d[:, 0]], axis=1),
        str(ds.get("Modality", "OT")),
        _meta(ds, f.series_uid, [f.path]),
    )
    if note:
        vol.warnings.append(note)
    return vol


def _highdicom_volume(ds: Dataset) -> Any:
    """highdicom's volume of an enhanced multi-frame dataset: stored values through the modality
    rescale (float64), nothing else (no VOI, presentation LUT, palette, ICC or real-world map)."""
    return hd.Image.from_dataset(ds, copy=False).get_volume(
        dtype=np.float64,
        apply_real_world_transform=False,
        apply_voi_transform=False,
        apply_presentation_lut=False,
        apply_palette_color_lut=False,
        apply_icc_profile=False,
    )


def _refusal(path: Path, exc: Exception) -> InputError:
    """Why highdicom could not read a multi-frame image as one volume, as a one-line InputError."""
    text = str(exc)
    if "regularly-spaced" in text:
        why = "its frames are missing or unevenly spaced along the slice normal"
    elif "Multiple frames" in text:
        why = "it repeats slice positions and nothing tells its stacks apart"
    else:
        why = "highdicom cannot read it"
    return InputError(
        path, f"multi-frame image is not one regular 3D volume: {why} ({type(exc).__name__}: {text})"
    )


def _frames_subset(ds: Dataset, take: list[int]) -> Dataset:
    """A copy of the multi-frame `ds` holding only the frames `take` (0-based), uncompressed."""
    try:
        frames = ds.pixel_array[take]
    except Exception as exc:
        raise InputError(
            ds.filename or "", f"cannot decode multi-frame pixel data ({type(exc).__name__}: {exc})"
        ) from exc
    sub = Dataset({tag: elem for tag, elem in ds.items() if tag != 0x7FE00010})
    sub.file_meta = copy.deepcopy(ds.file_meta)
    sub.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sub.PerFrameFunctionalGroupsSequence = [ds.PerFrameFunctionalGroupsSequence[i] for i in take]
    sub.NumberOfFrames = len(take)
    sub.PixelData = np.ascontiguousarray(frames).astype(frames.dtype.newbyteorder("<")).tobytes()
    return sub


def _slice_thickness(ds: Dataset) -> float:
    """SliceThickness of a multi-frame image's pixel measures (shared, else the first frame's), mm;
    1.0 when absent or not positive: the slice spacing of a one-frame volume."""
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(group) or []
        measures = items[0].get("PixelMeasuresSequence") if items else None
        if measures and measures[0].get("SliceThickness") is not None:
            with contextlib.suppress(TypeError, ValueError):
                t = float(measures[0].SliceThickness)
                if t > 0 and np.isfinite(t):
                    return t
    return 1.0


def _compact(values: np.ndarray) -> np.ndarray:
    """Rescaled values (float64) in the type a single-frame series would have: whole numbers as int16,
    else int32 where they fit (else float64, exact); fractions as float32."""
    if values.size and np.all(np.mod(values, 1.0) == 0.0):
        lo, hi = float(values.min()), float(values.max())
        if -32768 <= lo and hi <= 32767:
            return values.astype(np.int16)
        if -(2**31) <= lo and hi < 2**31:
            return values.astype(np.int32)
        return values
    return values.astype(np.float32)


def _frame_stack_key(item: Dataset) -> tuple[str, str, str]:
    """(StackID, TemporalPositionIndex, EffectiveEchoTime) of one per-frame functional group item."""

    def first(seq: str, attr: str) -> str:
        s = item.get(seq)
        return str(s[0].get(attr, "")) if s else ""

    return (
        first("FrameContentSequence", "StackID"),
        first("FrameContentSequence", "TemporalPositionIndex"),
        first("MREchoSequence", "EffectiveEchoTime"),
    )


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
        # for the report's header: age and sex as coded (e.g. "054Y", "F"), never the birth date
        "patient_age": str(ds.get("PatientAge", "") or ""),
        "patient_sex": str(ds.get("PatientSex", "") or ""),
        "accession_number": str(ds.get("AccessionNumber", "") or ""),
        "manufacturer": str(ds.get("Manufacturer", "")),
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "transfer_syntax": str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", "")),
    }


def read_dicom_volume(path: str | Path, min_slices: int = 1) -> Volume:
    """Read one DICOM file (a single slice or a multi-frame image) as a Volume.

    Raises:
        InputError: the file is not a readable DICOM image (`read_header`), or `load_series` refuses it.
    """
    header = read_header(Path(path))
    if not header.is_image:
        raise InputError(path, f"not an image ({non_image_kind(header.sop_class) or 'no pixel data'})")
    return load_series(DicomSeries(header.series_uid, [header]), min_slices=min_slices)
