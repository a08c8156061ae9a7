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
from reportlab.platypus import Image, PageBreak, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from medfusion.io.atomic import atomic_path
from medfusion.report import figures
from medfusion.text.negation import mark_negations, tokenize

DISCLAIMER = "RESEARCH USE ONLY. Not a medical device; not for diagnosis or treatment decisions. The default model is trained on synthetic phantoms."
_KEY = re.compile(
    r"cancer|malignan|carcinoma|melanoma|metasta|progress|worsen|weeks?|months?|seizure|weakness|history",
    re.I,
)


def key_sentences(note: str, limit: int = 6) -> list[str]:
    """Sentences that carry diagnostic facts (history, course, negations), in note order."""
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", note.strip()) if s.strip()]
    keep = [
        s for s in sents if _KEY.search(s) or any(t.startswith("neg_") for t in mark_negations(tokenize(s)))
    ]
    return keep[:limit]


def _img(png: bytes, width_mm: float) -> Image:
    img = Image(io.BytesIO(png))
    ratio = img.imageHeight / img.imageWidth
    img.drawWidth = width_mm * mm
    img.drawHeight = width_mm * mm * ratio
    return img


def table(rows: list[list[str]], widths: list[float]) -> Table:
    t = Table(rows, colWidths=[w * mm for w in widths])
    t.setStyle(
        TableStyle(
            [
                ("FONT", (0, 0), (-1, -1), "Helvetica", 9),
                ("FONT", (0, 0), (-1, 0), "Helvetica-Bold", 9),
                ("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeee")),
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


def write_report(
    path: Path,
    case: Any,
    tensors: Any,
    pred: Any,
    scores: dict[str, Any],
    qc: dict[str, Any],
    class_names: list[str],
) -> Path:
    styles = getSampleStyleSheet()
    small = ParagraphStyle("small", parent=styles["Normal"], fontSize=8, leading=10)
    warn = ParagraphStyle("warn", parent=styles["Normal"], fontSize=8, textColor=colors.HexColor("#b03a2e"))
    model = scores["model"]
    mods = ["CT"] + [f"MR ({m.meta.get('series_description', '')})" for m in case.mr]
    story: list[Any] = [
        Paragraph("medfusion — multimodal imaging report", styles["Title"]),
        Paragraph(DISCLAIMER, warn),
        *not_assessed_banner(scores, styles),
        Spacer(1, 3 * mm),
        table(
            [
                ["Patient ID", "Study date", "Modalities", "Model"],
                [
                    case.patient_id,
                    scores["inputs"].get("study_date") or "—",
                    ", ".join(mods) + (", note" if case.note else ""),
                    f"{model.get('name')} {model.get('version')}",
                ],
            ],
            [35, 25, 75, 45],
        ),
        Spacer(1, 4 * mm),
        Paragraph("Diagnostic scores", styles["Heading2"]),
    ]
    story.append(
        _img(figures.score_bars(scores["probabilities"], scores["uncertainty"], scores["threshold"]), 130)
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
        story.append(Paragraph(f"Predicted at threshold {scores['threshold']}: {pred_txt}", styles["Normal"]))
    story.append(Paragraph("Measurements", styles["Heading2"]))
    meas = scores["measurements"]
    rows = [["Structure", "Volume (mL)"]] + [
        [k.replace("_", " "), f"{v:.2f}"] for k, v in meas["volumes_ml"].items()
    ]
    rows += [
        ["Lesions (tumour core components)", str(meas["lesion_count"])],
        ["Largest lesion diameter (mm)", f"{meas['largest_diameter_mm']:.1f}"],
    ]
    story.append(table(rows, [80, 40]))
    story.append(Paragraph("Key sentences of the clinical note", styles["Heading2"]))
    sents = key_sentences(case.note) if case.note else []
    if sents:
        for s in sents:
            story.append(Paragraph(f"• {s}", small))
    else:
        story.append(
            Paragraph(
                "No clinical note was found, or it states none of the key facts."
                if not case.note
                else "The note states none of the key facts.",
                small,
            )
        )
    story.append(Paragraph("Quality checks", styles["Heading2"]))
    reg = qc["registration"]
    reg_line = f"Registration: {reg.get('mode')}"
    if reg.get("qc"):
        q = reg["qc"]
        reg_line += f", head-mask Dice {q.get('head_mask_dice')}, {'PASSED' if q.get('passed') else 'FAILED — MR left out of the model'}"
        if "consistency_mm" in q:
            reg_line += f", reverse-registration consistency {q['consistency_mm']['mean']} mm"
    story.append(Paragraph(reg_line, small))
    story.append(Paragraph(f"Overall input verdict: {qc['verdict']}. {verdict_inputs_line(domain)}", small))
    story.append(PageBreak())
    story.append(Paragraph("Images through the lesion", styles["Heading2"]))
    story.append(_img(figures.triplanar(case.ct, tensors.mr_in_ct, pred.labels_ct, class_names), 170))
    story.append(_img(figures.registration_check(case.ct, tensors.mr_in_ct), 170))
    story.append(
        Paragraph(
            f"Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by medfusion. {DISCLAIMER}",
            small,
        )
    )

    def _footer(canvas: Any, doc: Any) -> None:
        canvas.saveState()
        canvas.setFont("Helvetica", 7)
        canvas.drawString(
            15 * mm, 10 * mm, f"{case.patient_id} · medfusion · research use only · page {doc.page}"
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
