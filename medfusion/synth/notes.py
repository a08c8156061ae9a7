"""Clinical facts, the diagnosis model that uses them with the image facts, and the note text.

The diagnosis (malignant or not) is drawn from a logistic model of image facts (core diameter,
oedema extent, necrosis, calcification) and note facts (age, symptom course, prior cancer). Oracle
probabilities are the exact conditional expectations under this model, computed by Monte Carlo
over the facts that the given view does not observe (see docs/synthetic-data.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# --- Facts ---


@dataclasses.dataclass
class ImageFacts:
    """The image side of the diagnosis model (see `logit`)."""

    has_lesion: bool
    diameter_mm: float  # largest core diameter, 0 when no lesion
    oedema_ratio: float  # oedema radius / core radius of the largest lesion
    necrosis: bool
    calcification: bool


@dataclasses.dataclass
class NoteFacts:
    """The clinical side of the diagnosis model, and whether the note states the course and the history
    (a fact the note does not state is unknown to every reader of it, the oracle included)."""

    age: int
    sex: str
    rapid_course: bool  # symptoms over weeks (True) or months (False)
    prior_cancer: bool
    course_stated: bool = True
    history_stated: bool = True


def sample_note_facts(rng: np.random.Generator) -> NoteFacts:
    """Clinical facts drawn from their priors: age ~ Normal(56, 15) clipped to 18-92 years, sex 1:1, a
    rapid course with probability 0.45, a prior cancer with probability 0.3."""
    return NoteFacts(
        age=int(np.clip(rng.normal(56, 15), 18, 92)),
        sex=str(rng.choice(["female", "male"])),
        rapid_course=bool(rng.random() < 0.45),
        prior_cancer=bool(rng.random() < 0.3),
    )


def logit(img: ImageFacts, note: NoteFacts) -> float:
    """Log-odds of malignancy of the synthetic diagnosis (the ground truth's generative model, not a
    clinical one): −4 without a lesion, else −1.3 + 0.8 (d − 15 mm) / 6 mm + 0.9 necrosis
    + 0.5 (oedema ratio − 1.9) / 0.3 − 1.2 calcification + 2.4 prior cancer + 2.0 rapid course
    + 0.05 (age − 56 years). The coefficients were chosen so that neither the images nor the note alone
    suffices; additive in log-odds, which the late-fusion note head relies on."""
    if not img.has_lesion:
        return -4.0
    z = -1.3
    z += 0.8 * (img.diameter_mm - 15.0) / 6.0
    z += 0.9 * img.necrosis + 0.5 * (img.oedema_ratio - 1.9) / 0.3 - 1.2 * img.calcification
    z += 2.4 * note.prior_cancer + 2.0 * note.rapid_course + 0.05 * (note.age - 56)
    return float(z)


def _sigmoid(x: np.ndarray | float) -> Any:
    return 1.0 / (1.0 + np.exp(-np.asarray(x)))


def oracle_probabilities(
    img: ImageFacts,
    note: NoteFacts,
    image_prior: list[ImageFacts],
    note_prior: list[NoteFacts],
    rng: np.random.Generator,
) -> dict[str, float]:
    """P(malignant | view) for the views 'all' (images + stated note facts), 'image' and 'note', each in
    [0, 1]: sigmoid(`logit`) averaged over 256 draws (`rng`) from the priors `image_prior` /
    `note_prior` for the facts that view does not know (Monte-Carlo marginalisation)."""
    k = len(note_prior)

    def stated(n: NoteFacts, draw: NoteFacts) -> NoteFacts:
        return dataclasses.replace(
            draw,
            age=n.age,
            sex=n.sex,
            rapid_course=n.rapid_course if n.course_stated else draw.rapid_course,
            prior_cancer=n.prior_cancer if n.history_stated else draw.prior_cancer,
        )

    idx = rng.integers(0, k, 256)
    p_all = float(np.mean([_sigmoid(logit(img, stated(note, note_prior[i]))) for i in idx]))
    p_img = float(np.mean([_sigmoid(logit(img, note_prior[i])) for i in idx]))
    jdx = rng.integers(0, len(image_prior), 256)
    p_note = float(
        np.mean(
            [
                _sigmoid(logit(image_prior[j], stated(note, note_prior[i])))
                for i, j in zip(idx, jdx, strict=True)
            ]
        )
    )
    return {"all": p_all, "image": p_img, "note": p_note}


# --- Text ---

_SYMPTOMS = [
    "headaches",
    "word-finding difficulty",
    "left-sided weakness",
    "right arm numbness",
    "a first seizure",
    "visual disturbance",
    "personality change",
    "unsteady gait",
]
_IRRELEVANT = [
    "Allergic to penicillin.",
    "Lives with spouse and is independent in daily activities.",
    "Non-smoker; drinks alcohol occasionally.",
    "Vaccinations are up to date.",
    "Appendectomy in childhood.",
    "No fever or night sweats.",
    "Denies recent travel.",
    "Blood pressure 132/84 at presentation.",
    "Mild seasonal allergies.",
    "No known drug allergies were reported at a previous visit, though this has been revised.",
]
_MEDS = [
    "levetiracetam",
    "dexamethasone",
    "amlodipine",
    "metformin",
    "atorvastatin",
    "omeprazole",
    "paracetamol as needed",
    "ramipril",
]
_CANCERS = [
    "breast cancer",
    "non-small cell lung cancer",
    "melanoma",
    "renal cell carcinoma",
    "colorectal cancer",
]


# Cancer-history sentences as (affirmed, negated) pairs built from the same words, so that only the
# negation tells a prior cancer from none: a reader that keys on "history" or "cancer" alone fails.
_HISTORY = [
    ("Past history of {c}{when}.", "No past history of {c}."),
    ("History of {c}{when}.", "No history of {c}."),
    ("Known {c}{when}.", "No known {c}."),
    ("{pron} reports a prior {c}{when}.", "{pron} denies any prior {c}."),
    ("Prior {c}{when}.", "Negative for prior {c}."),
    ("Previous {c}{when}.", "There is no previous {c}."),
]


def _history_sentence(prior_cancer: bool, pron: str, rng: np.random.Generator) -> str:
    affirmed, negated = _HISTORY[int(rng.integers(len(_HISTORY)))]
    c = str(rng.choice([*_CANCERS, "malignancy", "cancer"]))
    if not prior_cancer:
        return negated.format(c=c, pron=pron)
    yrs = int(rng.integers(1, 9))
    when = str(rng.choice(["", f", treated {yrs} years ago", f" ({yrs} years ago)"]))
    return affirmed.format(c=c, pron=pron, when=when)


def note_text(n: NoteFacts, rng: np.random.Generator) -> str:
    """A free-text referral note stating (or omitting) the facts, with varied wording and negations."""
    pron = "She" if n.sex == "female" else "He"
    who = (
        rng.choice(["woman", "lady", "female patient"])
        if n.sex == "female"
        else rng.choice(["man", "gentleman", "male patient"])
    )
    symptoms = list(rng.choice(_SYMPTOMS, size=int(rng.integers(1, 3)), replace=False))
    sent: list[str] = []
    opener = rng.choice(
        [
            f"{n.age}-year-old {who} referred with {' and '.join(symptoms)}.",
            f"Patient is a {n.age} year old {who} presenting with {' and '.join(symptoms)}.",
            f"Age {n.age}, {n.sex}. Presenting complaint: {', '.join(symptoms)}.",
        ]
    )
    sent.append(str(opener))
    if n.course_stated:
        if n.rapid_course:
            weeks = int(rng.integers(1, 5))
            sent.append(
                str(
                    rng.choice(
                        [
                            f"Symptoms have progressed rapidly over the past {weeks} weeks.",
                            f"Onset {weeks} weeks ago with rapid worsening.",
                            f"{pron} reports a {weeks}-week history of quickly worsening symptoms.",
                        ]
                    )
                )
            )
        else:
            months = int(rng.integers(4, 19))
            sent.append(
                str(
                    rng.choice(
                        [
                            f"Symptoms have been slowly progressive over {months} months.",
                            f"Gradual onset over roughly {months} months, no rapid deterioration.",
                            f"{pron} describes a long, stable {months}-month history without rapid progression.",
                        ]
                    )
                )
            )
    if n.history_stated:
        sent.append(_history_sentence(n.prior_cancer, pron, rng))
    meds = list(rng.choice(_MEDS, size=int(rng.integers(0, 3)), replace=False))
    if meds:
        sent.append(f"Current medications: {', '.join(meds)}.")
    else:
        sent.append("Takes no regular medication.")
    sent.extend(str(s) for s in rng.choice(_IRRELEVANT, size=int(rng.integers(1, 4)), replace=False))
    head, tail = sent[:1], sent[1:]
    rng.shuffle(tail)  # type: ignore[arg-type]
    return " ".join(head + tail)
