"""Slow: the real CTs of ../shared/real-data (a tilted GE head CT, an abdominal CT) through `medfusion
inspect`, `register` (with a head MR built from nilearn's MNI152 template) and `run` (#24).

The real files are linked into a temporary patient folder, never copied into the repository. What must
hold: no traceback anywhere; the head CT loads as one orthogonal volume after the gantry-tilt correction;
the abdominal CT with a head MR is refused or flagged (registration QC failed, or the run reports the MR
left out / the case out of domain)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.io.case import load_case
from medfusion.io.nifti import write_nifti
from tests.mni_anatomy import load_anatomy, mni_dir, moved, random_motion, t1_with_scalp

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        mni_dir() is None, reason="nilearn is not installed (its wheel carries the MNI152 template)"
    ),
]
REAL = Path(__file__).resolve().parents[2] / "shared" / "real-data"
CTS = {"head": REAL / "ge-head-ct", "abdomen": REAL / "abdomen-ct" / "dicom"}
NOTE = "Headache for two weeks, no focal deficit. Question of a mass lesion."


def _patient(tmp: Path, which: str) -> Path:
    """A patient folder: the real CT's files linked under CT/, an MNI-built T1 (scalp and skull signal,
    a random known motion about the CT's centre) as mr_t1.nii.gz, and a made-up note."""
    folder = tmp / f"REAL_{which.upper()}"
    (folder / "CT").mkdir(parents=True)
    for f in sorted(CTS[which].iterdir()):
        if f.is_file() and f.name != "LICENSE":
            (folder / "CT" / f.name).symlink_to(f)
    ct = load_case(folder).ct
    assert ct is not None, f"{which}: the CT did not load"
    centre = ct.index_to_world((np.array(ct.size_xyz, float)[None] - 1) / 2)[0]
    mr = moved(t1_with_scalp(load_anatomy(1.5)), random_motion(np.random.default_rng(0), centre), 1.5)
    write_nifti(mr, folder / "mr_t1.nii.gz")
    (folder / "note.txt").write_text(NOTE)
    return folder


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    missing = [str(p) for p in CTS.values() if not p.exists()]
    if missing:
        pytest.skip(f"real data not here: {', '.join(missing)}")
    tmp = tmp_path_factory.mktemp("real")
    return {which: _patient(tmp, which) for which in CTS}


def _no_traceback(res: object) -> None:
    exc = getattr(res, "exception", None)
    assert exc is None or isinstance(exc, SystemExit), f"traceback: {exc!r}\n{getattr(res, 'output', '')}"


def test_head_ct_loads_after_tilt_correction(patients: dict[str, Path]) -> None:
    case = load_case(patients["head"])
    assert case.ct is not None and len(case.mr) == 1
    direction = np.asarray(case.ct.direction, float).reshape(3, 3)
    assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-6)  # orthogonal after the correction
    assert any("gantry tilt" in w for w in case.ct.warnings), case.ct.warnings


@pytest.mark.parametrize("which", list(CTS))
def test_inspect_and_register_without_traceback(
    patients: dict[str, Path], which: str, tmp_path: Path
) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(patients[which])])
    _no_traceback(res)
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["register", str(patients[which]), "--out", str(tmp_path / "reg")])
    _no_traceback(res)
    qc = json.loads((tmp_path / "reg" / "qc.json").read_text())
    print(which, res.exit_code, qc["reasons"], {k: c["value"] for k, c in qc["checks"].items()})
    assert res.exit_code == (0 if qc["passed"] else 1)
    if which == "abdomen":
        assert not qc["passed"], "a head MR on an abdominal CT passed the registration QC"


@pytest.mark.parametrize("which", list(CTS))
def test_run_without_traceback(patients: dict[str, Path], which: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", str(patients[which]), "--out", str(out), "--device", "cpu"])
    _no_traceback(res)
    pid = patients[which].name
    if (out / pid / "error.json").exists():  # refused, with its reason written down
        assert which == "abdomen", (out / pid / "error.json").read_text()
        return
    scores = json.loads((out / pid / "scores.json").read_text())
    qc = json.loads((out / pid / "qc.json").read_text())
    if which == "abdomen":
        flagged = scores["domain"]["in_domain"] is False or '"passed": false' in json.dumps(qc)
        assert flagged, "the abdominal CT was neither refused nor flagged"
