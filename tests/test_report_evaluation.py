"""evaluation.pdf: a header saying what was evaluated and n per metric; plots on full unit axes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pypdf import PdfReader

from medfusion.evaluate.plots import write_plots_and_pdf


def _block(n_cases: int, n_scored: int) -> dict:
    return {
        "n_cases": n_cases,
        "n_both_empty": n_cases - n_scored,
        "n_ref_empty": 0,
        "n_pred_empty": 0,
        "dice": {"mean": 0.8, "median": 0.8, "n": n_scored},
        "hd95_mm": {"mean": 2.0, "median": 2.0, "n": n_scored},
        "nsd": {"mean": 0.9, "median": 0.9, "n": n_scored},
    }


def test_header_and_n_per_metric(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [
        {
            "class": c,
            "dice": float(rng.uniform(0.6, 0.9)),
            "empty": "none" if k < 4 else "both",
            "volume_pred_ml": float(rng.uniform(1, 5)),
            "volume_ref_ml": float(rng.uniform(1, 5)),
        }
        for c in ("tumour_core", "oedema")
        for k in range(7)
    ]
    y = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    p = np.array([0.2, 0.9, 0.45, 0.7, 0.55, 0.1, 0.8, 0.6])
    summary = {
        "n_patients_predicted": 7,
        "n_patients_with_reference": 7,
        "n_patients_labelled": 8,
        "segmentation": {"tumour_core": _block(7, 4), "oedema": _block(7, 4)},
    }
    paths = write_plots_and_pdf(
        tmp_path, rows, {"malignant": (y, p)}, summary, run="run-2025-01-05", model="default 1.0"
    )
    assert {q.name for q in paths} == {"diagnosis_malignant.png", "segmentation.png"}
    text = " ".join(page.extract_text() for page in PdfReader(str(tmp_path / "evaluation.pdf")).pages)
    text = " ".join(text.split())
    assert "run-2025-01-05" in text and "default 1.0" in text and "7 predicted" in text
    assert "n (Dice, HD95, NSD)" in text and "4, 4, 4" in text  # "cases 7" next to Dice over 4
    assert "tumour core" in text and "tumour_core" not in text


def test_evaluate_does_not_import_the_report() -> None:
    """evaluate sits below report in the data flow: the tables both draw come from io/pdf_tables.py."""
    import ast

    import medfusion.evaluate

    upward = []
    for path in sorted(Path(medfusion.evaluate.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            upward += [f"{path.name}: {n}" for n in names if n.startswith("medfusion.report")]
    assert not upward, upward


def test_cell_text_is_escaped_for_reportlab() -> None:
    from medfusion.io.pdf_tables import escape, table

    assert escape("a < b & c > d") == "a &lt; b &amp; c &gt; d"
    t = table([["<b>not bold</b>"]], [40], header=False)
    cell = t._cellvalues[0][0]
    assert "".join(f.text for f in cell.frags) == "<b>not bold</b>"  # shown literally, not as markup
    assert not any(f.fontName.endswith("Bold") for f in cell.frags)
