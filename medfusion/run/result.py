"""The output contract of one patient: `CaseResult`, the schema of `scores.json` and `qc.json`, written
and read by this one module.

Every key users rely on (DESIGN.md "Contracts that users will rely on") keeps its name and meaning:
scores.json holds ``patient_id``, ``probabilities``, ``predicted`` (null out of domain),
``threshold``, ``uncertainty``, ``domain``, ``measurements``, ``score_features`` (when the model reads
them), ``model``, ``inference``, ``seed``, ``inputs``, ``qc_verdict`` and ``timings_s``; since 0.9 also
``indeterminate_band`` (next to ``threshold``) and ``decision`` ({score: "positive" | "negative" |
"indeterminate" | "not assessed"}). qc.json holds ``patient_id``, ``inputs``, ``registration``,
``mr_used_by_model``, ``verdict`` and ``outputs``. Keys this version does not know are kept as they
are (a newer medfusion's files still read), and files written before ``decision`` existed read with
the decision their ``predicted`` implies (no band recorded).

Examples:
    >>> decide(0.55, threshold=0.5, band=(0.4, 0.6), in_domain=True)
    <Decision.INDETERMINATE: 'indeterminate'>
    >>> decide(0.95, threshold=0.5, band=(0.4, 0.6), in_domain=False).value
    'not assessed'
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medfusion.io.atomic import write_json
from medfusion.measure.lesions import Lesion

SCORES = "scores.json"
QC = "qc.json"


class _Coded(str, Enum):
    """A coded value that is its own string (``str(x)``, f-strings and JSON give the value), as
    Python 3.11's StrEnum, on Python 3.10 too."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Decision(_Coded):
    """The per-score decision of scores.json "decision"."""

    POSITIVE = "positive"
    NEGATIVE = "negative"
    INDETERMINATE = "indeterminate"
    NOT_ASSESSED = "not assessed"


class Verdict(_Coded):
    """The input-QC verdict (qc.json "verdict", scores.json "qc_verdict")."""

    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


def decide(p: float, *, threshold: float, band: tuple[float, float] | None, in_domain: bool) -> Decision:
    """The decision for a calibrated probability `p` in [0, 1].

    "not assessed" out of the model's domain; "indeterminate" when ``band[0] <= p < band[1]``;
    otherwise "positive" when ``p >= threshold``, else "negative". `band` None: no band.
    """
    if not in_domain:
        return Decision.NOT_ASSESSED
    if band is not None and band[0] <= p < band[1]:
        return Decision.INDETERMINATE
    return Decision.POSITIVE if p >= threshold else Decision.NEGATIVE


class _Record(BaseModel):
    """A JSON object of the contract: keys it does not name are kept as they are."""

    model_config = ConfigDict(extra="allow")


class DomainRecord(_Record):
    """scores.json "domain": whether the case is within the model's training domain (models/domain.py).

    Attributes:
        in_domain: False → no decision is given ("predicted" null, every decision "not assessed").
        distance: the case's distance to the training density (None without a fitted guard).
        threshold: the distance above which a case is out of domain.
        reasons: one line per rule the case broke.
        situation: which inputs the scores were computed from ("CT+MR+note", …).
        calibrated_for_situation: whether the package measured its calibration for those inputs.
        guard_fitted: whether the package has a fitted domain guard.
    """

    in_domain: bool
    distance: float | None = None
    threshold: float | None = None
    reasons: list[str] = Field(default_factory=list)
    situation: str | None = None
    calibrated_for_situation: bool | None = None
    guard_fitted: bool | None = None


class Measurements(_Record):
    """scores.json "measurements" (run/measure.py): volumes in mL, diameters in mm.

    Attributes:
        volumes_ml: predicted volume per foreground class.
        lesion_count: lesions (measure/lesions.py, one per tumour core).
        largest_diameter_mm: the longest core diameter of all lesions, 0.0 when there is none.
        lesion_diameters_mm: longest core diameter per lesion, largest core first.
        lesions: each lesion's findings (`measure.lesions.Lesion`), largest core first.
    """

    volumes_ml: dict[str, float]
    lesion_count: int
    largest_diameter_mm: float
    lesion_diameters_mm: list[float]
    lesions: list[Lesion] = Field(default_factory=list)


class ModelRecord(_Record):
    """scores.json "model": the identity of the package that wrote the file (`Predictor.describe`).

    Attributes:
        name, version: the package's (`model.json`).
        architecture: its network's architecture name.
        weights_sha256: SHA-256 of its `weights.safetensors` (64 hex digits); None: not recorded.
        domain_guard: whether a fitted domain guard was loaded.
    """

    name: str | None = None
    version: str | None = None
    architecture: str | None = None
    weights_sha256: str | None = None
    domain_guard: bool | None = None


class _ModelOnly(_Record):
    """A scores.json read for its "model" record alone: every other key may be absent."""

    model: ModelRecord | None = None


class ScoredProbabilities(_Record):
    """The part of scores.json every reader of probabilities needs (`medfusion compare`, `evaluate`,
    calibration): a scores.json from another tool holding only ``probabilities`` still reads.

    Attributes:
        probabilities: calibrated probability in [0, 1] per score name.
        threshold: the decision threshold the run used, in [0, 1]; 0.5 when the file has none.
        domain: the domain guard's verdict (`DomainRecord`); None when the file has none.
    """

    probabilities: dict[str, float]
    threshold: float = 0.5
    domain: DomainRecord | None = None

    @property
    def in_domain(self) -> bool | None:
        """The domain guard's verdict; None when the file records none (another tool's file)."""
        return None if self.domain is None else self.domain.in_domain


class Scores(_Record):
    """The schema of scores.json (see the module docstring for the keys).

    Attributes:
        probabilities: calibrated probability in [0, 1] per score name (kept out of domain, for
            research use).
        predicted: per score, p ≥ threshold; None when the case is out of the model's domain.
        threshold: the decision threshold.
        indeterminate_band: [low, high): probabilities there are "indeterminate"; None in files
            written before 0.9.
        decision: per score, the `Decision`.
        uncertainty: per score, the s.d. of the calibrated probability over TTA × MC-dropout samples.
        qc_verdict: qc.json's verdict, repeated for tables.
        timings_s: seconds per stage.
    """

    patient_id: str
    probabilities: dict[str, float]
    predicted: dict[str, bool] | None
    threshold: float = 0.5
    indeterminate_band: tuple[float, float] | None = None
    decision: dict[str, Decision] = Field(default_factory=dict)
    uncertainty: dict[str, float] = Field(default_factory=dict)
    domain: DomainRecord
    measurements: Measurements
    score_features: dict[str, float] = Field(default_factory=dict)
    model: ModelRecord = Field(default_factory=ModelRecord)
    inference: dict[str, Any] = Field(default_factory=dict)
    seed: dict[str, int | None] = Field(default_factory=dict)
    inputs: dict[str, Any] = Field(default_factory=dict)
    qc_verdict: Verdict = Verdict.PASS
    timings_s: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _decision_of_older_files(cls, data: Any) -> Any:
        """Files written before 0.9 have no "decision": it is what their "predicted" said."""
        if isinstance(data, dict) and "decision" not in data and "probabilities" in data:
            predicted = data.get("predicted")
            data = dict(data)
            data["decision"] = {
                name: Decision.NOT_ASSESSED
                if predicted is None
                else (Decision.POSITIVE if predicted.get(name) else Decision.NEGATIVE)
                for name in data["probabilities"]
            }
        return data

    @property
    def in_domain(self) -> bool:
        """Whether the model gave an answer (`predicted` is not None)."""
        return self.predicted is not None


class OutputsRecord(_Record):
    """qc.json "outputs": which writers wrote, which failed (with a one-line reason), and notes."""

    written: list[str] = Field(default_factory=list)
    failed: dict[str, str] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)


RAN = ("auto", "skip", "file")  # registration modes whose record holds a transform


class RegistrationRecord(_Record):
    """qc.json "registration" (and the training cache's): the fields `RegistrationResult.to_json`
    writes (preprocess/registration.py), or ``{"mode": "none", "reason": …}`` without an MR, plus the
    settings used (run/qc.py `registration_record`). Other keys are kept as they are.

    Attributes:
        mode: "auto", "skip" or "file" (a registration ran or was read), "none" (no MR volume); None
            when the file holds no registration record.
        matrix_lps: 4 × 4 homogeneous transform, nested lists, mapping a CT (fixed) point in LPS mm to
            the MR (moving) point (ITK's convention).
        convention: that convention in words.
        metric_mattes_mi: Mattes mutual information at the end (negative, lower is better; NaN for
            "skip" and "file").
        iterations: optimiser iterations over all levels and candidates (≥ 0).
        seconds: wall time of the registration and its QC, in s.
        qc: `quality_check`'s record {"passed", "reasons", "warnings", "checks"}; {} when none ran.
        reason: why no registration ran (mode "none").
        settings_from: where the settings came from ("library", "package", "pipeline", "command line").
        settings: the `RegistrationConfig` used, as JSON.

    Raises:
        ValueError (pydantic's ValidationError) on validation: mode "auto", "skip" or "file" without
            one of matrix_lps, metric_mattes_mi, iterations, seconds, or a matrix that is not 4 × 4
            (`read_record` turns it into one line naming the file).
    """

    mode: str | None = None
    matrix_lps: list[list[float]] | None = None
    convention: str | None = None
    metric_mattes_mi: float | None = None
    iterations: int | None = None
    seconds: float | None = None
    qc: dict[str, Any] = Field(default_factory=dict)
    reason: str | None = None
    settings_from: str | None = None
    settings: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _a_registration_is_complete(self) -> RegistrationRecord:
        """A record of a registration ("auto", "skip", "file") carries its transform and figures."""
        if self.mode in RAN:
            missing = [
                k
                for k in ("matrix_lps", "metric_mattes_mi", "iterations", "seconds")
                if getattr(self, k) is None
            ]
            if missing:
                msg = f"registration mode {self.mode!r} lacks {', '.join(missing)}"
                raise ValueError(msg)
        m = self.matrix_lps
        if m is not None and (len(m) != 4 or any(len(row) != 4 for row in m)):
            msg = f"registration matrix_lps is not 4 × 4 (got {len(m)} rows)"
            raise ValueError(msg)
        return self

    @property
    def ran(self) -> bool:
        """Whether the record holds a registration (mode "auto", "skip" or "file")."""
        return self.mode in RAN


class QCRecord(_Record):
    """The schema of qc.json.

    Attributes:
        inputs: the input volumes' summaries, unreadable files, skipped objects and series choices.
        registration: the registration record (`RegistrationRecord`: `RegistrationResult.to_json`,
            with its QC, or {"mode": "none", "reason": …} without an MR; plus the settings used).
        mr_used_by_model: whether the MR reached the model (`ModelInputs.has_mr`).
        verdict: "pass", "warn" (input warnings or unreadable files) or "fail" (registration QC failed).
        outputs: the writers' record (absent until the outputs are written).
    """

    patient_id: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    registration: RegistrationRecord = Field(default_factory=RegistrationRecord)
    mr_used_by_model: bool = True
    verdict: Verdict = Verdict.PASS
    outputs: OutputsRecord | None = None


class CaseResult(BaseModel):
    """One patient's results: scores.json (`scores`) and qc.json (`qc`).

    Raises:
        ValueError: `load` of a folder whose scores.json or qc.json is missing, not JSON, or does not
            fit the contract (the message names the file and the first problems).
    """

    scores: Scores
    qc: QCRecord

    @staticmethod
    def scores_json(scores: Scores) -> dict[str, Any]:
        """scores.json's content: the keys in their documented order, "score_features" only when the
        model reads them, keys a caller did not set left out (as earlier versions wrote them)."""
        out = scores.model_dump(mode="python", exclude_unset=True)
        if not out.get("score_features"):
            out.pop("score_features", None)
        return out

    def write_qc(self, folder: Path) -> Path:
        """Write qc.json into `folder` (atomically; `write_qc`)."""
        return write_qc(folder, self.qc)

    def write_scores(self, folder: Path) -> Path:
        """Write scores.json into `folder` (atomically); written last, it marks a patient done."""
        return write_json(folder / SCORES, self.scores_json(self.scores))

    @classmethod
    def load(cls, folder: str | Path) -> CaseResult:
        """Read a patient's output folder (scores.json and qc.json; qc.json may be absent in runs
        older than 0.3, giving an empty record)."""
        folder = Path(folder)
        scores = cls.load_scores(folder)
        qc_path = folder / QC
        if not qc_path.exists():
            return cls(scores=scores, qc=QCRecord(patient_id=scores.patient_id))
        return cls(scores=scores, qc=read_record(QCRecord, qc_path))

    @classmethod
    def load_scored(cls, folder: str | Path) -> ScoredProbabilities:
        """The probabilities and threshold of a patient's scores.json (`ScoredProbabilities`: other
        keys may be absent, as in another tool's file).

        Raises:
            ValueError: scores.json is missing, not JSON, or its probabilities are not numbers.
        """
        return read_record(ScoredProbabilities, Path(folder) / SCORES)

    @classmethod
    def load_probabilities(cls, folder: str | Path) -> dict[str, float]:
        """The probabilities of a patient's scores.json (`load_scored`).

        Raises:
            ValueError: scores.json is missing, not JSON, or its probabilities are not numbers.
        """
        return cls.load_scored(folder).probabilities

    @classmethod
    def load_model(cls, folder: str | Path) -> ModelRecord | None:
        """The "model" record of a patient's scores.json alone (which package wrote it), None when the
        file has none; the file's other keys may be absent (a stub, another tool's file).

        Raises:
            ValueError: scores.json is missing, not JSON, or its "model" is not a `ModelRecord`.
        """
        return read_record(_ModelOnly, Path(folder) / SCORES).model

    @classmethod
    def load_scores(cls, folder: str | Path) -> Scores:
        """Only scores.json of a patient's output folder, validated as the whole `Scores`."""
        return read_record(Scores, Path(folder) / SCORES)

    @classmethod
    def load_qc(cls, folder: str | Path) -> QCRecord:
        """Only qc.json of a patient's output folder (`QCRecord`), e.g. for the registration it used.

        Raises:
            ValueError: qc.json is missing, not JSON, or does not fit the contract.
        """
        return read_record(QCRecord, Path(folder) / QC)


def write_qc(folder: Path, qc: QCRecord) -> Path:
    """Write `qc` as `folder`/qc.json (atomically): the fields that were set, then the kept keys; the
    one writer of qc.json (`medfusion run` through `CaseResult.write_qc`, `medfusion register`).

    Raises:
        OSError: the file cannot be written.
    """
    return write_json(folder / QC, qc.model_dump(mode="python", exclude_unset=True))


R = TypeVar("R", bound=BaseModel)


def read_record(model: type[R], path: str | Path) -> R:
    """The one reader of the contract's files: the JSON object in `path` validated as `model`
    (`Scores`, `QCRecord`, `ScoredProbabilities`, or a scores.json's `ModelRecord` alone).

    Raises:
        ValueError: one line naming `path`: the file is missing or unreadable, not JSON, not a JSON
            object, or does not fit `model` (the first three fields at fault).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        msg = f"{path}: cannot read ({exc})"
        raise ValueError(msg) from exc
    if not isinstance(data, dict):
        msg = f"{path}: expected a JSON object, got {type(data).__name__}"
        raise ValueError(msg)
    return validated(model, data, path)


def validated(model: type[R], data: dict[str, Any], path: Path) -> R:
    """`model.model_validate(data)` with a one-line error naming `path`.

    Raises:
        ValueError: `data` does not fit `model` (the message names `path` and the first bad fields).
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
        msg = f"{path}: does not fit medfusion's output contract ({where})"
        raise ValueError(msg) from exc
