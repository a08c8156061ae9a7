"""DICOM SR (TID 1500) of a run's findings: one volumetric group per lesion, referencing the SEG."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes

from medfusion.io.seg import write_dicom_seg
from medfusion.io.sr import write_dicom_sr
from medfusion.run.measure import measure
from medfusion.run.result import Measurements
from tests.dicom_case import CLASS_NAMES, dicom_ct


def _write(
    tmp_path: Path, n_lesions: int, decision: str = "not assessed", p: float = 0.83, assessed: bool = True
) -> tuple[Path, Path, Measurements]:
    ct, labels = dicom_ct(tmp_path / "ct", n_lesions=n_lesions)
    seg = write_dicom_seg(labels, ct, CLASS_NAMES, tmp_path / "seg.dcm", model_name="m", model_version="1")
    assert seg.path is not None
    meas = measure(labels, CLASS_NAMES, ct=ct)
    sr = write_dicom_sr(
        seg.path,
        ct,
        CLASS_NAMES,
        tmp_path / "sr.dcm",
        lesions=meas.lesions,
        probabilities={"malignant": p},
        decisions={"malignant": decision},
        model_name="m",
        model_version="1",
        assessed=assessed,
    )
    return seg.path, sr, meas


def test_one_group_per_lesion_referencing_the_seg(tmp_path: Path) -> None:
    seg_path, sr_path, meas = _write(tmp_path, 2, "positive")
    sr = hd.sr.srread(str(sr_path))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    seg = pydicom.dcmread(seg_path)
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(meas.lesions) == 2
    for group, lesion in zip(groups, meas.lesions, strict=True):
        assert group.tracking_identifier == f"lesion {lesion.number}"
        ref = group.referenced_segment
        assert ref is not None
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [1]  # tumour core
        assert not ref.referenced_frame_numbers  # PS3.3: a segment reference is not narrowed to frames
        volume = group.get_measurements(name=codes.SCT.Volume)[0]
        assert volume.value == pytest.approx(lesion.volumes_ml["tumour_core"])
        assert volume.unit.value == "ml"
        long_axis = group.get_measurements(name=codes.SCT.LongAxis)[0]
        assert long_axis.value == pytest.approx(lesion.axial_diameters_mm[0])
        assert group.get_measurements(name=codes.SCT.ShortAxis)[0].unit == codes.UCUM.Millimeter
        hu = group.get_measurements(name=codes.DCM.AttenuationCoefficient)[0]
        assert hu.value == pytest.approx(35.0, abs=1)
        site = group.finding_sites[0]
        assert site.value == codes.SCT.Brain
    # lesion 1 (large, patient's left: high x) first, its laterality coded
    assert [lesion.side for lesion in meas.lesions] == ["left", "right"]
    assert groups[0].finding_sites[0].laterality == codes.SCT.Left
    assert groups[1].finding_sites[0].laterality == codes.SCT.Right
    # the scores: probability and the call
    scores = sr.content.get_image_measurement_groups()
    assert len(scores) == 1
    assert scores[0].get_measurements(name=codes.DCM.Probability)[0].value == pytest.approx(0.83)
    assert scores[0].get_qualitative_evaluations()[0].value == codes.SCT.Positive
    assert sr.PatientID == "DCM001" and sr.StudyInstanceUID == seg.StudyInstanceUID


def test_no_lesion_and_out_of_domain(tmp_path: Path) -> None:
    _, sr_path, meas = _write(tmp_path, 0, "not assessed")
    sr = hd.sr.srread(str(sr_path))
    assert meas.lesions == [] and sr.content.get_volumetric_roi_measurement_groups() == []
    scores = sr.content.get_image_measurement_groups()
    assert scores[0].get_qualitative_evaluations() == []  # no call out of the model's domain


def test_an_out_of_domain_sr_says_so_in_its_series_description(tmp_path: Path) -> None:
    _, sr_path, _ = _write(tmp_path, 1, "not assessed", assessed=False)
    sr = hd.sr.srread(str(sr_path))
    assert "NOT ASSESSED" in sr.SeriesDescription and len(sr.SeriesDescription) <= 64
    assert sr.CompletionFlag == "PARTIAL"
    _, sr_in, _ = _write(tmp_path / "in", 1, "positive")
    assert hd.sr.srread(str(sr_in)).SeriesDescription == "medfusion measurements"


def test_an_indeterminate_score_is_coded_as_such(tmp_path: Path) -> None:
    _, sr_path, _ = _write(tmp_path, 1, "indeterminate", p=0.55)
    scores = hd.sr.srread(str(sr_path)).content.get_image_measurement_groups()
    assert scores[0].get_qualitative_evaluations()[0].value == codes.SCT.Indeterminate


def test_refuses_a_nifti_ct(tmp_path: Path) -> None:
    ct, _ = dicom_ct(tmp_path / "ct", n_lesions=1)
    ct.meta.pop("files")
    with pytest.raises(ValueError, match="not read from DICOM"):
        write_dicom_sr(
            tmp_path / "x.dcm",
            ct,
            CLASS_NAMES,
            tmp_path / "sr.dcm",
            lesions=[],
            probabilities={},
            decisions={},
            model_name="m",
            model_version="1",
        )


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dciodvfy_finds_no_error(tmp_path: Path) -> None:
    _, sr_path, _ = _write(tmp_path, 2, "negative")
    res = subprocess.run(["dciodvfy", str(sr_path)], capture_output=True, text=True)
    errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors
