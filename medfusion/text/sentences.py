"""Sentence splitting of clinical notes: the one rule that note augmentation and the report's key
sentences use."""

from __future__ import annotations

import re

# a sentence ends at ".", "!" or "?" followed by white space; abbreviations ("Dr. X") split too, which
# costs nothing here: the pieces are shuffled, dropped or shown, never parsed
_BOUNDARY = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """The sentences of `text`, in order, stripped; ``[]`` for empty or white-space-only text.

    Examples:
        >>> split_sentences("Known melanoma. Onset 2 weeks ago!  No fever?")
        ['Known melanoma.', 'Onset 2 weeks ago!', 'No fever?']
        >>> split_sentences("   ")
        []
    """
    text = text.strip()
    return _BOUNDARY.split(text) if text else []
