"""The per-patient pipeline: load → register → infer → write → report, into one output folder.

Each patient's outputs are written into a hidden folder and renamed into place when complete, so
`OUT/<patient_id>/` either holds a whole result or does not exist. Each output is written on its
own: a writer that fails (a DICOM SEG from a de-identified source, a report) is recorded in
`qc.json` ("outputs") and the others still land. A failed patient gets `OUT/<patient_id>/error.json`
and the run goes on. The cohort files (`summary.csv`, `run.json`, `failures.jsonl`) are rebuilt
from the per-patient files after every run, so a resumed or interrupted run describes the whole
output folder exactly as an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfusion.config import PipelineConfig, PreprocessConfig, RegistrationConfig
from medfusion.hashing import sha256_of
from medfusion.io.case import Case, load_case
from medfusion.io.errors import InputError
from medfusion.io.volume import Volume
from medfusion.models.meta import PackageMeta, preprocess_config
from medfusion.run.folders import patient_row, publish, record_failure
from medfusion.run.interrupt import check_stop
from medfusion.run.qc import case_qc
from medfusion.run.result import (
    CaseResult,
    DomainRecord,
    Measurements,
    ModelRecord,
    Scores,
    decide,
)

if TYPE_CHECKING:
    from medfusion.infer.predictor import Prediction, Predictor
    from medfusion.preprocess.prepare import ModelInputs

log = logging.getLogger("medfusion.run")


@dataclasses.dataclass
class RunOptions:
    """What `run_cohort` does: where to, with which pipeline, model, device and scale-out.

    `resume` skips patients whose outputs are complete; `overwrite` replaces the listed patients in
    an output folder that holds another run (without either, such a folder is refused). `retries`:
    how many times a patient whose Dask worker died is run again elsewhere.
    """

    out: Path
    pipeline: PipelineConfig
    model: str | None = None
    device: str = "auto"
    workers: int = 0
    cluster: str | None = None
    resume: bool = False
    only: list[str] | None = None
    modality_map: dict[str, str] | None = None
    overwrite: bool = False
    retries: int = 1


# --- One patient ---


def _provenance(case: Case) -> dict[str, Any]:
    """scores.json "inputs": where each input came from (DICOM UIDs, or a file name and its SHA-256)."""

    def vol_info(v: Volume | None) -> dict[str, Any]:
        if v is None:
            return {}
        info = {
            "modality": v.modality,
            "format": v.meta.get("format"),
            "series_description": v.meta.get("series_description", ""),
        }
        if v.meta.get("format") == "dicom":
            info["series_uid"] = v.meta.get("series_uid")
            info["study_uid"] = v.meta.get("study_uid")
        else:
            src = Path(v.meta["source"])
            info["file"] = src.name
            info["sha256"] = sha256_of(src)
        return info

    return {
        "ct": vol_info(case.ct),
        "mr": [vol_info(m) for m in case.mr],
        "note": case.note_path.name if case.note_path else None,
        "study_date": case.ct.meta.get("study_date", "") if case.ct else "",
    }


def run_preprocess_config(pipeline: PipelineConfig, meta: PackageMeta | dict[str, Any]) -> PreprocessConfig:
    """The preprocessing a run uses: the pipeline's own if it gives one, otherwise the package's, with
    the registration settings the pipeline asks for and its consistency-check switch."""
    if pipeline.preprocess is not None:
        cfg = pipeline.preprocess.model_copy(deep=True)
    else:
        cfg = preprocess_config(meta)
        if pipeline.registration == "library":
            stored = cfg.registration
            cfg.registration = RegistrationConfig(mode=stored.mode, transform_file=stored.transform_file)
    cfg.registration.consistency_check = pipeline.registration_consistency_check
    return cfg


def process_case(folder: Path, opts: RunOptions, predictor: Predictor) -> dict[str, Any]:
    """Run one patient into `opts.out/<folder name>/`; returns its summary row (`folders.patient_row`).

    Load → prepare (register, resample, normalise; the MR is left out when its registration fails
    the QC) → predict → domain check → measure → the `CaseResult` → the writers, each on its own
    (run/outputs.py) → qc.json → scores.json (last: its presence marks the patient done).

    Raises nothing for bad input: a failure writes error.json (the stage and a one-line reason). A
    stop the user asked for (`Interrupted`) propagates instead, with the half-made folder removed.
    """
    from medfusion.preprocess.prepare import prepare_case
    from medfusion.run.measure import measure
    from medfusion.run.outputs import Outputs, write_images, write_pdf_report, write_structured_report

    pid = folder.name
    final = opts.out / pid
    t: dict[str, float] = {}
    stage = "load"
    tmp = opts.out / f".tmp-{pid}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        case = load_case(folder, opts.modality_map)
        if case.ct is None:
            detail = "; ".join(str(e) for e in case.errors[:3])
            raise InputError(folder, "no usable CT volume" + (f" ({detail})" if detail else ""))
        ct: Volume = case.ct
        t["load"] = time.perf_counter() - t0
        stage = "register"
        cfg = run_preprocess_config(opts.pipeline, predictor.meta)
        inputs = prepare_case(case, cfg)  # decides whether the MR reaches the model (registration QC)
        t["register"] = inputs.timings.get("register", 0.0)
        t["resample"] = inputs.timings.get("resample", 0.0)
        stage = "infer"
        t1 = time.perf_counter()
        pred = predictor.predict(inputs)
        domain = predictor.assess(case, pred, inputs.has_mr)  # models/domain.py: before anyone reads a score
        t["infer"] = time.perf_counter() - t1
        stage = "write"
        t2 = time.perf_counter()
        class_names = predictor.class_names
        outputs = Outputs(pid)
        write_images(outputs, tmp, ct, pred, class_names, opts.pipeline.outputs, predictor.describe())
        meas = measure(pred.labels, class_names, ct=ct, mr=inputs.mr_shown)
        result = case_result(case, inputs, pred, domain.to_json(), meas, opts, predictor, cfg)
        write_structured_report(outputs, tmp, case, result, class_names)
        t["write"] = time.perf_counter() - t2
        if opts.pipeline.outputs.report:
            stage = "report"
            t3 = time.perf_counter()
            write_pdf_report(outputs, tmp, case, inputs, pred, result, class_names)
            t["report"] = time.perf_counter() - t3
        stage = "write"
        result.qc.outputs = outputs.record()
        result.write_qc(tmp)
        result.scores.timings_s = {k: round(v, 3) for k, v in t.items()}
        result.write_scores(tmp)  # last: its presence marks the patient done
        publish(tmp, final)
        return patient_row(final)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        check_stop(exc)  # the user's stop surfacing as a library's error is not the patient's failure
        reason = str(exc) if isinstance(exc, InputError | ValueError) else f"{type(exc).__name__}: {exc}"
        log.debug("patient %s failed", pid, exc_info=True)
        return record_failure(opts.out, pid, stage, reason, traceback.format_exc(limit=6))
    except BaseException:  # Interrupted, KeyboardInterrupt: leave no half-made folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def case_result(
    case: Case,
    inputs: ModelInputs,
    pred: Prediction,
    domain: dict[str, Any],
    measurements: Measurements,
    opts: RunOptions,
    predictor: Predictor,
    cfg: PreprocessConfig,
) -> CaseResult:
    """The patient's `CaseResult` (scores.json + qc.json without the outputs record and timings).

    Out of the model's domain "predicted" is null and every decision "not assessed"; the
    probabilities stay, for research use. Decisions follow `opts.pipeline.decision` (threshold and
    indeterminate band, `run.result.decide`).
    """
    assert case.ct is not None
    decision = opts.pipeline.decision
    in_domain = bool(domain["in_domain"])
    reg = inputs.registration
    qc = case_qc(
        case,
        reg,
        cfg.registration,
        "pipeline" if opts.pipeline.preprocess is not None else opts.pipeline.registration,
        mr_used=inputs.has_mr,
    )
    scores = Scores(
        patient_id=case.patient_id,
        probabilities=pred.scores,
        predicted={n: bool(p >= decision.threshold) for n, p in pred.scores.items()} if in_domain else None,
        threshold=decision.threshold,
        indeterminate_band=decision.indeterminate_band,
        decision={
            n: decide(p, threshold=decision.threshold, band=decision.indeterminate_band, in_domain=in_domain)
            for n, p in pred.scores.items()
        },
        uncertainty=pred.uncertainty,
        domain=DomainRecord.model_validate(domain),
        measurements=measurements,
        **({"score_features": pred.features} if pred.features else {}),
        model=ModelRecord.model_validate(predictor.describe()),
        # how the network ran (the pipeline's "auto" and unset fields resolved on this machine)
        inference={
            "device": str(predictor.device),
            "amp": bool(predictor.amp),
            "windows_per_call": int(predictor.sw_batch_size),
        },
        seed={"inference": predictor.seed, "registration": cfg.registration.seed},
        inputs=_provenance(case),
        qc_verdict=qc.verdict,
        timings_s={},
    )
    return CaseResult(scores=scores, qc=qc)
