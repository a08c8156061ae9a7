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
    return _TOKEN.findall(text.lower())


def mark_negations(tokens: list[str]) -> list[str]:
    """Prefix tokens in a negation scope (up to MAX_SCOPE words after a trigger) with ``neg_``."""
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


def negated_sentences(text: str) -> list[str]:
    """Sentences of `text` that contain a negation trigger (for the report's 'key sentences')."""
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    return [s for s in sentences if any(t.startswith("neg_") for t in mark_negations(tokenize(s)))]
