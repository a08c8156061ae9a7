"""DICOM Segmentation (BINARY) through highdicom: write one referencing the source CT series, read one back."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from medfusion.io.atomic import atomic_path
from medfusion.io.errors import InputError
from medfusion.io.volume import Volume

# SNOMED CT codes per class (category, type); unknown class names fall back to "Tissue".
_ABNORMAL = hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
_PROPERTY = {
    "tumour_core": (_ABNORMAL, hd.sr.CodedConcept("108369006", "SCT", "Neoplasm")),
    "oedema": (_ABNORMAL, hd.sr.CodedConcept("79654002", "SCT", "Edema")),
    "calcification": (_ABNORMAL, hd.sr.CodedConcept("18115005", "SCT", "Pathologic calcification")),
}
_TISSUE = hd.sr.CodedConcept("85756007", "SCT", "Tissue")


def write_dicom_seg(
    labels: Volume,
    ct: Volume,
    class_names: list[str],
    path: str | Path,
    *,
    model_name: str,
    model_version: str,
) -> Path:
    """Write `labels` (on the CT's grid, values = class indices) as a BINARY DICOM SEG referencing the CT files."""
    files = ct.meta.get("files")
    if not files:
        msg = "the CT was not read from DICOM; a DICOM SEG needs the source series"
        raise ValueError(msg)
    if labels.shape != ct.shape:
        msg = f"label map {labels.shape} is not on the CT grid {ct.shape}"
        raise ValueError(msg)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
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
            )
        )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=labels.array.astype(np.uint8),  # frames follow the CT's sorted slice order
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        # frames with no segment are left out; a map with nothing in it keeps them all (what highdicom
        # would fall back to anyway, with a warning per lesion-free patient)
        omit_empty_frames=bool(labels.array.any()),
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medfusion",
        manufacturer_model_name=model_name,
        software_versions=model_version,
        device_serial_number="0",
        series_description="medfusion segmentation",
    )
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return Path(path)


def read_dicom_seg(path: str | Path) -> Volume:
    """A DICOM SEG as a label Volume (segment numbers as values, overlaps resolved to the highest)."""
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
    return Volume(
        np.asarray(vol.array).astype(np.int16),
        tuple(spacing),
        tuple(aff[:3, 3]),
        cols / spacing,
        "SEG",
        {"source": str(path)},
    )
