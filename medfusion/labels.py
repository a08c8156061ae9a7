"""The product's vocabulary of outputs: segmentation classes (their names and label-map codes) and
diagnostic score names. The synthetic generator writes these, training learns them and the default
model package records them; a package trained on other data carries its own lists in `model.json`,
which is what inference and evaluation read.

Examples:
    >>> CLASS_NAMES[Label.OEDEMA]
    'oedema'
    >>> SCORE_NAMES
    ('malignant',)
"""

from __future__ import annotations

import enum


class Label(enum.IntEnum):
    """Label-map codes (uint8 voxel values) of the segmentation classes; 0 is background.

    Tumour core includes necrosis; oedema is the peritumoural T2/FLAIR-bright region; calcification is a
    calcified part of a lesion (physiological calcifications — pineal, choroid plexus — are background).
    """

    BACKGROUND = 0
    TUMOUR_CORE = 1
    OEDEMA = 2
    CALCIFICATION = 3


# class names in code order: CLASS_NAMES[code] is the name of label value `code`
CLASS_NAMES: tuple[str, ...] = tuple(label.name.lower() for label in Label)

# diagnostic scores, in the order of a model's score outputs and of the columns of `labels.csv`
SCORE_NAMES: tuple[str, ...] = ("malignant",)
