from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small synthetic patients (one DICOM MR, one NIfTI MR, one without lesion), made once per run."""
    from medfusion.synth.generate import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    plan = {
        0: {"mr_format": "dicom", "n_lesions": 1},
        1: {"mr_format": "nifti", "n_lesions": 2},
        2: {"mr_format": "dicom", "n_lesions": 0},
    }
    generate_cohort(out, 3, seed=11, preset="small", workers=1, plan=plan)
    return out
