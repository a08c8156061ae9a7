"""Ingestion: Volume geometry, NIfTI and DICOM round trips, pydicom's own test files, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.io.case import load_case
from medfusion.io.dicom import read_dicom_volume, scan_folder
from medfusion.io.errors import InputError
from medfusion.io.nifti import read_nifti, write_nifti
from medfusion.io.volume import Volume
from medfusion.synth.export import study_info, write_series
from medfusion.synth.generate import rotation_matrix


def _oblique(shape: tuple[int, int, int] = (7, 9, 11), seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(
        rng.normal(size=shape).astype(np.float32),
        spacing=(0.7, 1.3, 2.5),
        origin=(-12.5, 40.25, 7.0),
        direction=rotation_matrix(np.array([10.0, -5.0, 20.0])),
        modality="MR",
    )


def _write_dicom(
    vol: Volume, folder: Path, modality: str = "CT", series: int = 2, seed: int = 0
) -> list[Path]:
    rng = np.random.default_rng(seed)
    study = study_info("TEST01", "female", 50, seed, rng)
    stored = np.clip(np.round(vol.array + (1024 if modality == "CT" else 0)), 0, 4095).astype(np.uint16)
    return write_series(
        vol,
        stored,
        folder,
        study,
        rng,
        modality=modality,
        series_number=series,
        description=f"{modality} test",
        intercept=-1024 if modality == "CT" else 0,
    )


# --- Volume ---


def test_volume_sitk_round_trip_is_exact() -> None:
    v = _oblique()
    back = Volume.from_sitk(v.to_sitk(), "MR")
    assert np.array_equal(back.array, v.array)
    assert back.same_grid(v, tol=1e-12)


def test_index_world_inverse() -> None:
    v = _oblique()
    ijk = np.array([[0, 0, 0], [3.5, 2, 1], [10, 8, 6]], float)
    assert np.allclose(v.world_to_index(v.index_to_world(ijk)), ijk)
    # agrees with SimpleITK's own mapping
    img = v.to_sitk()
    assert np.allclose(v.index_to_world(ijk)[1], img.TransformContinuousIndexToPhysicalPoint((3.5, 2.0, 1.0)))


def test_nifti_round_trip_oblique(tmp_path: Path) -> None:
    v = _oblique()
    p = write_nifti(v, tmp_path / "mr_test.nii.gz")
    back = read_nifti(p)
    assert back.modality == "MR"
    assert np.allclose(back.array, v.array)
    assert np.allclose(back.affine, v.affine, atol=1e-5)


def test_nifti_is_ras_on_disk(tmp_path: Path) -> None:
    import nibabel as nib

    v = Volume(np.zeros((2, 3, 4), np.float32), origin=(10.0, 20.0, 30.0))
    p = write_nifti(v, tmp_path / "ct.nii.gz")
    aff = nib.load(str(p)).affine
    assert np.allclose(aff[:3, 3], [-10.0, -20.0, 30.0])  # LPS → RAS flips x and y
    assert nib.load(str(p)).shape == (4, 3, 2)  # i, j, k on disk


def test_dicom_to_nifti_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    src = Volume(
        np.round(rng.uniform(-1000, 2000, (6, 10, 12))).astype(np.float32),
        (0.8, 0.9, 1.5),
        (-3.0, 4.0, 5.0),
        rotation_matrix(np.array([0.0, 0.0, 12.0])),
        "CT",
    )
    _write_dicom(src, tmp_path / "dcm")
    scan = scan_folder(tmp_path / "dcm")
    assert len(scan.series) == 1 and not scan.errors
    case = load_case(tmp_path / "dcm")
    assert case.ct is not None
    assert np.array_equal(case.ct.array.astype(np.float32), src.array)
    assert np.allclose(case.ct.affine, src.affine, atol=1e-5)
    back = read_nifti(write_nifti(case.ct, tmp_path / "ct.nii.gz"))
    assert np.array_equal(back.array, case.ct.array)
    assert np.allclose(back.affine, src.affine, atol=1e-5)


# --- pydicom's own test files ---


def _pydicom_ct_mr_files() -> list[Path]:
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    out = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:
            continue
        if ds.get("Modality") in ("CT", "MR") and "Rows" in ds:
            out.append(p)
    return out


@pytest.mark.parametrize("path", _pydicom_ct_mr_files(), ids=lambda p: p.name)
def test_pydicom_test_files_match_pixel_array(path: Path) -> None:
    ds = pydicom.dcmread(path)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom itself cannot decode it: we must give a clear InputError
        with pytest.raises(InputError, match=path.name):
            read_dicom_volume(path)
        pytest.skip(f"pydicom cannot decode either: {exc}")
    vol = read_dicom_volume(path)
    expected = arr.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0
    )
    if "PerFrameFunctionalGroupsSequence" in ds:
        assert sorted(vol.array.astype(np.float64).ravel()) == pytest.approx(
            sorted(np.asarray(expected).ravel())
        )
    else:
        assert np.allclose(vol.array[0].astype(np.float64), expected)


# --- Bad input ---


def _good_series(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    v = Volume(rng.uniform(-100, 100, (5, 8, 8)).round().astype(np.float32), (1.0, 1.0, 2.0), modality="CT")
    _write_dicom(v, tmp_path / "p" / "CT")
    return tmp_path / "p"


def test_bad_files_are_reported_and_the_rest_loads(tmp_path: Path) -> None:
    folder = _good_series(tmp_path)
    first = sorted((folder / "CT").iterdir())[0]
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "text.dcm").write_text("this is not DICOM at all\n" * 20)
    data = first.read_bytes()
    (folder / "truncated").write_bytes(data[: len(data) - 60])
    huge = pydicom.dcmread(first)
    huge.Rows = 60000
    huge.Columns = 60000
    huge.NumberOfFrames = 50
    huge.SeriesInstanceUID = "1.2.3.4.999"
    huge.save_as(folder / "huge.dcm")
    case = load_case(folder)
    assert case.ct is not None and case.ct.shape == (5, 8, 8)
    msgs = {Path(e.path).name: e.problem for e in case.errors}
    assert "zero-byte" in msgs["empty.dcm"]
    assert "not a readable DICOM" in msgs["text.dcm"] or "not a DICOM" in msgs["text.dcm"]
    assert "truncated" in msgs["truncated"]
    assert "refused before allocation" in msgs["huge.dcm"]
    assert all("\n" not in str(e) for e in case.errors)


def test_single_slice_and_conflicting_geometry(tmp_path: Path) -> None:
    folder = _good_series(tmp_path)
    files = sorted((folder / "CT").iterdir())
    lone = pydicom.dcmread(files[0])
    lone.SeriesInstanceUID = "1.2.3.4.5"
    lone.save_as(folder / "lone.dcm")
    dup = pydicom.dcmread(files[1])
    dup.SOPInstanceUID = "1.2.3.4.6"
    dup.ImagePositionPatient = pydicom.dcmread(files[2]).ImagePositionPatient
    dup.save_as(folder / "CT" / "conflict")
    case = load_case(folder)
    problems = " | ".join(str(e) for e in case.errors)
    assert "single slice" in problems or "1 slice" in problems
    assert "share one position" in problems


def test_non_image_objects_are_skipped(tmp_path: Path) -> None:
    folder = _good_series(tmp_path)
    sr = pydicom.dcmread(sorted((folder / "CT").iterdir())[0], stop_before_pixels=True)
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.SeriesInstanceUID = "1.2.3.77"
    for tag in ("Rows", "Columns"):
        del sr[tag]
    sr.save_as(folder / "report_sr")
    case = load_case(folder)
    assert [w for _, w in case.skipped] == ["Enhanced SR"]
    assert case.ct is not None and not case.errors


# --- Folder inspection ---


def test_inspect_three_series_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    folder = tmp_path / "patient"
    ct_values = rng.uniform(-50, 50, (8, 16, 16)).round().astype(np.float32)
    ct_values[:, :3, :] = -1000.0  # air in front of the head: a plausible CT
    ct = Volume(ct_values, (1.0, 1.0, 2.0), modality="CT")
    mr = Volume(
        rng.uniform(0, 500, (6, 12, 12)).round().astype(np.float32),
        (1.5, 1.5, 3.0),
        origin=(1.0, 2.0, 3.0),
        modality="MR",
    )
    _write_dicom(ct, folder / "a", "CT", 2)
    _write_dicom(mr, folder / "b", "MR", 5)
    paths = _write_dicom(mr, folder / "c", "MR", 6, seed=5)
    (folder / "note.txt").write_text("Headache for two weeks. No history of malignancy.\n")
    paths[3].unlink()  # a missing slice in the third series; its files are named at random (shuffled order)
    res = CliRunner().invoke(app, ["inspect", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)[0]
    series = sorted(rec["series"], key=lambda s: (s["modality"], s["series_description"]))
    assert [s["modality"] for s in series] == ["CT", "MR", "MR"]
    assert series[0]["size"] == [16, 16, 8] and not series[0]["warnings"]
    assert series[1]["size"] == [12, 12, 6] and not series[1]["warnings"]
    assert series[2]["size"] == [12, 12, 6]
    assert "1 missing slice" in series[2]["warnings"][0]
    assert rec["verdict"] == "usable, with warnings"


def test_nifti_modality_rules(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    v = _oblique()
    write_nifti(v.with_array(v.array, "CT"), folder / "ct_head.nii.gz")
    write_nifti(v, folder / "scan2.nii.gz")
    case = load_case(folder)
    assert case.ct is not None and not case.mr
    assert "cannot tell the modality" in str(case.errors[0]) and "scan2.nii.gz" in str(case.errors[0])
    (folder / "scan2.json").write_text(json.dumps({"Modality": "MR"}))
    assert len(load_case(folder).mr) == 1
    shutil.move(folder / "scan2.json", tmp_path / "x.json")
    assert len(load_case(folder, modality_map={"scan2": "MR"}).mr) == 1


# --- labels.csv ---


def test_labels_table_reads_rows_and_refuses_in_one_line(tmp_path: Path) -> None:
    from medfusion.io.labels_csv import labels_csv_path, read_labels_table

    assert labels_csv_path(tmp_path) == tmp_path / "labels.csv"
    assert labels_csv_path(tmp_path / "mine.csv") == tmp_path / "mine.csv"
    with pytest.raises(InputError, match="labels CSV not found") as missing:
        read_labels_table(tmp_path / "labels.csv")
    assert "labels.csv" in str(missing.value) and "\n" not in str(missing.value)
    (tmp_path / "labels.csv").write_text("patient_id,malignant\nP1,1\nP2,0\n")
    rows, fields = read_labels_table(labels_csv_path(tmp_path))
    assert fields == ["patient_id", "malignant"] and [r["malignant"] for r in rows] == ["1", "0"]
    (tmp_path / "bad.csv").write_text("id,malignant\nP1,1\n")
    with pytest.raises(InputError, match="needs a patient_id column"):
        read_labels_table(tmp_path / "bad.csv")
