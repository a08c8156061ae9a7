"""DICOM SEG display colours and version, and the report as DICOM Encapsulated PDF; both validated by
dciodvfy when dicom3tools is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from reportlab.pdfgen import canvas

import medfusion
from medfusion.io.docpdf import ENCAPSULATED_PDF_STORAGE, read_encapsulated_pdf, write_encapsulated_pdf
from medfusion.io.seg import write_dicom_seg
from medfusion.report.colours import class_colour
from tests.dicom_case import CLASS_NAMES, dicom_ct

needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed"
)


def dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]


def _pdf(path: Path, odd: bool) -> Path:
    c = canvas.Canvas(str(path))
    c.drawString(100, 750, "medfusion test report")
    c.save()
    data = path.read_bytes()
    if (len(data) % 2 == 1) != odd:
        path.write_bytes(data + b"\n")
    return path


def test_seg_colours_version_and_frames(tmp_path: Path) -> None:
    ct, labels = dicom_ct(tmp_path / "ct", n_lesions=1)
    labels.array[labels.array == 3] = 2  # no calcification: an empty segment
    res = write_dicom_seg(labels, ct, CLASS_NAMES, tmp_path / "seg.dcm", model_name="m", model_version="7")
    assert res.path is not None
    ds = pydicom.dcmread(res.path)
    assert ds.SoftwareVersions == medfusion.__version__
    for item in ds.SegmentSequence:
        k = int(item.SegmentNumber)
        lab = hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue)
        assert np.allclose(lab.to_rgb(), hd.color.CIELabColor.from_string(class_colour(k)).to_rgb(), atol=1)
    per_segment = [
        int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    core_slices = int(np.any(labels.array == 1, axis=(1, 2)).sum())
    assert per_segment.count(1) == core_slices
    assert 3 not in per_segment  # the empty segment has no frames


@pytest.mark.parametrize("odd", [True, False])
def test_encapsulated_pdf_round_trip(tmp_path: Path, odd: bool) -> None:
    ct, _ = dicom_ct(tmp_path / "ct", n_lesions=0)
    pdf = _pdf(tmp_path / "report.pdf", odd)
    out = write_encapsulated_pdf(pdf, ct, tmp_path / "report.dcm")
    assert read_encapsulated_pdf(out) == pdf.read_bytes()
    ds = pydicom.dcmread(out)
    src = pydicom.dcmread(ct.meta["files"][0], stop_before_pixels=True)
    assert ds.SOPClassUID == ENCAPSULATED_PDF_STORAGE and ds.Modality == "DOC"
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    for keyword in (
        "PatientID",
        "PatientName",
        "PatientSex",
        "StudyInstanceUID",
        "AccessionNumber",
        "StudyDate",
    ):
        assert ds[keyword].value == src[keyword].value, keyword
    assert ds.SourceInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID


def test_encapsulated_pdf_fills_deleted_type2_empty(tmp_path: Path) -> None:
    ct, _ = dicom_ct(tmp_path / "ct", n_lesions=0)
    for f in ct.meta["files"]:
        ds = pydicom.dcmread(f)
        del ds.AccessionNumber, ds.PatientBirthDate
        ds.save_as(f)
    out = write_encapsulated_pdf(_pdf(tmp_path / "r.pdf", False), ct, tmp_path / "report.dcm")
    ds = pydicom.dcmread(out)
    assert ds.AccessionNumber == "" and ds.PatientBirthDate == ""


def test_encapsulated_pdf_refuses_what_it_cannot_file(tmp_path: Path) -> None:
    ct, _ = dicom_ct(tmp_path / "ct", n_lesions=0)
    (tmp_path / "x.pdf").write_bytes(b"not a pdf")
    with pytest.raises(ValueError, match="not a PDF"):
        write_encapsulated_pdf(tmp_path / "x.pdf", ct, tmp_path / "r.dcm")
    ct.meta.pop("files")
    with pytest.raises(ValueError, match="not read from DICOM"):
        write_encapsulated_pdf(_pdf(tmp_path / "r.pdf", False), ct, tmp_path / "r.dcm")
    assert not (tmp_path / "r.dcm").exists()


@needs_dciodvfy
def test_dciodvfy_passes_seg_and_encapsulated_pdf(tmp_path: Path) -> None:
    ct, labels = dicom_ct(tmp_path / "ct", n_lesions=2)
    seg = write_dicom_seg(labels, ct, CLASS_NAMES, tmp_path / "seg.dcm", model_name="m", model_version="1")
    assert seg.path is not None
    assert dciodvfy_errors(seg.path) == []
    doc = write_encapsulated_pdf(_pdf(tmp_path / "r.pdf", True), ct, tmp_path / "report.dcm")
    assert dciodvfy_errors(doc) == []
