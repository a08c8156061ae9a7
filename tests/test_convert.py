"""`medfusion convert`: what medfusion reads, written as NIfTI + JSON sidecars that load back the same."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.io.case import load_case


def test_convert_writes_the_chosen_volumes_with_sidecars_that_load_back(cohort: Path, tmp_path: Path) -> None:
    patient = cohort / "patients" / sorted(p.name for p in (cohort / "patients").iterdir())[0]
    case = load_case(patient)
    assert case.ct is not None and case.mr
    out = tmp_path / "conv"
    res = CliRunner().invoke(app, ["convert", str(patient), "--out", str(out)])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    expected = ["ct.json", "ct.nii.gz", "mr.json", "mr.nii.gz"] + (
        ["mr_2.json", "mr_2.nii.gz"] if len(case.mr) > 1 else []
    )
    assert names == sorted(expected)
    side = json.loads((out / "ct.json").read_text())
    assert side["Modality"] == "CT" and side["SeriesInstanceUID"] == case.ct.meta["series_uid"]
    assert side["Warnings"] == case.ct.warnings and side["Choices"] == case.choices
    back = load_case(out)  # the sidecars' "Modality" tells the loader what each file is
    assert back.ct is not None and back.ct.shape == case.ct.shape
    assert np.allclose(back.ct.affine, case.ct.affine, atol=1e-4)
    assert np.array_equal(back.ct.array, case.ct.array)
    assert back.primary_mr is not None and back.primary_mr.shape == case.mr[0].shape


def test_convert_refuses_a_folder_without_volumes_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "note.txt").write_text("Headache.\n")
    res = CliRunner().invoke(app, ["convert", str(tmp_path / "p"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no CT or MR volume to convert" in res.output, res.output
    assert not (tmp_path / "o").exists()
