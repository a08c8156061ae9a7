"""The colour of each label class, shared by the report's overlays and the DICOM SEG's recommended
display colours, so that a viewer shows a segment in the colour the report used for it.

Examples:
    >>> class_colour(1)
    '#e41a1c'
"""

from __future__ import annotations

# index = class index; 0 (background) is transparent. ColorBrewer Set1, readable on grey CT.
CLASS_COLOURS = ["#00000000", "#e41a1c", "#ffd92f", "#4daf4a", "#377eb8", "#984ea3"]


def class_colour(index: int) -> str:
    """`#rrggbb` of class `index` (≥ 1); beyond the table the colours repeat from class 1.

    Raises:
        ValueError: `index` < 1 (the background has no colour).
    """
    if index < 1:
        msg = f"class index {index} has no display colour (background is 0, classes start at 1)"
        raise ValueError(msg)
    return CLASS_COLOURS[1 + (index - 1) % (len(CLASS_COLOURS) - 1)]
