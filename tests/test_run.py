"""`medfusion run` end to end with the shipped model: outputs, geometry, DICOM SEG, PDF, failures, resume."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from pypdf import PdfReader
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.config import PipelineConfig, PreprocessConfig, RegistrationConfig
from medfusion.io.case import load_case
from medfusion.io.docpdf import read_encapsulated_pdf
from medfusion.io.nifti import read_nifti
from medfusion.io.seg import read_dicom_seg
from medfusion.measure.features import FEATURES as MEASURE_FEATURES


@pytest.fixture(scope="module")
def run_out(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    tmp = tmp_path_factory.mktemp("run")
    patients = tmp / "patients"
    shutil.copytree(cohort / "patients", patients)
    bad = patients / "BROKEN01"
    bad.mkdir()
    (bad / "slice1.dcm").write_bytes(b"\x00" * 300)
    (bad / "note.txt").write_text("No history of malignancy.\n")
    out = tmp / "out"
    pipeline = tmp / "pipeline.yaml"  # the default pipeline, plus the probability maps
    default = (Path(__file__).parents[1] / "pipelines" / "default.yaml").read_text()
    pipeline.write_text(default.replace("probabilities: false", "probabilities: true"))
    args = ["run", str(patients), "--out", str(out), "--device", "cpu", "--pipeline", str(pipeline)]
    res = CliRunner().invoke(app, args)
    return patients, out, res


def test_run_writes_everything_and_reports_the_failure(run_out: tuple) -> None:
    patients, out, res = run_out
    assert res.exit_code == 1, res.output  # one patient failed
    err = json.loads((out / "BROKEN01" / "error.json").read_text())
    assert "no usable CT" in err["error"] and "BROKEN01" in err["error"]
    # the console's line names the folder and the problem on one line (no wrapping at 80 columns in logs)
    assert any("BROKEN01" in line and "no usable CT" in line for line in res.output.splitlines()), res.output
    rows = {r["patient_id"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows["BROKEN01"]["status"] == "failed"
    good = [p for p in rows if p != "BROKEN01"]
    assert len(good) == 3 and all(rows[p]["status"] == "ok" for p in good)
    for p in good:  # the table says what each report's verdict says
        decision = json.loads((out / p / "scores.json").read_text())["decision"]["malignant"]
        assert rows[p]["decision_malignant"] == decision
    run = json.loads((out / "run.json").read_text())
    assert run["failures"][0]["patient_id"] == "BROKEN01" and run["config"]["name"] == "default"
    assert run["devices_used"] == ["cpu"] and run["exit_code"] == 1  # as the command's
    # run.json names the model as each patient's scores.json does, and more (the domain guard's hash)
    described = json.loads((out / good[0] / "scores.json").read_text())["model"]
    assert {k: run["model"][k] for k in described} == described and run["model"]["domain_sha256"]
    for pid in good:
        for name in ("segmentation.nii.gz", "segmentation.json", "scores.json", "qc.json", "report.pdf"):
            assert (out / pid / name).exists(), (pid, name)
        scores = json.loads((out / pid / "scores.json").read_text())
        assert 0 <= scores["probabilities"]["malignant"] <= 1 and "malignant" in scores["uncertainty"]
        assert scores["inference"] == {"device": "cpu", "amp": False, "windows_per_call": 2}
        # the shipped model's diagnosis reads the label map's measurements and reports them
        assert list(scores["score_features"]) == list(MEASURE_FEATURES)
        assert scores["score_features"]["lesion_present"] == float(scores["measurements"]["lesion_count"] > 0)
        assert scores["model"]["name"] and set(scores["measurements"]["volumes_ml"]) == {
            "tumour_core",
            "oedema",
            "calcification",
        }
        # registered with this version's settings (not the package's stored ones), and says so
        reg = json.loads((out / pid / "qc.json").read_text())["registration"]
        assert reg["settings_from"] == "library"
        assert reg["settings"] == RegistrationConfig().model_dump(mode="json")
    assert not list(out.glob(".tmp-*"))


def test_outputs_are_in_the_ct_geometry_and_seg_matches(run_out: tuple) -> None:
    patients, out, _ = run_out
    pid = sorted(p.name for p in patients.iterdir() if p.name != "BROKEN01")[0]
    ct = load_case(patients / pid).ct
    seg = read_nifti(out / pid / "segmentation.nii.gz")
    assert seg.shape == ct.shape and np.allclose(seg.affine, ct.affine, atol=1e-4)
    ds = hd.seg.segread(str(out / pid / "segmentation.dcm"))
    assert ds.SegmentationType == "BINARY"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.meta["series_uid"]
    if seg.array.any():
        back = read_dicom_seg(out / pid / "segmentation.dcm").resample_to(ct)
        assert np.array_equal(back.array, seg.array)
    # the DICOM CT also gets the SR (one volumetric group per lesion) and the report as DICOM PDF
    sr = hd.sr.srread(str(out / pid / "segmentation_sr.dcm"))
    lesions = json.loads((out / pid / "scores.json").read_text())["measurements"]["lesions"]
    assert len(sr.content.get_volumetric_roi_measurement_groups()) == len(lesions)
    assert read_encapsulated_pdf(out / pid / "report.dcm") == (out / pid / "report.pdf").read_bytes()


def test_probability_maps_are_the_label_maps_source(run_out: tuple) -> None:
    patients, out, _ = run_out
    pid = sorted(p.name for p in patients.iterdir() if p.name != "BROKEN01")[0]
    ct = load_case(patients / pid).ct
    img = nib.load(out / pid / "probabilities.nii.gz")
    seg = nib.load(out / pid / "segmentation.nii.gz")
    assert img.shape == (*seg.shape, 4) and img.get_data_dtype() == np.uint8
    assert np.allclose(img.affine, seg.affine, atol=1e-4)
    assert img.header["descrip"].tobytes().decode().rstrip("\x00").endswith("oedema,calcification")
    assert img.dataobj.slope == pytest.approx(1 / 255)  # nibabel moves the header's scaling here
    p = np.asarray(img.dataobj, dtype=np.float32)
    assert np.abs(p.sum(-1) - 1).max() < 4 / 255 + 1e-6  # each class rounded to 1/255
    labels = np.asarray(seg.dataobj)
    kept = labels > 0  # the clean-up only ever sets voxels to background
    agree = np.mean(p.argmax(-1)[kept] == labels[kept]) if kept.any() else 1.0
    assert agree > 0.99, agree  # argmax of the stored (rounded) probabilities is the label map
    assert ct.shape[::-1] == seg.shape


def test_pdf_has_pages_and_scores(run_out: tuple) -> None:
    patients, out, _ = run_out
    pid = sorted(p.name for p in patients.iterdir() if p.name != "BROKEN01")[0]
    reader = PdfReader(str(out / pid / "report.pdf"))
    assert len(reader.pages) >= 2
    text = " ".join(p.extract_text() for p in reader.pages)
    p = json.loads((out / pid / "scores.json").read_text())["probabilities"]["malignant"]
    assert f"{p:.2f}" in text and pid in text and "RESEARCH USE ONLY" in text


def test_resume_does_no_work(run_out: tuple) -> None:
    patients, out, _ = run_out
    shutil.rmtree(patients / "BROKEN01")
    shutil.rmtree(out / "BROKEN01")
    before = {p: (out / p / "scores.json").stat().st_mtime_ns for p in [d.name for d in patients.iterdir()]}
    pipeline = patients.parent / "pipeline.yaml"  # the fixture's: another one is refused (#28)
    args = [
        "run",
        str(patients),
        "--out",
        str(out),
        "--resume",
        "--device",
        "cpu",
        "--pipeline",
        str(pipeline),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run.json").read_text())
    assert run["processed"] == 0 and len(run["resumed"]) == 3
    assert before == {p: (out / p / "scores.json").stat().st_mtime_ns for p in before}
    # the history of the folder: the first session's start, both sessions, exit codes as the commands'
    first, again = run["sessions"]
    assert run["started"] == first["started"] and run["finished"] == again["finished"]
    assert (first["exit_code"], again["exit_code"], run["exit_code"]) == (1, 0, 0)
    assert run["seconds_total"] >= first["seconds"] and again["resumed"] == 3


@pytest.mark.slow
def test_dask_workers_give_the_same_scores(run_out: tuple, tmp_path: Path) -> None:
    patients, out, _ = run_out
    good = sorted(d.name for d in patients.iterdir() if d.name != "BROKEN01")
    args = [
        "run",
        str(patients),
        "--out",
        str(tmp_path / "dask"),
        "--workers",
        "2",
        "--device",
        "cpu",
        "--only",
        ",".join(good),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    for pid in good:  # the workers run torch on the serial run's thread count: the same numbers
        a = json.loads((out / pid / "scores.json").read_text())
        b = json.loads((tmp_path / "dask" / pid / "scores.json").read_text())
        assert a["probabilities"] == b["probabilities"] and a["uncertainty"] == b["uncertainty"]
        assert a["model"] == b["model"]
    serial, dask = (json.loads((d / "run.json").read_text()) for d in (out, tmp_path / "dask"))
    assert serial["model"] == dask["model"]
    assert dask["sessions"][-1]["torch_threads"] == serial["sessions"][0]["torch_threads"]


def test_lesions_without_a_tumour_core_are_dropped() -> None:
    import numpy as np

    from medfusion.infer.postprocess import drop_lesions_without_core, postprocess_labels

    lab = np.zeros((20, 20, 20), np.uint8)
    lab[4:10, 4:10, 4:10] = 2  # oedema around
    lab[6:8, 6:8, 6:8] = 1  # a core
    lab[7, 7, 7] = 3  # with a calcification inside
    lab[15:17, 15:17, 15:17] = 2  # an oedema island with no core
    lab[1, 18, 1] = 3  # a lone calcification voxel
    out, removed = drop_lesions_without_core(lab, core=1)
    assert removed == 8 + 1
    assert (out[4:10, 4:10, 4:10] == lab[4:10, 4:10, 4:10]).all() and out[15:, 15:, 15:].max() == 0
    assert out[1, 18, 1] == 0 and out.dtype == lab.dtype and lab[1, 18, 1] == 3  # input untouched
    names = ["background", "tumour_core", "oedema", "calcification"]
    assert (postprocess_labels(lab, names, lesions_need_core=False) == lab).all()
    assert (postprocess_labels(lab, ["background", "organ"], lesions_need_core=True) == lab).all()
    empty = np.zeros((4, 4, 4), np.uint8)
    assert drop_lesions_without_core(empty)[1] == 0


def test_run_registration_settings_come_from_where_the_pipeline_says() -> None:
    from medfusion.package import DEFAULT_PACKAGE, preprocess_config, read_meta
    from medfusion.run.pipeline import run_preprocess_config

    meta = read_meta(DEFAULT_PACKAGE)
    stored = preprocess_config(meta)
    assert stored.registration != RegistrationConfig(consistency_check=True)  # else this test shows nothing
    lib = run_preprocess_config(PipelineConfig(), meta)
    assert lib.registration == RegistrationConfig()  # library defaults, consistency check on
    assert lib.model_dump(exclude={"registration"}) == stored.model_dump(exclude={"registration"})
    pkg = run_preprocess_config(
        PipelineConfig(registration="package", registration_consistency_check=False), meta
    )
    assert pkg.registration == stored.registration.model_copy(update={"consistency_check": False})
    # the package's mode (and transform file) survive the switch to library settings
    skipped = {**meta, "preprocess": {**meta["preprocess"], "registration": {"mode": "skip"}}}
    assert run_preprocess_config(PipelineConfig(), skipped).registration.mode == "skip"
    # a pipeline's own preprocessing is used as given
    own = PreprocessConfig(registration=RegistrationConfig(candidates=5))
    got = run_preprocess_config(PipelineConfig(preprocess=own, registration="package"), meta)
    assert got.registration.candidates == 5 and got.target_size == own.target_size
    with pytest.raises(ValueError, match="registration"):
        PipelineConfig.model_validate({"registration": "elastix"})


def test_dicom_seg_of_an_empty_map_is_written_quietly_and_reads_back_empty(
    cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from medfusion.io.seg import write_dicom_seg

    ct = load_case(cohort / "patients" / sorted(p.name for p in (cohort / "patients").iterdir())[0]).ct
    empty = ct.with_array(np.zeros(ct.shape, np.int16), "SEG")
    with caplog.at_level("WARNING"):  # highdicom logged a warning per lesion-free patient before
        write_dicom_seg(
            empty, ct, ["background", "tumour_core"], tmp_path / "seg.dcm", model_name="m", model_version="1"
        )
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
    ds = hd.seg.segread(str(tmp_path / "seg.dcm"))
    assert int(ds.NumberOfFrames) == ct.shape[0]
    assert not read_dicom_seg(tmp_path / "seg.dcm").array.any()


def test_cohort_workers_spread_over_gpus() -> None:
    from medfusion.run.cohort import worker_device

    assert [worker_device("auto", i, 2) for i in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert worker_device("cuda", "3", 4) == "cuda:3"
    assert worker_device("auto", 5, 1) == "auto" and worker_device("auto", 5, 0) == "auto"
    assert worker_device("cpu", 1, 8) == "cpu" and worker_device("cuda:2", 1, 8) == "cuda:2"
    named = worker_device("auto", "tcp://10.0.0.1:4242", 3)  # a worker of another cluster: by its name
    assert named == worker_device("auto", "tcp://10.0.0.1:4242", 3) and named.startswith("cuda:")


def test_summary_columns_do_not_depend_on_which_patient_comes_first(tmp_path: Path) -> None:
    import csv

    from medfusion.run.cohort import _write_summary

    failed = {"patient_id": "A", "status": "failed", "qc_verdict": "", "error": "x", "stage": "load"}
    flagged = {"patient_id": "B", "status": "ok", "qc_verdict": "pass", "p_malignant": 0.9}
    flagged |= {"in_domain": False, "pred_malignant": "", "decision_malignant": "not assessed"}
    scored = {
        **flagged,
        "patient_id": "C",
        "in_domain": True,
        "pred_malignant": 1,
        "decision_malignant": "positive",
    }
    headers = []
    for order in ([failed, flagged, scored], [scored, failed, flagged], [flagged, scored, failed]):
        _write_summary(tmp_path / "s.csv", order)
        headers.append(next(csv.reader(open(tmp_path / "s.csv"))))
    assert headers[0] == headers[1] == headers[2]
    assert headers[0][:7] == [
        "patient_id",
        "status",
        "qc_verdict",
        "p_malignant",
        "in_domain",
        "pred_malignant",
        "decision_malignant",
    ]
