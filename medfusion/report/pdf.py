"""The per-patient PDF report (reportlab: vector text and tables, embedded PNG figures)."""

from __future__ import annotations

import datetime as dt
import io
import re
from pathlib import Path
from typing import Any

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
    Table,
    TableStyle,
)

from medfusion.io.atomic import atomic_path
from medfusion.preprocess.registration import qc_summary
from medfusion.report import figures

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
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", note.strip()) if s.strip()]
    first = next((s for s in sents if _INDICATION.search(s)), None)
    rest = [s for s in sents if s is not first and _KEY.search(s)]
    return ([first] if first else []) + rest[: limit - (1 if first else 0)]


def _img(png: bytes, width_mm: float) -> Image:
    img = Image(io.BytesIO(png))
    ratio = img.imageHeight / img.imageWidth
    img.drawWidth = width_mm * mm
    img.drawHeight = width_mm * mm * ratio
    return img


CELL = ParagraphStyle("cell", fontName="Helvetica", fontSize=8.5, leading=10)
HEAD_CELL = ParagraphStyle("head_cell", parent=CELL, fontName="Helvetica-Bold")
MAX_FINDINGS = 6  # lesions listed one per row; the rest are summarised in one line


def table(rows: list[list[str]], widths: list[float], *, header: bool = True) -> Table:
    """A grid table whose cells wrap inside their column (`widths` in mm), never overflowing it."""
    cells = [
        [Paragraph(_escape(str(v)), HEAD_CELL if header and r == 0 else CELL) for v in row]
        for r, row in enumerate(rows)
    ]
    t = Table(cells, colWidths=[w * mm for w in widths], repeatRows=1 if header else 0)
    t.setStyle(
        TableStyle(
            [
                ("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LEFTPADDING", (0, 0), (-1, -1), 3),
                ("RIGHTPADDING", (0, 0), (-1, -1), 3),
                *([("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeee"))] if header else []),
            ]
        )
    )
    return t


def not_assessed_text(domain: dict[str, Any]) -> str:
    """The banner of an out-of-domain case: "Not assessed: input outside the model's training domain —
    <reasons>"."""
    reasons = "; ".join(domain.get("reasons") or ["no reason recorded"])
    return f"Not assessed: input outside the model's training domain — {reasons}"


def not_assessed_banner(scores: dict[str, Any], styles: Any) -> list[Any]:
    """The first page's banner when `scores["predicted"]` is null (out of domain); nothing otherwise."""
    if scores.get("predicted") is not None:
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
    return [Spacer(1, 3 * mm), Paragraph(not_assessed_text(scores.get("domain") or {}), style)]


def verdict_inputs_line(domain: dict[str, Any]) -> str:
    """Which inputs the scores above were computed from, and whether their calibration was measured
    for exactly those inputs (models/domain.py)."""
    sit = domain.get("situation")
    if not sit:
        return "Inputs: not recorded."
    missing = [m for m in ("MR", "note") if f"+{m}" not in sit]
    lacking = f" (no {' and no '.join(missing)})" if missing else ""
    if not domain.get("guard_fitted"):
        return f"Inputs: {sit}{lacking}; this model package has no fitted domain guard."
    how = "measured" if domain.get("calibrated_for_situation") else "NOT measured"
    return f"Inputs: {sit}{lacking}; calibration {how} for these inputs."


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


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


def findings_rows(lesions: list[dict[str, Any]], class_names: list[str]) -> tuple[list[list[str]], str]:
    """The findings table (a header row, then one row per lesion, largest first, up to
    MAX_FINDINGS) from `scores["measurements"]["lesions"]`, and a line summarising the lesions
    beyond those ("" when none are left out)."""
    parts = [n for n in class_names[1:]]
    head = ["#", "Location", *[f"{n.replace('_', ' ').capitalize()} (mL)" for n in parts]]
    head += ["Core diameter, axial long × short (mm)", "CT core (HU)", "MR enhancement"]
    rows = [head]
    for lesion in lesions[:MAX_FINDINGS]:
        vols = lesion.get("volumes_ml", {})
        d1, d2 = lesion.get("axial_diameters_mm", (0.0, 0.0))
        hu = lesion.get("ct_core_hu")
        ratio = lesion.get("mr_enhancement_ratio")
        rows.append(
            [
                str(lesion.get("number", "")),
                f"{lesion.get('side', '')}, {lesion.get('region', '')}",
                *[_volume(vols.get(n)) for n in parts],
                f"{lesion.get('core_diameter_mm', 0.0):.1f}; {d1:.1f} × {d2:.1f}",
                "—" if hu is None else f"{hu:.0f}",
                "—" if ratio is None else f"× {ratio:.2f}",
            ]
        )
    rest = lesions[MAX_FINDINGS:]
    summary = ""
    if rest:
        total = sum(float(les.get("total_ml", 0.0)) for les in rest)
        largest = max(float(les.get("core_diameter_mm", 0.0)) for les in rest)
        summary = (
            f"{len(rest)} further lesion(s) not listed: {total:.2f} mL in all, the largest "
            f"{largest:.1f} mm across."
        )
    return rows, summary


def findings_widths(n_parts: int) -> list[float]:
    """Column widths (mm, 180 in all) of the findings table with `n_parts` volume columns."""
    return [6, 30, *[75 / max(n_parts, 1)] * n_parts, 28, 15, 26]


def impression(scores: dict[str, Any]) -> str:
    """One plain-words line from the findings and the scores, ending with the research-use
    statement. Out of the model's domain it says the case was not assessed."""
    lesions = scores.get("measurements", {}).get("lesions", [])
    if not lesions:
        found = "No lesion detected."
    else:
        first = lesions[0]
        where = f"{first.get('side', '')} {first.get('region', '')}".strip()
        found = (
            f"{len(lesions)} lesion{'s' if len(lesions) > 1 else ''} detected; the largest "
            f"({where}) measures {first.get('core_diameter_mm', 0.0):.0f} mm with "
            f"{first.get('total_ml', 0.0):.1f} mL in all."
        )
    predicted = scores.get("predicted")
    if predicted is None:
        call = "Diagnostic scores not assessed (input outside the model's training domain)."
    else:
        calls = [
            f"{name.replace('_', ' ')} {'likely' if positive else 'unlikely'} "
            f"(p = {scores['probabilities'][name]:.2f})"
            for name, positive in predicted.items()
        ]
        call = "Model: " + "; ".join(calls) + "." if calls else ""
    return f"{found} {call} Research use only; not for clinical decisions.".replace("  ", " ")


def _short(text: str, limit: int = 40) -> str:
    """`text` cut to `limit` characters with an ellipsis: one footer line never leaves the page."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_report(
    path: Path,
    case: Any,
    tensors: Any,
    pred: Any,
    scores: dict[str, Any],
    qc: dict[str, Any],
    class_names: list[str],
) -> Path:
    """Write the patient's PDF report to `path` (atomically) and return it.

    Page 1: header (patient, age, sex, study date, accession, series, model), the impression line,
    the findings table (one row per lesion, `findings_rows`) and the key image through the largest
    lesion, then the scores; then the images (three planes, a key image per further lesion), the
    note's key sentences, the quality checks and the registration check. A report renders results;
    it computes no score or measurement itself. Nothing is written at `path` unless the whole PDF is.

    Args:
        path: the PDF to write (parent folders are created; an existing file is replaced).
        case: the loaded `io.case.Case`; `case.ct` must be present (its header gives age, sex,
            accession and series; its geometry places the images), `case.mr` and `case.note` are optional.
        tensors: the case's `preprocess.prepare.CaseTensors`; only ``mr_in_ct`` is read (the primary MR
            resampled onto the CT's grid, or None without an MR: no registration figure).
        pred: the `infer.predictor.Prediction`; only ``labels_ct`` is read: (z, y, x) class indices
            into `class_names` on the CT's own grid.
        scores: the scores.json dict: reads ``model`` (name, version), ``inputs.study_date``,
            ``probabilities`` and ``uncertainty`` (per score, in [0, 1]), ``threshold``, ``predicted``
            (per score bool, or None when the case is out of the model's domain), ``domain``,
            ``measurements.volumes_ml`` (mL per class) and ``measurements.lesions`` (each with
            ``centroid_lps`` in LPS mm and ``number``; the first one gets the key image on page 1).
        qc: the qc.json dict: reads ``registration`` (``mode``, ``qc``), ``verdict``, ``inputs``
            (``ct`` and ``mr`` entries with their ``warnings``) and ``mr_used_by_model``.
        class_names: the model's classes, background first (index 0).

    Returns:
        `path`.

    Raises:
        KeyError: `scores` or `qc` lacks one of the keys above.
        AttributeError: `case.ct` is None.
        OSError: the PDF cannot be written at `path` (the temporary file is removed).
    """
    styles = getSampleStyleSheet()
    small = ParagraphStyle("small", parent=styles["Normal"], fontSize=8, leading=10)
    warn = ParagraphStyle("warn", parent=styles["Normal"], fontSize=8, textColor=colors.HexColor("#b03a2e"))
    strong = ParagraphStyle(
        "strong", parent=styles["Normal"], fontName="Helvetica-Bold", fontSize=10, leading=13
    )
    model = scores["model"]
    meta = case.ct.meta
    age, sex = age_and_sex(meta, case.note or "")
    ct_series = meta.get("series_description") or "—"
    mr_series = "; ".join(m.meta.get("series_description") or "(no description)" for m in case.mr) or "none"
    lesions = scores["measurements"].get("lesions", [])
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
                    readable_date(scores["inputs"].get("study_date") or ""),
                    "Accession",
                    meta.get("accession_number") or "—",
                ],
                ["CT series", ct_series, "MR series", mr_series],
                [
                    "Clinical note",
                    "yes" if case.note else "none",
                    "Model",
                    f"{model.get('name')} {model.get('version')}",
                ],
            ],
            [25, 60, 25, 70],
            header=False,
        ),
        Spacer(1, 3 * mm),
        Paragraph(f"Impression: {_escape(impression(scores))}", strong),
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
                    case.ct,
                    pred.labels_ct,
                    class_names,
                    centre_lps=tuple(first["centroid_lps"]),
                    title="Key image: lesion 1",
                ),
                165,
            )
        )
    else:
        story.append(Paragraph("No lesion detected.", styles["Normal"]))
    story.append(Paragraph("Diagnostic scores", styles["Heading2"]))
    story.append(
        _img(figures.score_bars(scores["probabilities"], scores["uncertainty"], scores["threshold"]), 110)
    )
    domain = scores.get("domain") or {}
    if scores.get("predicted") is None:  # out of the model's domain: no verdict, the banner says why
        probs = ", ".join(f"{k} {p:.2f}" for k, p in scores["probabilities"].items())
        story.append(
            Paragraph(
                f"Probabilities for research use only, not an answer: {probs}. Inputs: {domain.get('situation', '—')}.",
                small,
            )
        )
    else:
        pred_txt = ", ".join(
            f"{k}: {'POSITIVE' if v else 'negative'} (p = {scores['probabilities'][k]:.2f} ± {scores['uncertainty'][k]:.2f})"
            for k, v in scores["predicted"].items()
        )
        story.append(Paragraph(f"Predicted at threshold {scores['threshold']}: {pred_txt}", small))
    vols = scores["measurements"]["volumes_ml"]
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
    mr_shown = tensors.mr_in_ct if qc.get("mr_used_by_model", True) else None  # never an unused MR
    story.append(_img(figures.triplanar(case.ct, mr_shown, pred.labels_ct, class_names), 160))
    for lesion in lesions[1:MAX_FINDINGS]:
        story.append(
            _img(
                figures.key_image(
                    case.ct,
                    pred.labels_ct,
                    class_names,
                    centre_lps=tuple(lesion["centroid_lps"]),
                    title=f"Key image: lesion {lesion['number']} ({lesion.get('side', '')}, {lesion.get('region', '')})",
                ),
                150,
            )
        )
    story.append(Paragraph("Key sentences of the clinical note", styles["Heading2"]))
    sents = key_sentences(case.note) if case.note else []
    if sents:
        for s in sents:
            story.append(Paragraph(f"• {_escape(s)}", small))
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
    reg = qc["registration"]
    reg_line = f"Registration: {reg.get('mode')}"
    if reg.get("qc"):
        q = reg["qc"]
        reg_line += ", " + qc_summary(q)
    story.append(Paragraph(_escape(reg_line), small))
    story.append(Paragraph(f"Overall input verdict: {qc['verdict']}. {verdict_inputs_line(domain)}", small))
    input_warnings = [
        f"{v.get('modality', '')} {v.get('series_description', '')}: {w}"
        for v in [qc["inputs"].get("ct") or {}, *qc["inputs"].get("mr", [])]
        for w in v.get("warnings", [])
    ]
    for w in input_warnings:
        story.append(Paragraph(_escape(f"Input warning — {w}"), warn))
    mr_used = bool(qc.get("mr_used_by_model", True))
    closing = Paragraph(
        f"Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by medfusion. {DISCLAIMER}", small
    )
    if tensors.mr_in_ct is None:
        story.append(closing)
    else:
        # the last figure and the closing line travel together: no page holding only the closing line
        check = figures.registration_check(case.ct, tensors.mr_in_ct, pred.labels_ct, used=mr_used)
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
