"""The registration QC on synthetic patients: it passes the true transform, and fails — naming the
reason — a spoiled transform, an MR of another patient, and an MR whose field of view misses the CT."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.config import RegistrationConfig
from medfusion.io.case import Case, load_case
from medfusion.preprocess.registration import compare_identity, qc_summary, quality_check

QUICK = RegistrationConfig(consistency_check=False)


def _truth(cohort: Path, pid: str) -> np.ndarray:
    data = json.loads((cohort / "labels" / pid / "truth.json").read_text())
    return np.array(data["registration"]["matrix_lps"])


def _case(cohort: Path, index: int) -> Case:
    pid = sorted(p.name for p in (cohort / "patients").iterdir())[index]
    return load_case(cohort / "patients" / pid)


def spoil(matrix: np.ndarray, deg: float, mm: float, seed: int) -> np.ndarray:
    """`matrix` rotated by `deg` about a random axis and shifted by `mm` in a random direction."""
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3)
    rot = sitk.VersorTransform((axis / np.linalg.norm(axis)).tolist(), float(np.radians(deg)))
    shift = rng.normal(size=3)
    out = matrix.copy()
    out[:3, :3] = matrix[:3, :3] @ np.array(rot.GetMatrix()).reshape(3, 3)
    out[:3, 3] += shift * mm / np.linalg.norm(shift)
    return out


def test_qc_passes_the_true_transform_and_records_its_limits(cohort: Path) -> None:
    case = _case(cohort, 0)
    assert case.ct is not None
    qc = quality_check(case.ct, case.mr[0], _truth(cohort, case.patient_id), QUICK)
    assert qc["passed"], qc["reasons"]
    assert qc["reasons"] == []
    for name in ("identity", "field_of_view", "reoptimisation"):
        assert {"value", "limit", "rule", "passed"} <= set(qc["checks"][name])
    assert qc["checks"]["identity"]["compared"]["patient_id"] == "same"
    assert qc["checks"]["field_of_view"]["value"] > 0.9
    assert qc_summary(qc).startswith("PASSED")


@pytest.mark.parametrize("seed", [0, 1])
def test_qc_fails_a_transform_spoiled_by_5mm_and_5deg(cohort: Path, seed: int) -> None:
    case = _case(cohort, 0)
    assert case.ct is not None
    wrong = spoil(_truth(cohort, case.patient_id), 5.0, 5.0, seed)
    qc = quality_check(case.ct, case.mr[0], wrong, QUICK)
    check = qc["checks"]["reoptimisation"]
    assert not qc["passed"] and not check["passed"]
    assert check["value"] > check["limit"]
    assert check["metric_at_reoptimised"] < check["metric_at_transform"]
    assert "better-scoring transform" in qc["reasons"][0]


def test_qc_fails_an_mr_of_another_patient(cohort: Path) -> None:
    # patients 0 and 2 of the test cohort both have a DICOM MR, so both carry identities
    case0, case2 = _case(cohort, 0), _case(cohort, 2)
    assert case0.ct is not None
    ids = compare_identity(case0.ct, case2.mr[0])
    assert ids["patient_id"] == "differs" and ids["study_uid"] == "differs"
    qc = quality_check(case0.ct, case2.mr[0], _truth(cohort, case0.patient_id), QUICK)
    assert not qc["passed"] and not qc["checks"]["identity"]["passed"]
    assert set(qc["checks"]["identity"]["value"]) == {"patient_id", "study_uid", "frame_of_reference_uid"}
    assert "PatientID" in qc["reasons"][0]
    # fields outside identity_must_match are warnings, not failures
    assert any("StudyInstanceUID" in w for w in qc["warnings"])
    strict = quality_check(
        case0.ct,
        case2.mr[0],
        _truth(cohort, case0.patient_id),
        QUICK.model_copy(update={"identity_must_match": ["study_uid"]}),
    )
    assert not strict["passed"] and "StudyInstanceUID" in strict["reasons"][0]


def test_qc_fails_an_mr_whose_field_of_view_misses_the_ct(cohort: Path) -> None:
    case = _case(cohort, 0)
    assert case.ct is not None
    mr = case.mr[0]
    # the same MR written 300 mm further along the patient: under the true transform it lies below the CT
    far = dataclasses.replace(mr, origin=(mr.origin[0], mr.origin[1], mr.origin[2] - 300.0))
    qc = quality_check(case.ct, far, _truth(cohort, case.patient_id), QUICK)
    assert not qc["passed"] and not qc["checks"]["field_of_view"]["passed"]
    assert qc["checks"]["field_of_view"]["value"] < 0.05
    assert "field of view" in qc["reasons"][0]


def test_register_command_refuses_another_patients_mr(cohort: Path, tmp_path: Path) -> None:
    p0, p2 = (sorted((cohort / "patients").iterdir())[i] for i in (0, 2))
    mixed = tmp_path / "mixed"
    shutil.copytree(p0 / "CT", mixed / "CT")
    shutil.copytree(p2 / "MR", mixed / "MR")
    res = CliRunner().invoke(app, ["register", str(mixed), "--out", str(tmp_path / "reg"), "--no-check"])
    assert res.exit_code == 1, res.output
    assert "FAILED" in res.output and "PatientID" in res.output
    qc = json.loads((tmp_path / "reg" / "qc.json").read_text())
    assert not qc["passed"] and qc["checks"]["identity"]["value"]
