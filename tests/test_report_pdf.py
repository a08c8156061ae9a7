"""The PDF report's text: header facts (age, sex, readable date, accession), one findings row per
lesion, "No lesion detected" where true, cells that wrap instead of overflowing, no orphan page."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from pypdf import PdfReader
from reportlab.platypus import Paragraph

from medfusion.io import pdf_tables
from medfusion.io.volume import LabelMap
from medfusion.measure.lesions import Lesion
from medfusion.report import pdf
from medfusion.run.measure import measure
from medfusion.run.result import (
    CaseResult,
    Decision,
    DomainRecord,
    Measurements,
    ModelRecord,
    QCRecord,
    Scores,
)
from tests.dicom_case import CLASS_NAMES, dicom_ct

NOTE = "A 54-year-old woman presenting with headache for 3 weeks. No history of malignancy."


def _report(
    tmp_path: Path,
    n_lesions: int,
    *,
    in_domain: bool = True,
    patient_id: str = "DCM001",
    p: float = 0.71,
    decision: Decision = Decision.POSITIVE,
) -> tuple[str, Measurements, PdfReader]:
    ct, labels = dicom_ct(tmp_path / "ct", n_lesions=n_lesions)
    meas = measure(labels, CLASS_NAMES, ct=ct)
    scores = Scores(
        patient_id=patient_id,
        probabilities={"malignant": p},
        uncertainty={"malignant": 0.05},
        threshold=0.5,
        indeterminate_band=(0.4, 0.6),
        predicted={"malignant": p >= 0.5} if in_domain else None,
        decision={"malignant": decision if in_domain else Decision.NOT_ASSESSED},
        domain=DomainRecord(in_domain=in_domain, reasons=[] if in_domain else ["CT outside training range"]),
        model=ModelRecord(name="default", version="1.0"),
        inputs={"study_date": ct.meta["study_date"]},
        measurements=meas,
    )
    qc = QCRecord(
        patient_id=patient_id,
        registration={"mode": "none"},
        inputs={"ct": {}, "mr": []},
        mr_used_by_model=False,
    )
    case = SimpleNamespace(patient_id=patient_id, ct=ct, mr=[], note=NOTE)
    out = pdf.write_report(
        tmp_path / "report.pdf",
        case,  # type: ignore[arg-type]
        SimpleNamespace(mr_in_ct=None, mr_shown=None, has_mr=False),  # type: ignore[arg-type]
        SimpleNamespace(labels=LabelMap.of(labels)),  # type: ignore[arg-type]
        CaseResult(scores=scores, qc=qc),
        CLASS_NAMES,
    )
    reader = PdfReader(str(out))
    return " ".join(p.extract_text() for p in reader.pages), meas, reader


def test_an_indeterminate_score_reads_as_such(tmp_path: Path) -> None:
    text, _, _ = _report(tmp_path, 1, p=0.55, decision=Decision.INDETERMINATE)
    flat = " ".join(text.split())
    assert "malignant indeterminate (p = 0.55)" in flat
    assert "INDETERMINATE" in flat and "POSITIVE" not in flat
    assert "indeterminate from 0.40 up to 0.60" in flat


def test_two_lesions_two_findings_rows_and_header_facts(tmp_path: Path) -> None:
    text, meas, reader = _report(tmp_path, 2)
    rows, rest = pdf.findings_rows(meas.lesions, CLASS_NAMES)
    assert len(rows) == 1 + 2 and rest == ""
    assert rows[1][1].startswith("left") and rows[2][1].startswith("right")
    for row in rows[1:]:
        assert row[1] in text.replace("\n", " ")
    assert "2025-01-05" in text and "20250105" not in text
    assert "female" in text  # PatientSex F from the DICOM
    assert "54 years (note)" in text  # no PatientAge in the DICOM: from the note
    assert "A1234567" in text and "Head 2mm" in text
    assert "No lesion detected" not in text
    assert "2 lesions detected" in text and "Research use only" in text
    # no MR: no registration figure, and the closing line is not alone on a last page
    assert (
        "Generated" in reader.pages[-1].extract_text() and "Quality checks" in reader.pages[-1].extract_text()
    )


def test_no_lesion_is_written_as_such(tmp_path: Path) -> None:
    text, meas, _ = _report(tmp_path, 0, in_domain=False)
    assert meas.lesions == []
    assert "No lesion detected" in text and "Images (no lesion detected)" in text
    assert "diameter 0.0" not in text and "Largest lesion diameter" not in text
    assert "not assessed" in text  # out of domain: the impression gives no call


def test_findings_beyond_the_limit_are_summarised() -> None:
    lesion = {
        "number": 1,
        "volumes_ml": {"tumour_core": 0.5},
        "total_ml": 1.0,
        "core_diameter_mm": 9.0,
        "axial_diameters_mm": [8.0, 5.0],
        "side": "left",
        "region": "superior anterior",
        "centroid_lps": (0.0, 0.0, 0.0),
    }
    lesions = [Lesion(**dict(lesion, number=k)) for k in range(1, pdf.MAX_FINDINGS + 3)]
    rows, rest = pdf.findings_rows(lesions, CLASS_NAMES)
    assert len(rows) == 1 + pdf.MAX_FINDINGS
    assert rest.startswith("2 further lesion(s)") and "2.00 mL" in rest


@pytest.mark.parametrize("value", ["P" * 90, "a very long series description " * 6])
def test_cells_wrap_inside_their_column(value: str) -> None:
    t = pdf_tables.table([["Patient ID", value], ["Study date", "2025-01-05"]], [25, 60], header=False)
    t.wrap(500, 800)
    for row, widths in zip(t._cellvalues, [t._colWidths] * len(t._cellvalues), strict=True):
        for cell, width in zip(row, widths, strict=True):
            cell = cell[0] if isinstance(cell, list | tuple) else cell
            assert isinstance(cell, Paragraph)
            cell.wrap(width - 6, 800)  # the table's padding, 3 pt each side
            widest = max(cell.getActualLineWidths0())
            assert widest <= width - 6 + 0.5, (widest, width)


def test_age_and_sex_prefer_the_dicom() -> None:
    assert pdf.age_and_sex({"patient_age": "061Y", "patient_sex": "M"}, NOTE) == ("61 years", "male")
    assert pdf.age_and_sex({}, "") == ("—", "—")
    assert pdf.readable_date("") == "—"


@pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="pdftoppm (poppler-utils) not installed")
def test_every_page_renders_for_review(tmp_path: Path) -> None:
    """Every page of a two-lesion report as PNG under $MEDFUSION_ARTEFACTS (else the test's folder),
    so that a reviewer can look at it."""
    _, _, reader = _report(tmp_path, 2)
    out = Path(os.environ.get("MEDFUSION_ARTEFACTS", tmp_path)) / "report_pages"
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["pdftoppm", "-r", "80", "-png", str(tmp_path / "report.pdf"), str(out / "page")], check=True
    )
    pages = sorted(out.glob("page-*.png"))
    assert len(pages) == len(reader.pages) >= 2
    assert all(p.stat().st_size > 5000 for p in pages)  # not blank


def test_note_excerpt_puts_the_indication_first_and_keeps_negated_facts() -> None:
    note = (
        "Denies recent travel. Mild seasonal allergies. Patient is a 67 year old man presenting with "
        "visual disturbance. No known melanoma. Symptoms have been slowly progressive over 3 months."
    )
    sents = pdf.key_sentences(note)
    assert sents[0].startswith("Patient is a 67 year old man")
    assert "No known melanoma." in sents and "Denies recent travel." not in sents
    assert sents[-1].startswith("Symptoms have been slowly progressive")
    assert pdf.key_sentences("He reports visual disturbance.") == ["He reports visual disturbance."]


def test_findings_header_words_fit_their_columns() -> None:
    """No header word is broken across lines ("Calcificatio-n"): each fits its column's width."""
    from reportlab.lib.units import mm
    from reportlab.pdfbase.pdfmetrics import stringWidth

    rows, _ = pdf.findings_rows([], CLASS_NAMES)
    widths = pdf.findings_widths(len(CLASS_NAMES) - 1)
    assert len(widths) == len(rows[0]) and sum(widths) == pytest.approx(180)
    for text, width in zip(rows[0], widths, strict=True):
        for word in text.split():
            assert stringWidth(word, "Helvetica-Bold", pdf_tables.HEAD_CELL.fontSize) <= width * mm - 6, (
                word,
                width,
            )


def test_inputs_line_gives_the_feature_distance_and_its_threshold() -> None:
    dom = DomainRecord(
        in_domain=True,
        distance=9.02,
        threshold=17.2,
        situation="CT+MR+note",
        calibrated_for_situation=True,
        guard_fitted=True,
    )
    line = pdf.verdict_inputs_line(dom)
    assert "calibration measured" in line
    assert "distance 9.0 to the training cases (out of domain above 17.2)" in line
    no_guard = DomainRecord(in_domain=True, situation="CT+note", guard_fitted=False)
    assert "distance" not in pdf.verdict_inputs_line(no_guard)
    assert "(no MR)" in pdf.verdict_inputs_line(no_guard)


def test_out_of_domain_score_bars_carry_no_plus_minus() -> None:
    from medfusion.report import figures

    assert figures.bar_labels([0.43], [0.012]) == ["0.43 ± 0.01"]
    assert figures.bar_labels([1.0, 0.98], None) == ["1.00 (not assessed)", "0.98 (not assessed)"]
    png = figures.score_bars({"malignant": 1.0}, {"malignant": 0.0}, 0.5, (0.4, 0.6), assessed=False)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_out_of_domain_impression_gives_no_findings() -> None:
    lesion = SimpleNamespace(side="left", region="frontal", core_diameter_mm=24.0, total_ml=9.0)
    scores = SimpleNamespace(
        in_domain=False,
        measurements=SimpleNamespace(lesions=[lesion] * 18),
        decision={},
        probabilities={"malignant": 0.99},
    )
    text = pdf.impression(scores)  # type: ignore[arg-type]
    assert text.startswith("Not assessed") and "18 regions" in text and "research use only" in text
    assert "detected" not in text and "measures" not in text
