"""NegEx-style negation marking: tokens inside a negation scope get a ``neg_`` prefix, so that
"no history of malignancy" and "history of malignancy" differ in every encoder that sees tokens.

Triggers and terminators follow the spirit of Chapman et al. (2001), "A simple algorithm for
identifying negated findings and diseases in discharge summaries" (NegEx); the word lists here are
our own, short and aimed at referral notes.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z]+|\d+|[.;:,!?]")
PRE_TRIGGERS = (
    ("no", "history", "of"),
    ("negative", "for"),
    ("denies", "any"),
    ("no", "previous"),
    ("no", "prior"),
    ("there", "is", "no"),
    ("without",),
    ("denies",),
    ("no",),
    ("not",),
)
TERMINATORS = {".", ";", "but", "however", "although", ":", "!", "?"}
MAX_SCOPE = 6


def tokenize(text: str) -> list[str]:
    """Lower-cased words, numbers and the punctuation marks that end a negation scope, in order.

    Examples:
        >>> tokenize("No prior surgery; 3 weeks.")
        ['no', 'prior', 'surgery', ';', '3', 'weeks', '.']
    """
    return _TOKEN.findall(text.lower())


def mark_negations(tokens: list[str]) -> list[str]:
    """Prefix tokens in a negation scope with ``neg_`` (NegEx, Chapman et al. 2001, simplified).

    A scope opens after a trigger (`PRE_TRIGGERS`, longest listed first, so "no history of" wins over
    "no") and covers up to `MAX_SCOPE` tokens; a terminator (`TERMINATORS`: sentence punctuation,
    "but", "however", …) closes it. Triggers and terminators themselves are kept unprefixed.

    Args:
        tokens: output of `tokenize`.

    Returns:
        A list of the same tokens (same length), some prefixed.

    Examples:
        >>> mark_negations(tokenize("No history of cancer but headache."))
        ['no', 'history', 'of', 'neg_cancer', 'but', 'headache', '.']
    """
    out: list[str] = []
    i = 0
    scope = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in TERMINATORS:
            scope = 0
            out.append(tok)
            i += 1
            continue
        matched = next((t for t in PRE_TRIGGERS if tuple(tokens[i : i + len(t)]) == t), None)
        if matched is not None:
            out.extend(matched)
            i += len(matched)
            scope = MAX_SCOPE
            continue
        out.append(f"neg_{tok}" if scope > 0 else tok)
        scope = max(0, scope - 1)
        i += 1
    return out
