"""The per-patient writers, each attempted on its own: one failing (a DICOM SEG from a de-identified
source, a report) is recorded in qc.json "outputs" and never costs the others.

Order: segmentation.nii.gz + segmentation.json (+ probabilities.nii.gz), segmentation.dcm (DICOM CT
only), segmentation_sr.dcm (only when the SEG was written: its groups reference it), report.pdf and
report.dcm (DICOM CT only, after the PDF). qc.json and scores.json are the contract itself
(run/result.py), written last by the pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfusion.io.atomic import write_json
from medfusion.io.errors import InputError
from medfusion.io.nifti import write_nifti, write_probabilities
from medfusion.run.interrupt import check_stop
from medfusion.run.result import CaseResult, OutputsRecord

if TYPE_CHECKING:
    from medfusion.config import OutputConfig
    from medfusion.infer.predictor import Prediction
    from medfusion.io.case import Case
    from medfusion.io.volume import Volume
    from medfusion.preprocess.prepare import ModelInputs

log = logging.getLogger("medfusion.run")


class Outputs:
    """The per-patient writers' record: each output is attempted on its own, a failure is kept.

    Attributes:
        written: names of the files written, in order.
        failed: name → one-line reason, for writers that raised.
        notes: what writers chose to say (e.g. why a SEG was not written).
    """

    def __init__(self, pid: str) -> None:
        self.pid = pid
        self.written: list[str] = []
        self.failed: dict[str, str] = {}
        self.notes: list[str] = []

    def attempt(self, name: str, write: Callable[[], object]) -> None:
        """Run one writer; on an error keep its reason and go on (a stop request still stops).
        A writer returning False chose not to write (its note says why)."""
        try:
            if write() is not False:
                self.written.append(name)
        except Exception as exc:
            check_stop(exc)
            reason = str(exc) if isinstance(exc, InputError | ValueError) else f"{type(exc).__name__}: {exc}"
            log.warning("patient %s: %s not written (%s)", self.pid, name, reason.splitlines()[0])
            log.debug("writer %s failed", name, exc_info=True)
            self.failed[name] = reason.splitlines()[0] if reason else type(exc).__name__

    def record(self) -> OutputsRecord:
        """qc.json "outputs"."""
        return OutputsRecord(written=list(self.written), failed=dict(self.failed), notes=list(self.notes))


def write_images(
    outputs: Outputs,
    folder: Path,
    ct: Volume,
    pred: Prediction,
    class_names: list[str],
    settings: OutputConfig,
    model: dict[str, Any],
) -> None:
    """The label map (NIfTI + its legend, probabilities when asked) and, for a DICOM CT, the SEG.

    Args:
        outputs: the record the attempts go into.
        folder: the patient's (temporary) output folder.
        ct: the CT the label map lies on (its DICOM files are the SEG's source).
        pred: the prediction; its `labels` and `probabilities` lie on the CT's grid and carry its meta.
        class_names: the model's classes, background first.
        settings: which optional outputs the pipeline asks for.
        model: the package's "name" and "version" (the SEG's algorithm identification).
    """
    seg = pred.labels
    outputs.attempt("segmentation.nii.gz", lambda: write_nifti(seg, folder / "segmentation.nii.gz"))
    legend: dict[str, Any] = {
        "labels": {str(k): n for k, n in enumerate(class_names)},
        "geometry": "the CT's own grid (same shape and affine)",
    }
    if settings.probabilities:
        legend["probabilities"] = "probabilities.nii.gz: one volume per label above, in that order"
    outputs.attempt("segmentation.json", lambda: write_json(folder / "segmentation.json", legend))
    if settings.probabilities:
        outputs.attempt(
            "probabilities.nii.gz",
            lambda: write_probabilities(pred.probabilities, folder / "probabilities.nii.gz", class_names),
        )
    if settings.dicom_seg and ct.meta.get("format") == "dicom":
        from medfusion.io.seg import write_dicom_seg

        def _seg() -> bool:
            res = write_dicom_seg(
                seg,
                ct,
                class_names,
                folder / "segmentation.dcm",
                model_name=str(model.get("name")),
                model_version=str(model.get("version")),
            )
            outputs.notes += [f"segmentation.dcm: {n}" for n in res.notes]
            return res.path is not None

        outputs.attempt("segmentation.dcm", _seg)


def write_structured_report(
    outputs: Outputs, folder: Path, case: Case, result: CaseResult, class_names: list[str]
) -> None:
    """The DICOM SR (TID 1500) of the measurements and scores; only when the SEG was written."""
    if "segmentation.dcm" not in outputs.written or case.ct is None:
        return
    from medfusion.io.sr import write_dicom_sr

    ct = case.ct
    model = result.scores.model
    outputs.attempt(
        "segmentation_sr.dcm",
        lambda: write_dicom_sr(
            folder / "segmentation.dcm",
            ct,
            class_names,
            folder / "segmentation_sr.dcm",
            lesions=result.scores.measurements.lesions,
            probabilities=result.scores.probabilities,
            decisions=result.scores.decision,
            model_name=str(model.name),
            model_version=str(model.version),
            assessed=result.scores.in_domain,
        ),
    )


def write_pdf_report(
    outputs: Outputs,
    folder: Path,
    case: Case,
    inputs: ModelInputs,
    pred: Prediction,
    result: CaseResult,
    class_names: list[str],
) -> None:
    """report.pdf and, for a DICOM CT, the same PDF as DICOM Encapsulated PDF (report.dcm).

    The report reads `result.qc.outputs` to say what else was written, so it is set first.
    """
    from medfusion.report.pdf import write_report

    result.qc.outputs = outputs.record()
    outputs.attempt(
        "report.pdf",
        lambda: write_report(folder / "report.pdf", case, inputs, pred, result, class_names),
    )
    if "report.pdf" in outputs.written and case.ct is not None and case.ct.meta.get("format") == "dicom":
        from medfusion.io.docpdf import write_encapsulated_pdf

        ct = case.ct
        outputs.attempt(
            "report.dcm", lambda: write_encapsulated_pdf(folder / "report.pdf", ct, folder / "report.dcm")
        )
