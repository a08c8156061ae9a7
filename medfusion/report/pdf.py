"""The per-patient PDF report (reportlab: vector text and tables, embedded PNG figures)."""

from __future__ import annotations

import datetime as dt
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.platypus import (
    Image,
    KeepTogether,
    PageBreak,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
)

from medfusion.io.atomic import atomic_path
from medfusion.io.pdf_tables import escape, table
from medfusion.measure.lesions import Lesion
from medfusion.preprocess.registration import qc_summary
from medfusion.report import figures
from medfusion.run.result import CaseResult, Decision, DomainRecord, Scores
from medfusion.text.sentences import split_sentences

if TYPE_CHECKING:
    from medfusion.infer.predictor import Prediction
    from medfusion.io.case import Case
    from medfusion.preprocess.prepare import ModelInputs

DISCLAIMER = "RESEARCH USE ONLY. Not a medical device; not for diagnosis or treatment decisions. The default model is trained on synthetic phantoms."
# the facts the model reads from a note: cancer history, the course and its pace, the complaint
_KEY = re.compile(
    r"cancer|malignan|carcinoma|melanoma|lymphoma|metasta|tumou?r|neoplas|progress|worsen|deteriorat|"
    r"rapid|gradual|slow|onset|\bdays?\b|weeks?|months?|years? ago|history|seizure|weakness|numbness|"
    r"headache|visual|vision|word-finding|aphasia|speech|gait|personality|confusion|vomit",
    re.I,
)
# the indication: who the patient is and why they came
_INDICATION = re.compile(r"year[- ]old|presenting|presents|referred|complain|admitted", re.I)


def key_sentences(note: str, limit: int = 6) -> list[str]:
    """The note's indication first (the sentence naming age, sex and complaint), then the sentences
    that carry the facts the model reads (cancer history, course, pace, symptoms), in note order, at
    most `limit`. Negated facts are kept as written ("No known melanoma."), so they read negated;
    sentences without such a fact ("Denies recent travel.") are left out.

    Examples:
        >>> key_sentences("Denies recent travel. A 54-year-old woman with headaches. No known melanoma.")
        ['A 54-year-old woman with headaches.', 'No known melanoma.']
    """
    sents = [s for s in split_sentences(note) if s]
    first = next((s for s in sents if _INDICATION.search(s)), None)
    rest = [s for s in sents if s is not first and _KEY.search(s)]
    return ([first] if first else []) + rest[: limit - (1 if first else 0)]


def _img(png: bytes, width_mm: float) -> Image:
    img = Image(io.BytesIO(png))
    ratio = img.imageHeight / img.imageWidth
    img.drawWidth = width_mm * mm
    img.drawHeight = width_mm * mm * ratio
    return img


MAX_FINDINGS = 6  # lesions listed one per row; the rest are summarised in one line


def not_assessed_text(domain: DomainRecord) -> str:
    """The banner of an out-of-domain case: "Not assessed: input outside the model's training domain —
    <reasons>"."""
    reasons = "; ".join(domain.reasons or ["no reason recorded"])
    return f"Not assessed: input outside the model's training domain — {reasons}"


def not_assessed_banner(scores: Scores, styles: Any) -> list[Any]:
    """The first page's banner when `scores.predicted` is None (out of domain); nothing otherwise."""
    if scores.in_domain:
        return []
    style = ParagraphStyle(
        "banner",
        parent=styles["Normal"],
        fontSize=11,
        leading=14,
        textColor=colors.HexColor("#7b241c"),
        backColor=colors.HexColor("#fdedec"),
        borderPadding=4,
    )
    return [Spacer(1, 3 * mm), Paragraph(not_assessed_text(scores.domain), style)]


def verdict_inputs_line(domain: DomainRecord) -> str:
    """Which inputs the scores above were computed from, whether their calibration was measured for
    exactly those inputs, and how far the case's encoder features lie from the training cases (the
    domain guard's Mahalanobis distance and its threshold, models/domain.py): how usual the input is,
    beside the MC-dropout s.d., which does not grow out of domain (benchmarks/RESULTS.md, #25)."""
    sit = domain.situation
    if not sit:
        return "Inputs: not recorded."
    missing = [m for m in ("MR", "note") if f"+{m}" not in sit]
    lacking = f" (no {' and no '.join(missing)})" if missing else ""
    if not domain.guard_fitted:
        return f"Inputs: {sit}{lacking}; this model package has no fitted domain guard."
    how = "measured" if domain.calibrated_for_situation else "NOT measured"
    line = f"Inputs: {sit}{lacking}; calibration {how} for these inputs."
    if domain.distance is not None and domain.threshold is not None:
        line += (
            f" Image features: distance {domain.distance:.1f} to the training cases "
            f"(out of domain above {domain.threshold:.1f})."
        )
    return line


# --- Header facts ---


def readable_date(value: str) -> str:
    """A DICOM date (YYYYMMDD) as 2025-01-05; anything else as given, "—" when empty.

    Examples:
        >>> readable_date("20250105")
        '2025-01-05'
    """
    value = (value or "").strip()
    if re.fullmatch(r"\d{8}", value):
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or "—"


_AGE_NOTE = re.compile(r"\b(\d{1,3})[- ]?(?:year|yr)s?[- ]old\b", re.I)
_FEMALE = re.compile(r"\b(woman|female|lady|girl|she|her)\b", re.I)
_MALE = re.compile(r"\b(man|male|gentleman|boy|he|his)\b", re.I)
_SEX = {"F": "female", "M": "male", "O": "other"}


def age_and_sex(meta: dict[str, Any], note: str) -> tuple[str, str]:
    """Age and sex for the header: from the DICOM (PatientAge "054Y", PatientSex "F"), else from the
    note ("a 54-year-old woman"), each marked "(note)" when read there; "—" when neither says.

    Examples:
        >>> age_and_sex({"patient_age": "054Y", "patient_sex": "F"}, "")
        ('54 years', 'female')
        >>> age_and_sex({}, "Patient is a 58 year old male patient.")
        ('58 years (note)', 'male (note)')
    """
    age = "—"
    code = str(meta.get("patient_age") or "").strip()
    unit = {"Y": "years", "M": "months", "W": "weeks", "D": "days"}
    if re.fullmatch(r"\d{3}[YMWD]", code):
        age = f"{int(code[:3])} {unit[code[3]]}"
    elif (m := _AGE_NOTE.search(note or "")) is not None:
        age = f"{int(m.group(1))} years (note)"
    sex = _SEX.get(str(meta.get("patient_sex") or "").strip().upper(), "—")
    if sex == "—" and note:
        female, male = bool(_FEMALE.search(note)), bool(_MALE.search(note))
        if female != male:
            sex = ("female" if female else "male") + " (note)"
    return age, sex


# --- Findings ---


def _volume(ml: float | None) -> str:
    return "—" if ml is None else (f"{ml:.2f}" if ml < 10 else f"{ml:.1f}")


def findings_rows(lesions: list[Lesion], class_names: list[str]) -> tuple[list[list[str]], str]:
    """The findings table (a header row, then one row per lesion, largest first, up to
    MAX_FINDINGS) from `scores.measurements.lesions`, and a line summarising the lesions
    beyond those ("" when none are left out)."""
    parts = [n for n in class_names[1:]]
    head = ["#", "Location", *[f"{n.replace('_', ' ').capitalize()} (mL)" for n in parts]]
    head += ["Core diameter, axial long × short (mm)", "CT core (HU)", "MR enhancement"]
    rows = [head]
    for lesion in lesions[:MAX_FINDINGS]:
        vols = lesion.volumes_ml
        d1, d2 = lesion.axial_diameters_mm
        hu = lesion.ct_core_hu
        ratio = lesion.mr_enhancement_ratio
        rows.append(
            [
                str(lesion.number),
                f"{lesion.side}, {lesion.region}",
                *[_volume(vols.get(n)) for n in parts],
                f"{lesion.core_diameter_mm:.1f}; {d1:.1f} × {d2:.1f}",
                "—" if hu is None else f"{hu:.0f}",
                "—" if ratio is None else f"× {ratio:.2f}",
            ]
        )
    rest = lesions[MAX_FINDINGS:]
    summary = ""
    if rest:
        total = sum(les.total_ml for les in rest)
        largest = max(les.core_diameter_mm for les in rest)
        summary = (
            f"{len(rest)} further lesion(s) not listed: {total:.2f} mL in all, the largest "
            f"{largest:.1f} mm across."
        )
    return rows, summary


def findings_widths(n_parts: int) -> list[float]:
    """Column widths (mm, 180 in all) of the findings table with `n_parts` volume columns."""
    return [6, 30, *[75 / max(n_parts, 1)] * n_parts, 28, 15, 26]


WORDS = {
    Decision.POSITIVE: "likely",
    Decision.NEGATIVE: "unlikely",
    Decision.INDETERMINATE: "indeterminate",
    Decision.NOT_ASSESSED: "not assessed",
}
CALLS = {
    Decision.POSITIVE: "POSITIVE",
    Decision.NEGATIVE: "negative",
    Decision.INDETERMINATE: "INDETERMINATE",
    Decision.NOT_ASSESSED: "not assessed",
}


def impression(scores: Scores) -> str:
    """One plain-words line from the findings and the per-score decisions ("likely", "unlikely",
    "indeterminate"), ending with the research-use statement. Out of the model's domain it says the
    case was not assessed."""
    lesions = scores.measurements.lesions
    if not scores.in_domain:  # the traced regions are no findings on an input the model does not know
        n = len(lesions)
        found = (
            f"Not assessed: input outside the model's training domain; the {n} region{'s' if n != 1 else ''} "
            "it traced are shown for research use only, not as findings."
            if n
            else "Not assessed: input outside the model's training domain."
        )
    elif not lesions:
        found = "No lesion detected."
    else:
        first = lesions[0]
        where = f"{first.side} {first.region}".strip()
        found = (
            f"{len(lesions)} lesion{'s' if len(lesions) > 1 else ''} detected; the largest "
            f"({where}) measures {first.core_diameter_mm:.0f} mm with "
            f"{first.total_ml:.1f} mL in all."
        )
    if not scores.in_domain:
        call = "Diagnostic scores not assessed (input outside the model's training domain)."
    else:
        calls = [
            f"{name.replace('_', ' ')} {WORDS[decision]} (p = {scores.probabilities[name]:.2f})"
            for name, decision in scores.decision.items()
        ]
        call = "Model: " + "; ".join(calls) + "." if calls else ""
    return f"{found} {call} Research use only; not for clinical decisions.".replace("  ", " ")


def decision_line(scores: Scores) -> str:
    """The scores' decisions at the threshold, with the indeterminate band when one was used."""
    calls = ", ".join(
        f"{k}: {CALLS[d]} (p = {scores.probabilities[k]:.2f} ± {scores.uncertainty.get(k, float('nan')):.2f})"
        for k, d in scores.decision.items()
    )
    band = scores.indeterminate_band
    where = f"threshold {scores.threshold}"
    if band is not None and band[0] < band[1]:
        where += f" (indeterminate from {band[0]:.2f} up to {band[1]:.2f})"
    return f"Predicted at {where}: {calls}"


def _short(text: str, limit: int = 40) -> str:
    """`text` cut to `limit` characters with an ellipsis: one footer line never leaves the page."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_report(
    path: Path,
    case: Case,
    inputs: ModelInputs,
    pred: Prediction,
    result: CaseResult,
    class_names: list[str],
) -> Path:
    """Write the patient's PDF report to `path` (atomically) and return it.

    Page 1: header (patient, age, sex, study date, accession, series, model), the impression line,
    the findings table (one row per lesion, `findings_rows`) and the key image through the largest
    lesion, then the scores and their decisions; then the images (three planes, a key image per
    further lesion), the note's key sentences, the quality checks and the registration check. A
    report renders results; it computes no score or measurement itself. Nothing is written at `path`
    unless the whole PDF is.

    Args:
        path: the PDF to write (parent folders are created; an existing file is replaced).
        case: the loaded `io.case.Case`; `case.ct` must be present (its header gives age, sex,
            accession and series; its geometry places the images), `case.mr` and `case.note` are optional.
        inputs: the case's `ModelInputs`; reads `mr_in_ct` (the primary MR on the CT's grid, None
            without an MR: no registration figure) and `has_mr` (an MR the model left out is never
            drawn with the findings, only in the registration check, marked "NOT USED").
        pred: the `Prediction`; reads `labels` (a `LabelMap` on the CT's grid).
        result: the patient's `CaseResult` (scores.json and qc.json).
        class_names: the model's classes, background first (index 0).

    Returns:
        `path`.

    Raises:
        ValueError: `case.ct` is None, or the label map is not on the CT's grid.
        OSError: the PDF cannot be written at `path` (the temporary file is removed).
    """
    if case.ct is None:
        msg = f"{case.patient_id}: a report needs the CT"
        raise ValueError(msg)
    ct = case.ct
    scores, qc = result.scores, result.qc
    styles = getSampleStyleSheet()
    small = ParagraphStyle("small", parent=styles["Normal"], fontSize=8, leading=10)
    warn = ParagraphStyle("warn", parent=styles["Normal"], fontSize=8, textColor=colors.HexColor("#b03a2e"))
    strong = ParagraphStyle(
        "strong", parent=styles["Normal"], fontName="Helvetica-Bold", fontSize=10, leading=13
    )
    model = scores.model
    meta = ct.meta
    age, sex = age_and_sex(meta, case.note or "")
    ct_series = meta.get("series_description") or "—"
    mr_series = "; ".join(m.meta.get("series_description") or "(no description)" for m in case.mr) or "none"
    lesions = scores.measurements.lesions
    story: list[Any] = [
        Paragraph("medfusion — multimodal imaging report", styles["Title"]),
        Paragraph(DISCLAIMER, warn),
        *not_assessed_banner(scores, styles),
        Spacer(1, 2 * mm),
        table(
            [
                ["Patient ID", case.patient_id, "Age / sex", f"{age} / {sex}"],
                [
                    "Study date",
                    readable_date(scores.inputs.get("study_date") or ""),
                    "Accession",
                    meta.get("accession_number") or "—",
                ],
                ["CT series", ct_series, "MR series", mr_series],
                [
                    "Clinical note",
                    "yes" if case.note else "none",
                    "Model",
                    f"{model.name} {model.version}",
                ],
            ],
            [25, 60, 25, 70],
            header=False,
        ),
        Spacer(1, 3 * mm),
        Paragraph(f"Impression: {escape(impression(scores))}", strong),
        Paragraph("Findings", styles["Heading2"]),
    ]
    if lesions:
        rows, rest = findings_rows(lesions, class_names)
        n_parts = len(class_names) - 1
        story.append(table(rows, findings_widths(n_parts)))
        if rest:
            story.append(Paragraph(rest, small))
        story.append(Spacer(1, 1.5 * mm))
        story.append(
            Paragraph(
                "Location: side of the head's midline and quadrant of the head. Diameters: the core's "
                "longest extent in 3D, then on the axial slice with the most core its longest diameter "
                "and the widest extent perpendicular to it (RANO). MR enhancement: mean MR signal in "
                "the core over that in the 3 mm rim of tissue around the lesion.",
                small,
            )
        )
        first = lesions[0]
        story.append(
            _img(
                figures.key_image(
                    ct,
                    pred.labels,
                    class_names,
                    centre_lps=first.centroid_lps,
                    title="Key image: lesion 1",
                ),
                165,
            )
        )
    else:
        story.append(Paragraph("No lesion detected.", styles["Normal"]))
    story.append(Paragraph("Diagnostic scores", styles["Heading2"]))
    band = scores.indeterminate_band if scores.in_domain else None  # no band drawn without a decision
    story.append(
        _img(
            figures.score_bars(
                scores.probabilities, scores.uncertainty, scores.threshold, band, assessed=scores.in_domain
            ),
            110,
        )
    )
    domain = scores.domain
    if not scores.in_domain:  # out of the model's domain: no verdict, the banner says why
        probs = ", ".join(f"{k} {p:.2f}" for k, p in scores.probabilities.items())
        story.append(
            Paragraph(
                f"Probabilities for research use only, not an answer: {probs}. Inputs: {domain.situation or '—'}.",
                small,
            )
        )
    else:
        story.append(Paragraph(decision_line(scores), small))
    vols = scores.measurements.volumes_ml
    story.append(
        Paragraph(
            "Total segmented volume: "
            + ", ".join(f"{k.replace('_', ' ')} {v:.2f} mL" for k, v in vols.items())
            + f"; {len(lesions)} lesion(s).",
            small,
        )
    )
    story.append(PageBreak())
    story.append(
        Paragraph(
            "Images through the lesions" if lesions else "Images (no lesion detected)", styles["Heading2"]
        )
    )
    mr_shown = inputs.mr_shown  # never an MR the model left out
    story.append(_img(figures.triplanar(ct, mr_shown, pred.labels, class_names), 160))
    for lesion in lesions[1:MAX_FINDINGS]:
        story.append(
            _img(
                figures.key_image(
                    ct,
                    pred.labels,
                    class_names,
                    centre_lps=lesion.centroid_lps,
                    title=f"Key image: lesion {lesion.number} ({lesion.side}, {lesion.region})",
                ),
                150,
            )
        )
    story.append(Paragraph("Key sentences of the clinical note", styles["Heading2"]))
    sents = key_sentences(case.note) if case.note else []
    if sents:
        for s in sents:
            story.append(Paragraph(f"• {escape(s)}", small))
    else:
        story.append(
            Paragraph(
                "No clinical note was found."
                if not case.note
                else "No sentence of the note matched the facts the model reads.",
                small,
            )
        )
    story.append(Paragraph("Quality checks", styles["Heading2"]))
    reg = qc.registration
    reg_line = f"Registration: {reg.mode}"
    if reg.qc:
        reg_line += ", " + qc_summary(reg.qc)
    story.append(Paragraph(escape(reg_line), small))
    story.append(Paragraph(f"Overall input verdict: {qc.verdict}. {verdict_inputs_line(domain)}", small))
    input_warnings = [
        f"{v.get('modality', '')} {v.get('series_description', '')}: {w}"
        for v in [qc.inputs.get("ct") or {}, *qc.inputs.get("mr", [])]
        for w in v.get("warnings", [])
    ]
    for w in input_warnings:
        story.append(Paragraph(escape(f"Input warning — {w}"), warn))
    mr_used = inputs.has_mr
    closing = Paragraph(
        f"Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by medfusion. {DISCLAIMER}", small
    )
    if inputs.mr_in_ct is None:
        story.append(closing)
    else:
        # the last figure and the closing line travel together: no page holding only the closing line
        check = figures.registration_check(ct, inputs.mr_in_ct, pred.labels, used=mr_used)
        story.append(KeepTogether([_img(check, 160), closing]))

    def _footer(canvas: Any, doc: Any) -> None:
        canvas.saveState()
        canvas.setFont("Helvetica", 7)
        canvas.drawString(
            15 * mm, 10 * mm, f"{_short(case.patient_id)} · medfusion · research use only · page {doc.page}"
        )
        canvas.restoreState()

    with atomic_path(path) as tmp:
        doc = SimpleDocTemplate(
            str(tmp),
            pagesize=A4,
            leftMargin=15 * mm,
            rightMargin=15 * mm,
            topMargin=14 * mm,
            bottomMargin=16 * mm,
            title=f"medfusion report {case.patient_id}",
            author="medfusion",
        )
        doc.build(story, onFirstPage=_footer, onLaterPages=_footer)
    return path
