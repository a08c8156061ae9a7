"""Table building blocks of medfusion's PDFs (reportlab), shared by the patient report
(`report/pdf.py`) and the evaluation report (`evaluate/plots.py`): cell styles, text escaping and a
grid table whose cells wrap inside their columns.

Examples:
    >>> t = table([["Metric", "Value"], ["AUROC", "0.91"]], [30, 20])
    >>> len(t._cellvalues), escape("a < b & c")
    (2, 'a &lt; b &amp; c')
"""

from __future__ import annotations

from xml.sax.saxutils import escape as _xml_escape

from reportlab.lib import colors
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.platypus import Paragraph, Table, TableStyle

CELL = ParagraphStyle("cell", fontName="Helvetica", fontSize=8.5, leading=10)
"""A table cell: Helvetica 8.5 pt on 10 pt lines."""
HEAD_CELL = ParagraphStyle("head_cell", parent=CELL, fontName="Helvetica-Bold")
"""A header cell: `CELL` in bold."""


def escape(text: str) -> str:
    """`text` safe inside a reportlab `Paragraph` (its mini-markup is XML): &, < and > as entities
    (the standard library's `xml.sax.saxutils.escape`)."""
    return _xml_escape(text)


def table(rows: list[list[str]], widths: list[float], *, header: bool = True) -> Table:
    """A grid table whose cells wrap inside their column, never overflowing it.

    Args:
        rows: the cells, row by row (each value shown as `str(value)`, escaped); every row as long as
            `widths`.
        widths: column widths in mm.
        header: the first row is a header (bold on grey, repeated on every page the table spans).

    Returns:
        A reportlab `Table` of `Paragraph` cells, 3 pt padding left and right, top-aligned.
    """
    cells = [
        [Paragraph(escape(str(v)), HEAD_CELL if header and r == 0 else CELL) for v in row]
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
