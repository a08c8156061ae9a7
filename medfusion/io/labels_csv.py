"""The labels CSV (`labels/labels.csv`, one row per patient: `patient_id` plus one 0/1 column per
score, and any subgroup columns), read the same way by evaluation, comparison and re-calibration."""

from __future__ import annotations

import csv
from pathlib import Path

from medfusion.io.errors import InputError


def labels_csv_path(labels: Path) -> Path:
    """The labels CSV given either itself (a ``.csv`` path) or the labels folder that holds
    ``labels.csv``; the file need not exist."""
    return labels if labels.suffix == ".csv" else labels / "labels.csv"


def read_labels_table(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """The rows of a labels CSV (each a dict column → text, in file order) and its column names.

    Args:
        path: the CSV file (see `labels_csv_path`); UTF-8, with a header row.

    Raises:
        InputError: the file does not exist, or its header has no ``patient_id`` column (one line,
            naming the file).
    """
    if not Path(path).is_file():
        raise InputError(path, "labels CSV not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if "patient_id" not in (reader.fieldnames or []):
            raise InputError(path, "labels CSV needs a patient_id column")
        return list(reader), list(reader.fieldnames or [])
