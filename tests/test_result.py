"""The output contract: scores.json/qc.json written and read by one type; per-score decisions with an
indeterminate band; files of earlier versions (no "decision") and of later ones (unknown keys) read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from medfusion.config import DecisionConfig, PipelineConfig
from medfusion.run.result import CaseResult, Decision, OutputsRecord, QCRecord, Scores, Verdict, decide

OLD_SCORES = {  # a 0.8 scores.json, abridged to the keys the contract names
    "patient_id": "P1",
    "probabilities": {"malignant": 0.55},
    "predicted": {"malignant": True},
    "threshold": 0.5,
    "uncertainty": {"malignant": 0.02},
    "domain": {"in_domain": True, "distance": 7.8, "threshold": 17.2, "reasons": []},
    "measurements": {
        "volumes_ml": {"tumour_core": 1.5},
        "lesion_count": 1,
        "largest_diameter_mm": 20.0,
        "lesion_diameters_mm": [20.0],
        "lesions": [
            {
                "number": 1,
                "volumes_ml": {"tumour_core": 1.5},
                "total_ml": 3.0,
                "core_diameter_mm": 20.0,
                "axial_diameters_mm": [18.0, 12.0],
                "centroid_lps": [1.0, 2.0, 3.0],
                "side": "left",
                "region": "anterior superior",
                "ct_core_hu": 40.0,
                "mr_enhancement_ratio": None,
            }
        ],
    },
    "model": {"name": "m", "version": "1"},
    "qc_verdict": "pass",
    "timings_s": {"load": 0.1},
}


@pytest.mark.parametrize(
    ("p", "in_domain", "expected"),
    [
        (0.39, True, Decision.NEGATIVE),
        (0.40, True, Decision.INDETERMINATE),  # low is inside the band
        (0.5999, True, Decision.INDETERMINATE),
        (0.60, True, Decision.POSITIVE),  # high is outside
        (0.99, False, Decision.NOT_ASSESSED),
    ],
)
def test_decision_band_edges(p: float, in_domain: bool, expected: Decision) -> None:
    assert decide(p, threshold=0.5, band=(0.4, 0.6), in_domain=in_domain) is expected
    assert decide(0.45, threshold=0.5, band=(0.5, 0.5), in_domain=True) is Decision.NEGATIVE  # empty band


def test_band_must_surround_the_threshold() -> None:
    assert PipelineConfig().decision.indeterminate_band == (0.4, 0.6)
    with pytest.raises(ValidationError, match="low ≤ threshold"):
        DecisionConfig(threshold=0.5, indeterminate_band=(0.55, 0.7))


def test_an_earlier_file_reads_with_the_decision_its_predicted_implies(tmp_path: Path) -> None:
    (tmp_path / "scores.json").write_text(json.dumps(OLD_SCORES))
    result = CaseResult.load(tmp_path)  # no qc.json: an empty record
    s = result.scores
    assert s.decision == {"malignant": Decision.POSITIVE} and s.indeterminate_band is None
    assert s.measurements.lesions[0].axial_diameters_mm == (18.0, 12.0)
    assert result.qc == QCRecord(patient_id="P1")
    out = json.loads(json.dumps(CaseResult.scores_json(s)))  # as written to the file
    assert {k: v for k, v in out.items() if k != "decision"} == OLD_SCORES
    out_of_domain = dict(OLD_SCORES, predicted=None)
    assert Scores.model_validate(out_of_domain).decision == {"malignant": Decision.NOT_ASSESSED}


def test_written_and_read_by_the_same_code_keeping_unknown_keys(tmp_path: Path) -> None:
    newer = dict(
        OLD_SCORES, decision={"malignant": "indeterminate"}, indeterminate_band=[0.4, 0.6], later_key={"x": 1}
    )
    scores = Scores.model_validate(newer)
    qc = QCRecord(patient_id="P1", verdict=Verdict.WARN, registration={"mode": "none"})
    CaseResult(scores=scores, qc=qc).write_scores(tmp_path)
    CaseResult(scores=scores, qc=qc).write_qc(tmp_path)
    raw = json.loads((tmp_path / "scores.json").read_text())
    assert raw["decision"] == {"malignant": "indeterminate"} and raw["later_key"] == {"x": 1}
    assert list(raw)[:6] == [
        "patient_id",
        "probabilities",
        "predicted",
        "threshold",
        "indeterminate_band",
        "decision",
    ]
    back = CaseResult.load(tmp_path)
    assert back.scores == scores and back.qc.verdict is Verdict.WARN
    assert json.loads((tmp_path / "qc.json").read_text()) == {
        "patient_id": "P1",
        "registration": {"mode": "none"},
        "verdict": "warn",
    }


def test_a_broken_file_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "scores.json").write_text(json.dumps({"patient_id": "P1", "probabilities": {"m": "high"}}))
    with pytest.raises(ValueError, match=r"scores.json: does not fit medfusion's output contract") as err:
        CaseResult.load_scores(tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="cannot read"):
        CaseResult.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="probabilities.m"):
        CaseResult.load_probabilities(tmp_path)
    (tmp_path / "scores.json").write_text(json.dumps({"probabilities": {"m": 0.25}}))  # another tool's
    assert CaseResult.load_probabilities(tmp_path) == {"m": 0.25}


@pytest.mark.parametrize(("in_domain", "qc_passed"), [(True, True), (False, False)])
def test_the_pipeline_builds_the_contract_from_the_stages(
    tmp_path: Path, in_domain: bool, qc_passed: bool
) -> None:
    from types import SimpleNamespace

    import numpy as np

    from medfusion.config import PreprocessConfig
    from medfusion.io.case import Case
    from medfusion.io.volume import Volume
    from medfusion.preprocess.prepare import prepare_case
    from medfusion.preprocess.registration import RegistrationResult
    from medfusion.run.measure import measure
    from medfusion.run.pipeline import RunOptions, case_result

    ct = np.full((16, 16, 16), -1000, np.int16)
    ct[3:13, 3:13, 3:13] = 30
    case = Case(
        "P1",
        tmp_path,
        ct=Volume(ct, (2.0, 2.0, 2.0), modality="CT", meta={"format": "dicom"}),
        mr=[
            Volume(
                np.ones((16, 16, 16), np.float32), (2.0, 2.0, 2.0), modality="MR", meta={"format": "dicom"}
            )
        ],
    )
    reg = RegistrationResult(np.eye(4), -0.5, 1, 0.0, "given", {"passed": qc_passed, "reasons": []})
    cfg = PreprocessConfig(target_spacing_mm=4.0, target_size=[8, 8, 8])
    inputs = prepare_case(case, cfg, registration=reg)
    labels = case.ct.with_array(np.zeros((16, 16, 16), np.int16), "SEG")  # type: ignore[union-attr]
    pred = SimpleNamespace(scores={"malignant": 0.45}, uncertainty={"malignant": 0.01}, features={})
    predictor = SimpleNamespace(
        describe=lambda: {"name": "m", "version": "1"}, device="cpu", amp=False, sw_batch_size=2, seed=0
    )
    domain = {
        "in_domain": in_domain,
        "distance": 1.0,
        "threshold": 2.0,
        "reasons": [] if in_domain else ["far"],
    }
    result = case_result(
        case,
        inputs,
        pred,  # type: ignore[arg-type]
        domain,
        measure(labels, ["background", "tumour_core"]),
        RunOptions(out=tmp_path, pipeline=PipelineConfig()),
        predictor,  # type: ignore[arg-type]
        cfg,
    )
    s, qc = result.scores, result.qc
    assert s.decision == {"malignant": Decision.INDETERMINATE if in_domain else Decision.NOT_ASSESSED}
    assert (s.predicted == {"malignant": False}) if in_domain else s.predicted is None
    assert qc.mr_used_by_model is qc_passed and qc.verdict is (Verdict.PASS if qc_passed else Verdict.FAIL)
    assert s.qc_verdict is qc.verdict and s.indeterminate_band == (0.4, 0.6)


# --- Readers of the contract (#29): the summary row, evaluate, the training cache, `medfusion register` ---


def _written(folder: Path) -> CaseResult:
    scores = Scores.model_validate({**OLD_SCORES, "inference": {"device": "cpu"}})
    qc = QCRecord(patient_id="P1", outputs=OutputsRecord(written=["report.pdf"], failed={"seg": "boom"}))
    result = CaseResult(scores=scores, qc=qc)
    folder.mkdir(parents=True, exist_ok=True)
    result.write_qc(folder)
    result.write_scores(folder)
    return result


def test_the_summary_row_is_read_through_the_contract(tmp_path: Path) -> None:
    from medfusion.run.folders import patient_row

    _written(tmp_path / "P1")
    row = patient_row(tmp_path / "P1")
    assert row == {
        "patient_id": "P1",
        "status": "ok",
        "qc_verdict": "pass",
        "device": "cpu",
        "p_malignant": 0.55,
        "in_domain": True,
        "pred_malignant": 1,
        "decision_malignant": "positive",  # a 0.8 file: the decision its "predicted" implies
        "u_malignant": 0.02,
        "vol_tumour_core_ml": 1.5,
        "lesion_count": 1,
        "largest_diameter_mm": 20.0,
        "outputs_failed": "seg",
        "t_load": 0.1,
    }
    assert all(type(v) in (str, int, float, bool) for v in row.values())  # plain values for the CSV
    (tmp_path / "P1" / "qc.json").write_text('{"patient_id": "P1", "verdict": "maybe"}')
    # a folder that does not fit the contract (an older medfusion's) is listed, with the one-line
    # reason, instead of stopping the summary of the rest
    bad = patient_row(tmp_path / "P1")
    assert bad["status"] == "unreadable" and "\n" not in bad["error"]
    assert re.search(r"P1/qc.json: does not fit .*verdict", bad["error"]), bad


def test_probabilities_and_qc_read_alone(tmp_path: Path) -> None:
    _written(tmp_path)
    scored = CaseResult.load_scored(tmp_path)
    assert scored.probabilities == {"malignant": 0.55} and scored.threshold == 0.5
    (tmp_path / "scores.json").write_text(json.dumps({"probabilities": {"m": 0.3}, "threshold": 0.7}))
    assert CaseResult.load_scored(tmp_path).threshold == 0.7  # another tool's file, with its threshold
    assert CaseResult.load_qc(tmp_path).outputs == OutputsRecord(
        written=["report.pdf"], failed={"seg": "boom"}
    )
    (tmp_path / "qc.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"qc.json: expected a JSON object, got list"):
        CaseResult.load_qc(tmp_path)


def test_the_model_record_reads_alone(tmp_path: Path) -> None:
    """Which package wrote a scores.json (a resume's and calibration's question), even from a stub."""
    sha = "ab" * 32
    model = {"name": "m", "version": "2", "weights_sha256": sha, "domain_sha256": None}
    (tmp_path / "scores.json").write_text(json.dumps({"patient_id": "P1", "model": model}))
    rec = CaseResult.load_model(tmp_path)
    assert rec is not None and rec.weights_sha256 == sha and rec.architecture is None
    assert rec.model_dump(mode="json", exclude_unset=True) == model  # the keys as written, no more
    (tmp_path / "scores.json").write_text(json.dumps({"probabilities": {"m": 0.3}}))
    assert CaseResult.load_model(tmp_path) is None
    (tmp_path / "scores.json").write_text(json.dumps({"model": "m 2"}))
    with pytest.raises(ValueError, match=r"scores.json: does not fit .*model"):
        CaseResult.load_model(tmp_path)


def test_register_writes_a_contract_qc_json_keeping_its_flat_keys(tmp_path: Path) -> None:
    from medfusion.config import RegistrationConfig
    from medfusion.run.qc import register_patient

    patient = sorted((Path(__file__).resolve().parents[1] / "sample_data" / "patients").iterdir())[0]
    cfg = RegistrationConfig(mode="skip", consistency_check=False)  # the identity: no optimisation
    pid, res = register_patient(patient, tmp_path, cfg)
    qc = CaseResult.load_qc(tmp_path)
    assert pid == patient.name == qc.patient_id and res.mode == "skip"
    assert qc.registration.mode == "skip" and qc.registration.settings_from == "command line"
    assert qc.registration.settings == cfg.model_dump(mode="json")
    assert qc.inputs["ct"]["modality"] == "CT" and len(qc.inputs["mr"]) >= 1
    assert qc.verdict is Verdict.PASS and qc.mr_used_by_model
    raw = json.loads((tmp_path / "qc.json").read_text())
    assert raw["seconds"] == 0.0 and "metric_mattes_mi" in raw  # as `medfusion register` wrote them
    assert (tmp_path / "transform.json").exists() and (tmp_path / "mr_in_ct.nii.gz").exists()


def test_a_result_that_does_not_fit_the_contract_is_not_done(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from medfusion.run.folders import is_done

    _written(tmp_path / "P1")
    assert is_done(tmp_path, "P1")
    (tmp_path / "P1" / "scores.json").write_text('{"patient_id": "P1"')  # truncated
    with caplog.at_level("WARNING", logger="medfusion.run"):
        assert not is_done(tmp_path, "P1")  # --resume runs it again instead of keeping it
    assert "P1/scores.json" in caplog.text and "\n" not in caplog.text.strip()
    _written(tmp_path / "P2")
    (tmp_path / "P2" / "qc.json").write_text('{"patient_id": "P2", "verdict": "maybe"}')
    assert not is_done(tmp_path, "P2")
    assert not is_done(tmp_path, "P3")  # no folder


def test_an_unreadable_error_json_is_a_row_naming_the_file(tmp_path: Path) -> None:
    from medfusion.run.folders import patient_row

    (tmp_path / "P1").mkdir()
    (tmp_path / "P1" / "error.json").write_text('{"stage": "load", "err')
    row = patient_row(tmp_path / "P1")
    assert row["status"] == "unreadable" and "\n" not in row["error"]
    assert "P1/error.json: cannot read" in row["error"], row
    (tmp_path / "P1" / "error.json").write_text("[1]")
    assert "P1/error.json" in patient_row(tmp_path / "P1")["error"]
    (tmp_path / "P1" / "error.json").write_text('{"stage": "load", "error": "boom"}')
    assert patient_row(tmp_path / "P1")["status"] == "failed"


def test_a_nifti_input_is_recorded_with_the_sha256_of_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from medfusion.hashing import sha256_of
    from medfusion.run import pipeline

    src = tmp_path / "ct.nii.gz"
    src.write_bytes(b"not really a NIfTI")
    ct = SimpleNamespace(modality="CT", meta={"format": "nifti", "source": str(src)})
    case = SimpleNamespace(ct=ct, mr=[], note_path=None)
    inputs = pipeline._provenance(case)  # type: ignore[arg-type]
    assert inputs["ct"] == {
        "modality": "CT",
        "format": "nifti",
        "series_description": "",
        "file": "ct.nii.gz",
        "sha256": sha256_of(src),
    }
    # through medfusion's one file hasher (chunked), not a copy of the file in memory
    monkeypatch.setattr(pipeline, "sha256_of", lambda path: "hashed by sha256_of")
    assert pipeline._provenance(case)["ct"]["sha256"] == "hashed by sha256_of"  # type: ignore[arg-type]


REGISTRATION = {  # qc.json "registration" as `RegistrationResult.to_json` and run/qc.py write it
    "matrix_lps": [[1.0, 0.0, 0.0, 2.5], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
    "convention": "ITK: maps a CT (fixed) point in LPS mm to the corresponding MR (moving) point",
    "metric_mattes_mi": -0.61,
    "iterations": 120,
    "seconds": 3.2,
    "mode": "auto",
    "qc": {"passed": True},
    "settings_from": "library",
    "later_key": 1,
}


def test_registration_record_is_typed_and_a_truncated_one_names_its_file(tmp_path: Path) -> None:
    (tmp_path / "qc.json").write_text(json.dumps({"patient_id": "P1", "registration": REGISTRATION}))
    reg = CaseResult.load_qc(tmp_path).registration
    assert reg.matrix_lps is not None and reg.matrix_lps[0][3] == 2.5 and reg.iterations == 120
    assert reg.ran and reg.qc == {"passed": True}
    assert reg.model_dump(exclude_unset=True) == REGISTRATION  # unknown keys kept, nothing added
    assert not QCRecord(
        patient_id="P1", registration={"mode": "none", "reason": "no MR volume"}
    ).registration.ran
    for drop in ("matrix_lps", "iterations"):
        truncated = {k: v for k, v in REGISTRATION.items() if k != drop}
        (tmp_path / "qc.json").write_text(json.dumps({"patient_id": "P1", "registration": truncated}))
        with pytest.raises(
            ValueError, match=rf"^{re.escape(str(tmp_path / 'qc.json'))}: .*lacks {drop}"
        ) as exc:
            CaseResult.load_qc(tmp_path)
        assert "\n" not in str(exc.value)


def test_training_cache_refuses_a_qc_json_donor_without_its_registration(tmp_path: Path) -> None:
    """`--registration-from` a run folder whose qc.json lacks the registration's keys: one line naming
    the file, not a KeyError (the check runs before the patient folder is read)."""
    import SimpleITK as sitk

    from medfusion.config import PreprocessConfig
    from medfusion.train.data import _cache_one

    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    run = tmp_path / "run"
    (run / "P1").mkdir(parents=True)
    qc_path = run / "P1" / "qc.json"
    cfg = PreprocessConfig().model_dump_json()
    args = (str(tmp_path / "P1"), str(tmp_path / "labels"), cfg, str(tmp_path / "cache"), str(run))
    try:
        for registration in ({"mode": "auto", "iterations": 3}, {}):
            qc_path.write_text(json.dumps({"patient_id": "P1", "registration": registration}))
            with pytest.raises(ValueError, match=rf"^{re.escape(str(qc_path))}: ") as exc:
                _cache_one(*args)
            assert "\n" not in str(exc.value)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
