"""A small DICOM CT (one file per slice, as a hospital exports it) with a label map on its grid, for
the DICOM writers' tests (SEG, SR, encapsulated PDF)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfusion.io.dicom import load_series, scan_folder
from medfusion.io.volume import Volume
from medfusion.synth.export import StudyInfo, uid, write_series

CLASS_NAMES = ["background", "tumour_core", "oedema", "calcification"]


def dicom_ct(folder: Path, *, n_lesions: int = 2) -> tuple[Volume, Volume]:
    """A 16 × 32 × 32 CT head (1 × 1 × 2 mm, LPS) written as DICOM into `folder`, read back, and a label
    map on its grid with `n_lesions` lesions (0, 1 or 2): a large one at the patient's left and a
    smaller one at the right, each a core inside oedema."""
    shape = (16, 32, 32)
    study = StudyInfo(
        patient_id="DCM001",
        patient_name="SYNTHETIC^DCM001",
        sex="F",
        birth_date="19700302",
        study_uid=uid("study", "dcm-test"),
        study_date="20250105",
        accession="A1234567",
        frame_of_reference_uid=uid("for", "dcm-test"),
    )
    hu = np.full(shape, -1000.0)
    hu[2:14, 4:28, 4:28] = 35.0
    grid = Volume(hu.astype(np.float32), (1.0, 1.0, 2.0), (-16.0, -16.0, -16.0), np.eye(3), "CT")
    stored = (hu + 1024).astype(np.uint16)
    write_series(
        grid,
        stored,
        folder,
        study,
        np.random.default_rng(0),
        modality="CT",
        series_number=2,
        description="Head 2mm",
        intercept=-1024,
    )
    scan = scan_folder(folder, workers=1)
    ct = load_series(scan.series[0], workers=1)
    lab = np.zeros(shape, np.int16)
    if n_lesions >= 1:
        lab[5:11, 10:22, 18:27] = 2
        lab[6:10, 12:20, 20:25] = 1
        lab[7, 15, 22] = 3
    if n_lesions >= 2:
        lab[4:7, 8:13, 6:10] = 2
        lab[5:7, 9:12, 7:9] = 1
    return ct, ct.with_array(lab, "SEG")
