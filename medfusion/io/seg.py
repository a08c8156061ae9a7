"""DICOM Segmentation (BINARY) through highdicom: write one referencing the source CT series, read one back.

Source series as hospitals export them are not always complete: a de-identifier may delete Type 2
attributes (PatientBirthDate, AccessionNumber) instead of emptying them — the SEG then carries them
empty, as PS3.3 allows — or blank the UIDs a SEG must reference, in which case no SEG is written
and the reason is returned. A CT whose missing slices were interpolated has more grid slices than
instances: the SEG holds the frames at the real instances' positions, each referencing its instance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

import medfusion
from medfusion.io.atomic import atomic_path
from medfusion.io.dicom import parse_decimal_string, raw_decimal_text
from medfusion.io.errors import InputError
from medfusion.io.volume import LabelMap, Volume
from medfusion.report.colours import class_colour

# SNOMED CT codes per class (category, type); unknown class names fall back to "Tissue".
_ABNORMAL = hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
_PROPERTY = {
    "tumour_core": (_ABNORMAL, hd.sr.CodedConcept("108369006", "SCT", "Neoplasm")),
    "oedema": (_ABNORMAL, hd.sr.CodedConcept("79654002", "SCT", "Edema")),
    "calcification": (_ABNORMAL, hd.sr.CodedConcept("18115005", "SCT", "Pathologic calcification")),
}
_TISSUE = hd.sr.CodedConcept("85756007", "SCT", "Tissue")
# Type 2 attributes highdicom copies from the first source image into the SEG's patient/study modules
_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
# Type 1 UIDs a SEG cannot be made without
_REQUIRED_UIDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "FrameOfReferenceUID",
)


@dataclasses.dataclass
class SegResult:
    """What `write_dicom_seg` did: the file written (None when it chose not to write) and notes."""

    path: Path | None
    notes: list[str] = dataclasses.field(default_factory=list)


def write_dicom_seg(
    labels: LabelMap | Volume,
    ct: Volume,
    class_names: list[str],
    path: str | Path,
    *,
    model_name: str,
    model_version: str,
) -> SegResult:
    """Write `labels` (on the CT's grid, values = class indices) as a BINARY DICOM SEG referencing the CT files.

    One segment per class (segment number = class index) in the report's colour
    (RecommendedDisplayCIELabValue, report/colours.py); a segment has frames only on the slices where
    it has voxels. SoftwareVersions is medfusion's version; the model's name and version are in each
    segment's algorithm identification.

    Returns the path and notes; a source that lacks a UID the SEG must reference is not written
    (`path` None, the reason in `notes`).

    Raises:
        ValueError: the CT was not read from DICOM, or the label map is not on the CT's grid (same
            shape, and spacing, origin and direction within 1e-3).
    """
    files = ct.meta.get("files")
    if not files:
        msg = "the CT was not read from DICOM; a DICOM SEG needs the source series"
        raise ValueError(msg)
    if not labels.same_grid(ct, tol=1e-3):
        msg = f"label map {labels.shape} at {labels.origin} is not on the CT grid {ct.shape} at {ct.origin}"
        raise ValueError(msg)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for f, ds in zip(files, sources, strict=True):
        blank = [k for k in _REQUIRED_UIDS if not str(ds.get(k, "") or "").strip()]
        if blank:
            return SegResult(None, [f"not written: {Path(f).name} has no {', '.join(blank)} to reference"])
    notes: list[str] = []
    deleted = sorted({k for ds in sources for k in _TYPE2 if k not in ds})
    for ds in sources:
        for attr in deleted:
            if attr not in ds:
                setattr(ds, attr, "")  # Type 2: present and empty, as the standard asks of a de-identifier
    if deleted:
        notes.append(f"source lacks {', '.join(deleted)} (de-identified?); written empty in the SEG")
    try:
        repaired = _repair_decimal_commas(sources)
    except ValueError as exc:
        return SegResult(None, [f"not written: {exc}"])
    if repaired:
        notes.append(
            f"source {', '.join(repaired)} did not read as numbers (decimal comma); the SEG uses the "
            "values the CT was read with"
        )
    geometry: dict[str, object] = {}
    why = _grid_differs(ct, sources)
    if why is None:
        try:
            frames, note = _frames_at_instances(labels, ct, sources)
        except ValueError as exc:
            why = str(exc)
        else:
            if note:
                notes.append(note)
    if why is not None:
        # the label map's grid is not the instances' (a tilted acquisition resampled onto an orthogonal
        # grid, or source geometry that had to be repaired on reading): the SEG keeps every grid slice
        # and states the grid's own plane positions, orientation and pixel measures (PS3.3 C.7.6.16),
        # still referencing the source series
        frames = labels.array.astype(np.uint8)
        geometry = _grid_geometry(ct)
        notes.append(f"frames on the corrected CT grid, not on the source instances ({why})")
    algo = hd.AlgorithmIdentificationSequence(
        name=model_name, version=model_version, family=codes.DCM.ArtificialIntelligence
    )
    descriptions = []
    for k, name in enumerate(class_names[1:], start=1):
        category, prop = _PROPERTY.get(name, (_TISSUE, _TISSUE))
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=k,
                segment_label=name,
                segmented_property_category=category,
                segmented_property_type=prop,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algo,
                # the report's overlay colour, so that a viewer shows the segment as the report does
                display_color=hd.color.CIELabColor.from_string(class_colour(k)),
            )
        )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,  # frames follow the CT's sorted slice order
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        # frames with no segment are left out; a map with nothing in it keeps them all (what highdicom
        # would fall back to anyway, with a warning per lesion-free patient)
        omit_empty_frames=bool(frames.any()),
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medfusion",
        manufacturer_model_name=model_name,
        software_versions=medfusion.__version__,  # the writer's version; the model's is in the algorithm
        device_serial_number="0",
        series_description="medfusion segmentation",
        **geometry,  # type: ignore[arg-type]
    )
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return SegResult(Path(path), notes)


# decimal-string attributes highdicom parses from the first (or every) source image, with their value counts
_SPATIAL_DS = {
    "PixelSpacing": 2,
    "SliceThickness": 1,
    "SpacingBetweenSlices": 1,
    "ImagePositionPatient": 3,
    "ImageOrientationPatient": 6,
}


def _repair_decimal_commas(sources: Sequence[pydicom.Dataset]) -> list[str]:
    """Rewrite, in the in-memory copies of the sources, the spatial decimal strings that the loader had
    to repair (a locale decimal comma, a comma between values: `io.dicom.parse_decimal_string`) with the
    values it read, as highdicom parses them itself. Returns the attributes rewritten.

    Raises:
        ValueError: a value does not read even so (the message names the file and the attribute).
    """
    repaired: set[str] = set()
    for ds in sources:
        for attr, n in _SPATIAL_DS.items():
            text = raw_decimal_text(ds, attr)
            if text is None:
                continue
            try:
                values, warning = parse_decimal_string(text, n, attr)
            except ValueError as exc:
                name = Path(str(getattr(ds, "filename", "") or "a source image")).name
                raise ValueError(f"{name}: {exc}") from None
            if warning is not None:
                setattr(ds, attr, [f"{v:.10g}" for v in values] if n > 1 else f"{values[0]:.10g}")
                repaired.add(attr)
    return sorted(repaired)


def _grid_differs(ct: Volume, sources: Sequence[pydicom.Dataset]) -> str | None:
    """Why the CT grid's in-plane geometry is not the source instances' own (None when it is): another
    matrix, orientation or pixel spacing, or a PixelSpacing that does not read as two numbers."""
    nz, ny, nx = ct.array.shape
    direction = np.asarray(ct.direction, float)
    iop = np.concatenate([direction[:, 0], direction[:, 1]])
    for ds in sources:
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
            spacing = [float(v) for v in ds.PixelSpacing]
            orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        except (AttributeError, TypeError, ValueError):
            return "the source's PixelSpacing, ImageOrientationPatient or matrix does not read as numbers"
        if (rows, cols) != (ny, nx):
            return f"source matrix {rows}×{cols}, grid {ny}×{nx}"
        if len(spacing) != 2 or not np.allclose(spacing, [ct.spacing[1], ct.spacing[0]], atol=1e-3):
            return f"source PixelSpacing {spacing}, grid {ct.spacing[1]:g}, {ct.spacing[0]:g}"
        if orientation.shape != (6,) or not np.allclose(orientation, iop, atol=1e-4):
            return "source ImageOrientationPatient differs from the grid's"
    return None


def _grid_geometry(ct: Volume) -> dict[str, object]:
    """highdicom's plane positions, orientation and pixel measures of every slice of the CT grid (LPS)."""
    direction = np.asarray(ct.direction, float)
    origin = np.asarray(ct.origin, float)
    step = direction[:, 2] * float(ct.spacing[2])
    patient = hd.CoordinateSystemNames.PATIENT
    return {
        "plane_positions": [
            hd.PlanePositionSequence(patient, image_position=(origin + k * step).tolist())
            for k in range(ct.array.shape[0])
        ],
        "plane_orientation": hd.PlaneOrientationSequence(
            patient, image_orientation=np.concatenate([direction[:, 0], direction[:, 1]]).tolist()
        ),
        "pixel_measures": hd.PixelMeasuresSequence(
            pixel_spacing=[float(ct.spacing[1]), float(ct.spacing[0])], slice_thickness=float(ct.spacing[2])
        ),
    }


def _frames_at_instances(
    labels: Volume, ct: Volume, sources: Sequence[pydicom.Dataset]
) -> tuple[np.ndarray, str]:
    """The label slices lying at the source instances' positions, one per instance (sorted as the CT
    files are). The CT grid has more slices than instances when missing slices were interpolated;
    those extra slices have no instance to reference and stay in the NIfTI only. Raises ValueError when
    an instance lies off the grid's slices (a series resampled along z onto an even spacing, even with
    as many slices as instances): the caller then writes the grid's own geometry."""
    arr = labels.array.astype(np.uint8)
    normal = np.asarray(ct.direction, float)[:, 2]
    origin = np.asarray(ct.origin, float)
    step = float(ct.spacing[2])
    try:
        dist = np.array(
            [float(np.dot(np.asarray(ds.ImagePositionPatient, float) - origin, normal)) for ds in sources]
        )
    except (AttributeError, TypeError, ValueError) as exc:
        msg = (
            f"CT grid has {arr.shape[0]} slices for {len(sources)} instances without positions to match them"
        )
        raise ValueError(msg) from exc
    index = np.round(dist / step).astype(int)
    off = np.abs(dist - index * step)
    if np.any(index < 0) or np.any(index >= arr.shape[0]) or np.any(off > 0.05 * step + 1e-3):
        msg = f"CT grid has {arr.shape[0]} slices for {len(sources)} instances whose positions are not on it"
        raise ValueError(msg)
    extra = arr.shape[0] - len(sources)
    if extra == 0:
        return arr[index], ""
    return arr[index], (
        f"{extra} interpolated CT slice(s) have no source instance: the SEG holds the {len(sources)} "
        "real slices, each referencing its instance (segmentation.nii.gz has every slice)"
    )


def read_dicom_seg(path: str | Path) -> LabelMap:
    """A DICOM SEG as a `LabelMap` (int16 segment numbers as values, overlaps resolved to the highest).

    Raises:
        InputError: the file is not a readable DICOM SEG.
    """
    path = Path(path)
    try:
        seg = hd.seg.segread(str(path))
        vol = seg.get_volume(combine_segments=True, skip_overlap_checks=True)
    except Exception as exc:
        raise InputError(path, f"not a readable DICOM SEG ({type(exc).__name__}: {exc})") from exc
    aff = np.asarray(vol.affine, float)
    cols = aff[
        :3, [2, 1, 0]
    ]  # highdicom indexes (slice, row, column); Volume's i, j, k are column, row, slice
    spacing = np.linalg.norm(cols, axis=0)
    return LabelMap(
        np.asarray(vol.array).astype(np.int16),
        tuple(spacing),
        tuple(aff[:3, 3]),
        cols / spacing,
        "SEG",
        {"source": str(path)},
    )
