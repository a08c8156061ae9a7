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


@pytest.fixture(scope="session")
def no_registration_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default pipeline with the shipped model's grid and intensities but registration skipped (the
    MR taken where it lies), no registration QC and no flip TTA: for tests of the run's mechanics
    (interrupts, resume, writers), where registration and inference — tested on their own — would take
    most of the time."""
    import json

    import yaml

    root = Path(__file__).parents[1]
    stored = json.loads((root / "medfusion" / "weights" / "default" / "model.json").read_text())["preprocess"]
    pipeline = yaml.safe_load((root / "pipelines" / "default.yaml").read_text())
    pipeline["name"] = "default-no-registration"
    pipeline["registration_consistency_check"] = False
    pipeline["infer"]["tta"] = False
    pipeline["preprocess"] = {
        **{k: stored[k] for k in ("target_spacing_mm", "target_size", "ct_windows", "mr_percentiles")},
        "registration": {"mode": "skip", "consistency_check": False},
    }
    path = tmp_path_factory.mktemp("pipelines") / "no-registration.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path
