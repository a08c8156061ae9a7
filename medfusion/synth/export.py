"""Write synthetic volumes as a hospital export would: one DICOM file per slice, random file names."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from medfusion.io.atomic import atomic_path
from medfusion.io.volume import Volume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1523.1"


@dataclasses.dataclass
class StudyInfo:
    """The patient and study attributes a synthetic patient's DICOM series share (all synthetic: the
    name is SYNTHETIC^<id>; dates are DICOM DA strings, YYYYMMDD)."""

    patient_id: str
    patient_name: str
    sex: str  # "F" / "M"
    birth_date: str
    study_uid: str
    study_date: str
    accession: str
    frame_of_reference_uid: str


def uid(*parts: object) -> str:
    """A deterministic UID from its parts (the same seed gives the same UIDs)."""
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _base(
    study: StudyInfo,
    modality: str,
    sop_class: str,
    series_uid: str,
    series_number: int,
    description: str,
    manufacturer: str,
    model: str,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = study.accession
    ds.StudyDescription = "Head"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.SeriesDate = study.study_date
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.InstitutionName = "Synthetic Hospital"
    ds.SoftwareVersions = "medfusion-synth"
    ds.BodyPartExamined = "HEAD"
    ds.ContentDate = study.study_date
    ds.ContentTime = "101500"
    ds.AcquisitionNumber = 1
    return ds


def write_series(
    vol: Volume,
    stored: np.ndarray,
    out_dir: Path,
    study: StudyInfo,
    rng: np.random.Generator,
    *,
    modality: str,
    series_number: int,
    description: str,
    intercept: float = 0.0,
) -> list[Path]:
    """Write `stored` (uint16, array layout of `vol`) as one file per slice along k."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    series_uid = uid(study.study_uid, "series", series_number)
    maker = ("SIEMENS", "SOMATOM Force") if modality == "CT" else ("GE MEDICAL SYSTEMS", "SIGNA Premier")
    base = _base(study, modality, sop_class, series_uid, series_number, description, *maker)
    row, col = vol.direction[:, 0], vol.direction[:, 1]
    base.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
    base.PixelSpacing = [f"{vol.spacing[1]:.6g}", f"{vol.spacing[0]:.6g}"]
    base.SliceThickness = f"{vol.spacing[2]:.6g}"
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = int(stored.shape[1]), int(stored.shape[2])
    base.BitsAllocated = 16
    base.BitsStored = 12
    base.HighBit = 11
    base.PixelRepresentation = 0
    if modality == "CT":
        base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        base.RescaleIntercept = f"{intercept:g}"
        base.RescaleSlope = "1"
        base.RescaleType = "HU"
        base.KVP = "120"
        base.ConvolutionKernel = "Hr40"
        base.WindowCenter = "40"
        base.WindowWidth = "80"
    else:
        base.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        base.ScanningSequence = "GR"
        base.SequenceVariant = "SP"
        base.ScanOptions = ""
        base.MRAcquisitionType = "3D"
        base.RepetitionTime = "7.8"
        base.EchoTime = "3.1"
        base.EchoTrainLength = "1"
        base.MagneticFieldStrength = "3"
        base.ImagedNucleus = "1H"
        base.ContrastBolusAgent = "Gadoterate"
    paths: list[Path] = []
    for k in range(stored.shape[0]):
        ds = Dataset()
        ds.update(base)
        sop_uid = uid(series_uid, k)
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        pos = vol.index_to_world(np.array([[0.0, 0.0, float(k)]]))[0]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.SliceLocation = f"{float(np.dot(pos, np.cross(row, col))):.6f}"
        ds.PixelData = np.ascontiguousarray(stored[k], dtype="<u2").tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(sop_class)
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128
        name = "IM" + "".join(rng.choice(list("0123456789ABCDEF"), 10))
        path = out_dir / name
        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        paths.append(path)
    return paths


def study_info(patient_id: str, sex: str, age: int, seed: int, rng: np.random.Generator) -> StudyInfo:
    """A synthetic patient's study: a study date in 2025-2026 and a birth date `age` years before it
    (both drawn from `rng`), an accession number, and UIDs derived from (`seed`, `patient_id`) so that
    the same cohort seed gives the same UIDs. `sex` is "female" or "male" (DICOM "F" / "M")."""
    date = dt.date(2025, 1, 1) + dt.timedelta(days=int(rng.integers(0, 600)))
    birth = dt.date(date.year - age, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    return StudyInfo(
        patient_id=patient_id,
        patient_name=f"SYNTHETIC^{patient_id}",
        sex="F" if sex == "female" else "M",
        birth_date=birth.strftime("%Y%m%d"),
        study_uid=uid("study", seed, patient_id),
        study_date=date.strftime("%Y%m%d"),
        accession=f"A{int(rng.integers(10**6, 10**7))}",
        frame_of_reference_uid=uid("for", seed, patient_id),
    )
