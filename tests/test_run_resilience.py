"""A cohort run that survives people and machines (#28), and writers that survive odd sources (#23):
interrupts, SIGKILL + resume, re-runs into a used folder, refusals, umask, cohort discovery, SEG
from de-identified or gappy CTs, one writer failing without costing the others."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.io.atomic import write_json
from medfusion.io.case import find_patient_folders, is_patient_folder, load_case
from medfusion.io.seg import write_dicom_seg

FIELD_CASES = Path(__file__).resolve().parents[2] / "shared" / "field-cases"
MEDFUSION = [sys.executable, "-m", "medfusion.cli"]


# --- Files and folders ---


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path: Path, mask: int, mode: int) -> None:
    old = os.umask(mask)
    try:
        path = write_json(tmp_path / "a" / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
    assert not list(path.parent.glob(".tmp-*"))


def _cohort_root(cohort: Path, tmp_path: Path) -> Path:
    root = tmp_path / "cohort"
    shutil.copytree(cohort / "patients", root)
    return root


def test_a_stray_readme_or_script_does_not_make_the_cohort_root_a_patient(
    cohort: Path, tmp_path: Path
) -> None:
    root = _cohort_root(cohort, tmp_path)
    ids = sorted(p.name for p in root.iterdir())
    (root / "README.md").write_text("# Cohort from site A\n")
    (root / "convert.py").write_text("print('hello')\n")
    (root / "notes.txt").write_text("export of 2024-05-01\n")  # a stray note too
    docs = root / "docs"
    docs.mkdir()
    (docs / "README.md").write_text("nothing to see\n")
    note_only = root / "NOTEONLY"
    note_only.mkdir()
    (note_only / "note.txt").write_text("A note alone.\n")
    assert not is_patient_folder(root)
    assert [p.name for p in find_patient_folders([root])] == ids  # docs/ and NOTEONLY/ are not patients
    # a patient folder whose images are in sub-folders (note + CT/ + MR/) is still one patient
    one = root / ids[0]
    assert is_patient_folder(one) and find_patient_folders([one]) == [one]
    assert not is_patient_folder(note_only)


# --- DICOM SEG from sources as hospitals export them ---


def _field_case(name: str, out: Path) -> Path:
    script = FIELD_CASES / name
    if not script.exists():
        pytest.skip(f"{script} not available")
    subprocess.run([sys.executable, str(script), str(out)], cwd=FIELD_CASES, check=True, capture_output=True)
    return out


def _labels(ct: object) -> object:
    arr = np.zeros(ct.shape, np.int16)  # type: ignore[attr-defined]
    nz = arr.shape[0]
    arr[nz // 3 : 2 * nz // 3, 20:30, 20:30] = 1
    return ct.with_array(arr, "SEG")  # type: ignore[attr-defined]


def _seg_of(ct: Any, path: Path) -> Any:
    """A one-class DICOM SEG of a block in `ct` (io.volume.Volume), written to `path`."""
    return write_dicom_seg(
        _labels(ct),
        ct,
        ["background", "tumour_core"],
        path,
        model_name="m",
        model_version="1",
    )


def test_seg_from_a_deidentified_ct_is_written_with_empty_type2_values(tmp_path: Path) -> None:
    folder = _field_case("15_deidentified_missing_type2.py", tmp_path / "fc15")
    ct = load_case(folder).ct
    assert ct is not None
    res = _seg_of(ct, tmp_path / "seg.dcm")
    assert res.path is not None and any("PatientBirthDate" in n and "AccessionNumber" in n for n in res.notes)
    ds = pydicom.dcmread(res.path)
    assert ds.PatientBirthDate == "" and ds.AccessionNumber == ""
    assert ds.StudyInstanceUID == pydicom.dcmread(ct.meta["files"][0]).StudyInstanceUID


def test_seg_is_skipped_with_a_note_when_the_source_has_empty_uids(cohort: Path, tmp_path: Path) -> None:
    src = tmp_path / "p"
    shutil.copytree(cohort / "patients" / sorted(p.name for p in (cohort / "patients").iterdir())[0], src)
    ct = load_case(src).ct
    assert ct is not None
    ds = pydicom.dcmread(ct.meta["files"][0])
    ds.SOPInstanceUID = ""
    ds.save_as(ct.meta["files"][0])
    res = _seg_of(ct, tmp_path / "seg.dcm")
    assert res.path is None and "SOPInstanceUID" in res.notes[0]
    assert not (tmp_path / "seg.dcm").exists()


def test_seg_of_a_ct_with_interpolated_slices_references_real_instances(cohort: Path, tmp_path: Path) -> None:
    src = tmp_path / "p"
    shutil.copytree(cohort / "patients" / sorted(p.name for p in (cohort / "patients").iterdir())[0], src)
    ct = load_case(src).ct
    assert ct is not None
    Path(ct.meta["files"][5]).unlink()  # a missing slice: the loader interpolates it
    Path(ct.meta["files"][9]).unlink()
    gappy = load_case(src).ct
    assert gappy is not None and gappy.shape == ct.shape and len(gappy.meta["files"]) == ct.shape[0] - 2
    labels = gappy.with_array(np.ones(gappy.shape, np.int16), "SEG")  # every slice labelled: every frame kept
    res = write_dicom_seg(
        labels, gappy, ["background", "tumour_core"], tmp_path / "seg.dcm", model_name="m", model_version="1"
    )
    assert res.path is not None and any("2 interpolated CT slice(s)" in n for n in res.notes)
    seg = hd.seg.segread(str(res.path))
    real = set(gappy.meta["sop_instance_uids"])
    refs = [
        f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for f in seg.PerFrameFunctionalGroupsSequence
    ]
    assert len(refs) == len(real) and set(refs) == real


# --- Refusals before any work ---


def test_unknown_only_ids_are_refused(cohort: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app,
        [
            "run",
            str(cohort / "patients"),
            "--out",
            str(tmp_path / "o"),
            "--only",
            "SYN99999999",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "--only: no patient folder named SYN99999999" in res.output and "Traceback" not in res.output


def test_an_output_folder_over_the_inputs_is_refused_and_nothing_is_deleted(
    cohort: Path, tmp_path: Path
) -> None:
    patients = tmp_path / "patients"
    shutil.copytree(cohort / "patients", patients)
    before = sorted(str(p.relative_to(patients)) for p in patients.rglob("*"))
    for out in (patients, next(patients.iterdir()) / "out"):
        res = CliRunner().invoke(app, ["run", str(patients), "--out", str(out), "--device", "cpu"])
        assert res.exit_code == 2, res.output
        assert "overlaps the input folder" in res.output and "Traceback" not in res.output
    assert sorted(str(p.relative_to(patients)) for p in patients.rglob("*")) == before


def test_an_output_folder_of_another_run_needs_resume_or_overwrite(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    (out / "OLD0001").mkdir(parents=True)
    (out / "OLD0001" / "scores.json").write_text("{}")
    res = CliRunner().invoke(app, ["run", str(cohort / "patients"), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert "already holds the outputs of 1 patient(s)" in res.output and "--resume" in res.output
    assert "--overwrite" in res.output and not (out / "summary.csv").exists()


def test_a_folder_without_patients_is_refused(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("empty\n")
    res = CliRunner().invoke(app, ["run", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert res.exit_code == 2 and "no patient folder" in res.output, res.output


# --- One writer failing, interrupts, SIGKILL + resume (these run the model) ---


@pytest.fixture(scope="module")
def two_patients(
    cohort: Path, tmp_path_factory: pytest.TempPathFactory, no_registration_pipeline: Path
) -> tuple[Path, Path]:
    """Two patients and their uninterrupted run (the reference every resumed run must equal). All runs
    on them skip registration (`no_registration_pipeline`, in `FAST`): these tests are about stopping,
    resuming and writing, and registration would take most of their time."""
    FAST[:] = ["--pipeline", str(no_registration_pipeline)]
    tmp = tmp_path_factory.mktemp("resilience")
    patients = tmp / "patients"
    for pid in sorted(p.name for p in (cohort / "patients").iterdir())[:2]:
        shutil.copytree(cohort / "patients" / pid, patients / pid)
    ref = tmp / "reference"
    res = CliRunner().invoke(app, ["run", str(patients), "--out", str(ref), "--device", "cpu", *FAST])
    assert res.exit_code == 0, res.output
    return patients, ref


FAST: list[str] = []  # --pipeline of the two_patients fixture's runs


def _table(out: Path) -> list[dict[str, str]]:
    """summary.csv without the timing columns (measured, so never equal between two runs)."""
    rows = list(csv.DictReader(open(out / "summary.csv")))
    return [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rows]


def _assert_same_outputs(out: Path, ref: Path) -> None:
    # runs are deterministic (#25: seeded registration and MC dropout, SimpleITK on one thread once a
    # Predictor exists, deterministic torch): a resumed run equals an uninterrupted one, number for number
    assert _table(out) == _table(ref)
    assert (
        list(csv.DictReader(open(out / "summary.csv")))[0].keys()
        == list(csv.DictReader(open(ref / "summary.csv")))[0].keys()
    )
    for d in sorted(p for p in ref.iterdir() if p.is_dir()):
        a = json.loads((out / d.name / "scores.json").read_text())
        b = json.loads((d / "scores.json").read_text())
        assert a["probabilities"] == b["probabilities"] and a["uncertainty"] == b["uncertainty"]
        assert a["measurements"] == b["measurements"]
        sa = np.asarray(nib.load(out / d.name / "segmentation.nii.gz").dataobj)
        sb = np.asarray(nib.load(d / "segmentation.nii.gz").dataobj)
        assert np.array_equal(sa, sb)
        assert sorted(p.name for p in (out / d.name).iterdir()) == sorted(p.name for p in d.iterdir())
    run, run_ref = json.loads((out / "run.json").read_text()), json.loads((ref / "run.json").read_text())
    for key in ("patients", "devices_used", "failures", "model", "interrupted"):
        assert run[key] == run_ref[key], key
    assert (out / "failures.jsonl").read_text() == ""


def _assert_nothing_half_written(out: Path) -> None:
    """Every file under a final name is whole; a patient folder is complete or absent; no failure
    was recorded because of a kill."""
    for d in out.iterdir():
        if d.name.startswith(".") or not d.is_dir():
            continue
        assert not (d / "error.json").exists(), (d / "error.json").read_text()
        assert (d / "scores.json").exists(), sorted(p.name for p in d.iterdir())
        for f in d.iterdir():
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.name.endswith(".nii.gz"):
                np.asarray(nib.load(f).dataobj)
            elif f.suffix == ".pdf":
                data = f.read_bytes()
                assert data.startswith(b"%PDF") and b"%%EOF" in data[-64:]
            elif f.suffix == ".dcm":
                pydicom.dcmread(f)
    if (out / "run.json").exists():
        json.loads((out / "run.json").read_text())


def _start(patients: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [*MEDFUSION, "run", str(patients), "--out", str(out), "--device", "cpu", *FAST, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_work(out: Path, proc: subprocess.Popen[str], timeout: float = 300) -> None:
    """Until a patient is being written (a `.tmp-<id>` folder exists) or the process ends."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        if out.exists() and list(out.glob(".tmp-*")):
            return
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_signal_stops_the_run_cleanly_and_says_how_to_resume(
    two_patients: tuple[Path, Path], tmp_path: Path, sig: signal.Signals
) -> None:
    patients, ref = two_patients
    out = tmp_path / "out"
    proc = _start(patients, out)
    _wait_for_work(out, proc)
    time.sleep(random.Random(int(sig)).uniform(0.0, 3.0))  # somewhere in load/register/infer/write
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + int(sig), err
    assert "Traceback" not in err and "Resume with: medfusion run" in err and "--resume" in err, err
    assert not list(out.glob(".tmp-*"))
    _assert_nothing_half_written(out)
    run = json.loads((out / "run.json").read_text())
    assert run["interrupted"] == sig.name and run["failures"] == []
    res = CliRunner().invoke(
        app, ["run", str(patients), "--out", str(out), "--device", "cpu", "--resume", *FAST]
    )
    assert res.exit_code == 0, res.output
    _assert_same_outputs(out, ref)


def _kill_and_resume(patients: Path, ref: Path, out: Path, kills: int, seed: int) -> int:
    """SIGKILL `medfusion run` at random moments `kills` times (each run resuming the last), then
    let it finish; returns how many kills landed while a patient was being written."""
    rng = random.Random(seed)
    landed = 0
    for _ in range(kills):
        proc = _start(patients, out, "--resume")
        _wait_for_work(out, proc)
        time.sleep(rng.uniform(0.0, 6.0))
        if proc.poll() is None:
            landed += bool(list(out.glob(".tmp-*")))
            proc.kill()
        proc.wait(timeout=60)
        _assert_nothing_half_written(out)
        if proc.returncode == 0:  # finished before the kill: start over to keep killing
            shutil.rmtree(out)
    res = CliRunner().invoke(
        app, ["run", str(patients), "--out", str(out), "--device", "cpu", "--resume", *FAST]
    )
    assert res.exit_code == 0, res.output
    _assert_nothing_half_written(out)
    _assert_same_outputs(out, ref)
    return landed


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(
    two_patients: tuple[Path, Path], tmp_path: Path
) -> None:
    patients, ref = two_patients
    landed = _kill_and_resume(patients, ref, tmp_path / "out", kills=2, seed=1)
    assert landed >= 1  # else the test killed nothing that mattered


@pytest.mark.slow
def test_sigkill_twenty_times_then_resume_equals_an_uninterrupted_run(
    two_patients: tuple[Path, Path], tmp_path: Path
) -> None:
    patients, ref = two_patients
    landed = _kill_and_resume(patients, ref, tmp_path / "out", kills=20, seed=2)
    assert landed >= 10


def _run_with_a_broken_writer(
    patients: Path, out: Path, monkeypatch: pytest.MonkeyPatch, module: object, name: str, exc: Exception
) -> tuple[str, dict]:
    """Run the first patient with `module.name` raising `exc`; returns its id and qc.json."""

    def broken(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(module, name, broken)
    pid = sorted(p.name for p in patients.iterdir())[0]
    res = CliRunner().invoke(
        app, ["run", str(patients), "--out", str(out), "--device", "cpu", "--only", pid, *FAST]
    )
    assert res.exit_code == 0, res.output
    return pid, json.loads((out / pid / "qc.json").read_text())


def test_a_failing_writer_costs_only_its_own_output(
    two_patients: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medfusion.report.pdf

    patients, _ = two_patients
    out = tmp_path / "out"
    pid, qc = _run_with_a_broken_writer(
        patients, out, monkeypatch, medfusion.report.pdf, "write_report", OSError("font cache unavailable")
    )
    d = out / pid
    assert not (d / "error.json").exists() and not (d / "report.pdf").exists()
    for name in ("segmentation.nii.gz", "segmentation.dcm", "scores.json", "qc.json"):
        assert (d / name).exists(), name
    assert qc["outputs"]["failed"] == {"report.pdf": "OSError: font cache unavailable"}
    assert "segmentation.dcm" in qc["outputs"]["written"]
    assert list(csv.DictReader(open(out / "summary.csv")))[0]["outputs_failed"] == "report.pdf"
    first = json.loads((out / "run.json").read_text())
    assert first["exit_code"] == 0 and len(first["sessions"]) == 1
    # a re-run into the same folder must say what it does with it; a patient there that another
    # model made (planted here) is kept, and said to be from another model, loudly and in run.json
    old = out / "OLD0001"
    old.mkdir()
    model = json.loads((d / "scores.json").read_text())["model"] | {"version": "0.0.1"}
    (old / "scores.json").write_text(json.dumps({"patient_id": "OLD0001", "model": model}))
    res = CliRunner().invoke(
        app, ["run", str(patients), "--out", str(out), "--device", "cpu", "--only", pid, "--overwrite", *FAST]
    )
    assert res.exit_code == 0, res.output
    assert "1 patient(s) in" in res.output and "OLD0001 (model version ('0.0.1' →" in res.output, res.output
    run = json.loads((out / "run.json").read_text())
    assert list(run["from_another_model_or_config"]) == ["OLD0001"]
    # the folder's history: first session kept, exit codes 0
    assert run["started"] == first["started"] and len(run["sessions"]) == 2
    assert run["exit_code"] == 0 and [s["exit_code"] for s in run["sessions"]] == [0, 0]


def test_a_failing_sr_costs_only_the_sr(
    two_patients: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medfusion.io.sr

    out = tmp_path / "out"
    pid, qc = _run_with_a_broken_writer(
        two_patients[0],
        out,
        monkeypatch,
        medfusion.io.sr,
        "write_dicom_sr",
        ValueError("no code for this concept"),
    )
    assert qc["outputs"]["failed"] == {"segmentation_sr.dcm": "no code for this concept"}
    assert not (out / pid / "segmentation_sr.dcm").exists()
    for name in ("segmentation.dcm", "report.pdf", "report.dcm", "scores.json"):
        assert (out / pid / name).exists(), name


@pytest.mark.slow
def test_a_dead_dask_worker_costs_a_retry_not_the_cohort(
    two_patients: tuple[Path, Path], tmp_path: Path
) -> None:
    import psutil

    patients, ref = two_patients
    out = tmp_path / "out"
    proc = _start(patients, out, "--workers", "2")
    _wait_for_work(out, proc)  # a worker is inside a patient
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "python" in c.name()]
    assert workers, "no worker process found"
    pids = [w.pid for w in workers]
    busy = max(workers, key=lambda w: w.cpu_percent(interval=0.5))
    busy.kill()
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    assert not list(out.glob("*/error.json")) and (out / "failures.jsonl").read_text() == ""
    _assert_same_outputs(out, ref)

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    time.sleep(2)
    assert not [p for p in pids if alive(p)]  # the cluster was closed: no worker outlives the run
