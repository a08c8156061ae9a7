"""The PDF report as a DICOM Encapsulated PDF (PS3.3 A.45.1), in the CT's study, so that a PACS keeps
it beside the images.

The patient and study modules are copied from the CT's first instance (highdicom's
`SOPClass.copy_patient_and_study_information`); Type 2 attributes the source lacks (a de-identifier
may delete them) are written present and empty, as PS3.3 asks. The document is stored byte for byte:
the odd-length padding DICOM requires is undone by EncapsulatedDocumentLength.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

import medfusion
from medfusion.io.atomic import atomic_path
from medfusion.io.volume import Volume

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
# Type 2 attributes of the Patient and General Study modules
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_TITLE = "medfusion multimodal imaging report (research use only)"


def write_encapsulated_pdf(
    pdf: str | Path, ct: Volume, path: str | Path, *, series_description: str = "medfusion report"
) -> Path:
    """Write the PDF file `pdf` as a DICOM Encapsulated PDF in the study of `ct` (a DICOM CT: its
    ``meta["files"]`` are the source instances) to `path`, atomically.

    Returns:
        `path`.

    Raises:
        ValueError: the CT was not read from DICOM, its first instance has no StudyInstanceUID, or
            `pdf` is not a PDF file.
    """
    files = ct.meta.get("files")
    if not files:
        msg = "the CT was not read from DICOM; an encapsulated PDF needs its study"
        raise ValueError(msg)
    data = Path(pdf).read_bytes()
    if not data.startswith(b"%PDF"):
        msg = f"{Path(pdf).name} is not a PDF file (no %PDF header)"
        raise ValueError(msg)
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid = str(src.get("StudyInstanceUID", "") or "").strip()
    if not study_uid:
        msg = f"{Path(files[0]).name} has no StudyInstanceUID to file the report under"
        raise ValueError(msg)
    now = dt.datetime.now()
    doc = hd.SOPClass(
        study_instance_uid=study_uid,
        series_instance_uid=hd.UID(),
        series_number=302,
        sop_instance_uid=hd.UID(),
        sop_class_uid=ENCAPSULATED_PDF_STORAGE,
        instance_number=1,
        modality="DOC",
        manufacturer="medfusion",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description,
        software_versions=medfusion.__version__,
        content_date=now.date(),
        content_time=now.time().replace(microsecond=0),
    )
    doc.copy_patient_and_study_information(src)
    for keyword in _TYPE2:
        if keyword not in doc:
            setattr(doc, keyword, "")
    doc.ConversionType = "WSD"  # SC Equipment module: a workstation made it
    doc.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    doc.BurnedInAnnotation = "YES"  # the report names the patient
    doc.DocumentTitle = _TITLE
    doc.ConceptNameCodeSequence = []
    doc.MIMETypeOfEncapsulatedDocument = "application/pdf"
    doc.EncapsulatedDocumentLength = len(data)
    doc.EncapsulatedDocument = data + (b"\x00" if len(data) % 2 else b"")
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    doc.SourceInstanceSequence = [ref]
    with atomic_path(path) as tmp:
        doc.save_as(tmp, enforce_file_format=True)
    return Path(path)


def read_encapsulated_pdf(path: str | Path) -> bytes:
    """The PDF bytes of a DICOM Encapsulated PDF, without the padding DICOM added.

    Raises:
        ValueError: `path` is not an Encapsulated PDF.
    """
    ds = pydicom.dcmread(str(path))
    if ds.get("SOPClassUID") != ENCAPSULATED_PDF_STORAGE:
        msg = f"{Path(path).name} is not a DICOM Encapsulated PDF (SOP class {ds.get('SOPClassUID')})"
        raise ValueError(msg)
    data = bytes(ds.EncapsulatedDocument)
    length = ds.get("EncapsulatedDocumentLength")
    return data[: int(length)] if length is not None else data
