"""qc.json, built in one place for `medfusion run` (run/pipeline.py) and `medfusion register`
(`register_patient`): what the inputs were, how the MR was registered onto the CT and how that was
checked, and the verdict (`run.result.QCRecord`).

`medfusion register` writes a contract qc.json too, and keeps at its top level the registration's
QC as it always wrote it (``passed``, ``reasons``, ``warnings``, ``checks``, ``seconds``,
``metric_mattes_mi``), for scripts that read those.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfusion.config import RegistrationConfig
from medfusion.io.atomic import write_json
from medfusion.io.case import Case, load_case
from medfusion.io.errors import InputError
from medfusion.run.result import QCRecord, RegistrationRecord, Verdict, write_qc

if TYPE_CHECKING:  # SimpleITK and nibabel load only when a registration runs
    from medfusion.preprocess.registration import RegistrationResult

TRANSFORM = "transform.json"
MR_IN_CT = "mr_in_ct.nii.gz"


def input_record(case: Case) -> dict[str, Any]:
    """qc.json "inputs": each input volume's summary (`Volume.summary`), the note's length in
    characters, unreadable files, skipped objects and the series choices made."""
    assert case.ct is not None
    return {
        "ct": case.ct.summary(),
        "mr": [m.summary() for m in case.mr],
        "note_chars": len(case.note),
        "unreadable_files": [str(e) for e in case.errors],
        "skipped_objects": [{"path": p, "why": w} for p, w in case.skipped],
        "choices": case.choices,
    }


def registration_record(
    reg: RegistrationResult | None, settings: RegistrationConfig, settings_from: str
) -> dict[str, Any]:
    """qc.json "registration": the registration (`RegistrationResult.to_json`: CT → MR matrix, metric,
    seconds, mode and its QC) or ``{"mode": "none", "reason": "no MR volume"}``, with where its
    settings came from (`settings_from`: "library", "package", "pipeline" or "command line") and the
    settings themselves."""
    return {
        **(reg.to_json() if reg is not None else {"mode": "none", "reason": "no MR volume"}),
        "settings_from": settings_from,
        "settings": settings.model_dump(mode="json"),
    }


def input_verdict(case: Case, reg: RegistrationResult | None) -> Verdict:
    """qc.json "verdict": "fail" when the registration failed its QC (a run leaves the MR out),
    "warn" when a file was unreadable or an input volume carries warnings (tilt corrected, NaN
    replaced, orientation unknown, …), else "pass"."""
    if reg is not None and not reg.passed:
        return Verdict.FAIL
    if case.errors or any(v.warnings for v in [case.ct, *case.mr] if v is not None):
        return Verdict.WARN
    return Verdict.PASS


def case_qc(
    case: Case,
    reg: RegistrationResult | None,
    settings: RegistrationConfig,
    settings_from: str,
    *,
    mr_used: bool,
    **extra: Any,
) -> QCRecord:
    """The patient's qc.json (without the writers' "outputs" record): `input_record`,
    `registration_record`, whether the MR reached the model (`mr_used`) and `input_verdict`; `extra`
    keys are kept at the top level."""
    return QCRecord(
        patient_id=case.patient_id,
        inputs=input_record(case),
        registration=RegistrationRecord.model_validate(registration_record(reg, settings, settings_from)),
        mr_used_by_model=mr_used,
        verdict=input_verdict(case, reg),
        **extra,
    )


def register_patient(patient: Path, out: Path, cfg: RegistrationConfig) -> tuple[str, RegistrationResult]:
    """`medfusion register`: co-register one patient folder's primary MR onto its CT and write, into
    `out`, `transform.json` (the registration, as in qc.json), `mr_in_ct.nii.gz` (the MR on the CT's
    grid, linear, 0 outside) and `qc.json` (`case_qc`, "settings_from": "command line").

    Returns:
        The patient id and the registration (its QC in ``.qc``; ``.passed`` False: the QC failed).

    Raises:
        InputError: the folder does not hold one CT and at least one MR volume (names the folder and
            what the loader refused).
        ValueError: the registration cannot run (e.g. no overlap between the images, a missing
            transform file for mode "file").
        OSError: `out` cannot be written.
    """
    from medfusion.io.nifti import write_nifti
    from medfusion.preprocess.registration import register

    case = load_case(patient)
    if case.ct is None or not case.mr:
        why = "; ".join(str(e) for e in case.errors[:3])  # e.g. the CT that the loader refused, and why
        raise InputError(patient, "needs one CT and at least one MR volume" + (f" ({why})" if why else ""))
    res = register(case.ct, case.mr[0], cfg)
    write_json(out / TRANSFORM, res.to_json())
    write_nifti(case.mr[0].resample_to(case.ct, res.matrix, default=0.0), out / MR_IN_CT)
    flat = {**res.qc, "seconds": round(res.seconds, 2), "metric_mattes_mi": res.metric}
    qc = case_qc(case, res, cfg, "command line", mr_used=res.passed, **flat)
    write_qc(out, qc)
    return case.patient_id, res
