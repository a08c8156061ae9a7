"""The reported DICOM/NIfTI faults of `../shared/field-cases/`: each case loaded and the right value asserted.

The generators live outside the project (they write small made-up patients); the tests skip with a
reason when that folder is not beside the checkout. Members of each kind that no case covers are
tested on data generated here, in tests/test_ingestion.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from medfusion.io.case import Case, load_case


def _field_cases() -> Path | None:
    here = Path(__file__).resolve().parents[1]
    for candidate in (os.environ.get("MEDFUSION_SHARED"), here.parent / "shared", Path("/work/shared")):
        if candidate and (Path(candidate) / "field-cases" / "common.py").exists():
            return Path(candidate) / "field-cases"
    return None


FIELD = _field_cases()
pytestmark = pytest.mark.skipif(FIELD is None, reason="../shared/field-cases is not beside this checkout")

CT_SHAPE = (24, 64, 64)
CT_SPACING = (0.9, 0.9, 2.5)
CT_ORIGIN = (-28.35, -28.35, -30.0)


def _make(case: str, tmp_path: Path) -> tuple[Case, dict, Path]:
    assert FIELD is not None
    gen = next(FIELD.glob(f"{case}_*.py"))
    folder = tmp_path / f"P{case}"
    res = subprocess.run(
        [sys.executable, str(gen), str(folder)], cwd=FIELD, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    truth = json.loads(res.stdout.strip().splitlines()[-1])
    return load_case(folder), truth, folder


def _plain_ct(case: Case) -> None:
    assert case.ct is not None
    assert case.ct.shape == CT_SHAPE
    assert np.allclose(case.ct.spacing, CT_SPACING, atol=1e-4)
    assert np.allclose(case.ct.origin, CT_ORIGIN, atol=1e-3)
    assert case.ct.orientation_code() == "LPS"


def test_00_control_is_clean(tmp_path: Path) -> None:
    case, _, _ = _make("00", tmp_path)
    _plain_ct(case)
    assert case.primary_mr is not None and case.verdict() == "ok"


def test_01_dicomdir_is_an_index_not_an_unreadable_file(tmp_path: Path) -> None:
    case, _, _ = _make("01", tmp_path)
    _plain_ct(case)
    assert not case.errors
    assert [(Path(p).name, why) for p, why in case.skipped] == [
        ("DICOMDIR", "DICOMDIR index (Media Storage Directory)")
    ]
    assert case.verdict() == "ok"


def test_02_exact_duplicates_are_dropped_with_a_warning(tmp_path: Path) -> None:
    case, _, _ = _make("02", tmp_path)
    _plain_ct(case)
    assert case.ct is not None
    assert any("24 exact duplicate" in w for w in case.ct.warnings)
    assert len(case.skipped) == 24 and not case.errors


def test_03_localizer_is_left_out_with_a_note(tmp_path: Path) -> None:
    case, _, _ = _make("03", tmp_path)
    _plain_ct(case)
    assert [why for _, why in case.skipped] == ["localizer (ImageType LOCALIZER), left out of the series"]
    assert any("localizer" in c for c in case.choices)


def test_05_gantry_tilt_is_resampled_onto_an_orthogonal_grid(tmp_path: Path) -> None:
    case, truth, folder = _make("05", tmp_path)
    ct = case.ct
    assert ct is not None and not case.errors
    assert any("gantry tilt 15.0°" in w for w in ct.warnings)
    # an orthogonal grid: the tilted image plane and its normal (no shear left)
    assert np.allclose(ct.direction.T @ ct.direction, np.eye(3), atol=1e-9)
    # the skull's centre, in millimetres, is where the tilted geometry put it
    files = sorted((folder / "CT").iterdir())
    first, last = pydicom.dcmread(files[0]), pydicom.dcmread(files[-1])
    row = np.array(first.ImageOrientationPatient[:3], float)
    col = np.array(first.ImageOrientationPatient[3:], float)
    p0, p1 = np.array(first.ImagePositionPatient, float), np.array(last.ImagePositionPatient, float)
    centre = (p0 + p1) / 2 + 31.5 * 0.9 * row + 31.5 * 0.9 * col
    k, j, i = np.nonzero(ct.array > 500)
    seen = ct.index_to_world(np.stack([i, j, k], axis=1).mean(axis=0))[0]
    assert np.linalg.norm(seen - centre) < 0.6, (seen, centre)


def test_07_unused_high_bits_are_masked_as_pydicom_does(tmp_path: Path) -> None:
    case, _, folder = _make("07", tmp_path)
    ct = case.ct
    assert ct is not None
    assert np.all(ct.array[:, 2:4, 2:8] == -1000)  # air in the overlay box's corner, not 3096
    assert int(ct.array.max()) == 1200  # the skull; no overlay bit survives anywhere
    for k, path in enumerate(sorted((folder / "CT").iterdir())):
        ds = pydicom.dcmread(path)
        assert np.array_equal(ct.array[k], ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept))


def test_09_decimal_comma_in_pixel_spacing_is_read_with_a_warning(tmp_path: Path) -> None:
    case, _, _ = _make("09", tmp_path)
    _plain_ct(case)
    assert case.ct is not None
    assert any("PixelSpacing '0,9\\0,9'" in w and "decimal comma" in w for w in case.ct.warnings)


def test_10_zero_pixel_spacing_refuses_that_series_only(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medfusion.cli import app

    case, _, folder = _make("10", tmp_path)
    _plain_ct(case)
    assert case.mr == []
    assert len(case.errors) == 1
    err = case.errors[0]
    assert "/MR/" in err.path and "PixelSpacing '0\\0' is not positive" in err.problem
    res = CliRunner().invoke(app, ["inspect", str(folder), "--json"])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    assert "Traceback" not in res.output


def test_12_nan_background_is_replaced_and_reported(tmp_path: Path) -> None:
    case, truth, _ = _make("12", tmp_path)
    mr = case.primary_mr
    assert mr is not None
    assert np.isfinite(mr.array).all()
    n_nan = int(round(truth["nan_fraction"] * mr.array.size))
    assert any(w.startswith(f"{n_nan} NaN/Inf voxel(s)") for w in mr.warnings), mr.warnings
    assert float(mr.array.min()) == 0.0  # NaN marked the background: 0, not the scalp's 150
    assert float(np.mean(mr.array == 0.0)) == pytest.approx(truth["nan_fraction"])


def test_14_nifti_without_transform_is_warned_about(tmp_path: Path) -> None:
    case, _, _ = _make("14", tmp_path)
    mr = case.primary_mr
    assert mr is not None
    assert any("no spatial transform" in w for w in mr.warnings)
    assert case.verdict() == "usable, with warnings"


def test_15_deidentified_ct_loads(tmp_path: Path) -> None:
    case, _, _ = _make("15", tmp_path)
    _plain_ct(case)
    assert case.verdict() == "ok"


def _seg_round_trip(case: Case, tmp_path: Path) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """Write a two-class label map on the CT's grid as a DICOM SEG, read it back; the notes and each
    class's centroid (LPS mm) before and after."""
    import shutil

    from medfusion.io.seg import read_dicom_seg, write_dicom_seg
    from medfusion.io.volume import LabelMap

    ct = case.ct
    assert ct is not None
    a = np.zeros(ct.array.shape, np.uint8)
    a[ct.array.shape[0] // 2, 20:30, 25:40] = 1
    a[3, 50:55, 10:12] = 2
    labels = LabelMap(a, ct.spacing, ct.origin, ct.direction)
    res = write_dicom_seg(
        labels,
        ct,
        ["background", "tumour_core", "oedema"],
        tmp_path / "seg.dcm",
        model_name="m",
        model_version="1",
    )
    assert res.path is not None, res.notes
    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", str(res.path)], capture_output=True, text=True, check=False)
        assert not [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
    back = read_dicom_seg(res.path)

    def centroid(v: LabelMap, k: int) -> np.ndarray:
        idx = np.argwhere(v.array == k)[:, ::-1].astype(float)
        return v.index_to_world(idx).mean(axis=0)

    return res.notes, [centroid(labels, k) for k in (1, 2)], [centroid(back, k) for k in (1, 2)]


@pytest.mark.parametrize("case", ["05", "09"])
def test_seg_is_written_for_a_corrected_grid(case: str, tmp_path: Path) -> None:
    """A SEG for a CT whose grid is not its instances' own (05: tilt resampled onto an orthogonal grid
    with more rows; 09: PixelSpacing with a decimal comma): written, dciodvfy-clean, each segment back at
    its place in millimetres, and a note saying what was done (until session 18 no SEG was written)."""
    loaded, _, _ = _make(case, tmp_path)
    notes, before, after = _seg_round_trip(loaded, tmp_path)
    for b, a in zip(before, after, strict=True):
        assert np.linalg.norm(b - a) < 1e-3, (b, a)
    expect = "corrected CT grid" if case == "05" else "PixelSpacing did not read as numbers"
    assert any(expect in n for n in notes), notes


def _rewrite(folder: Path, **raw: Any) -> None:
    """Rewrite the CT files of `folder` with raw decimal-string values (`raw`: keyword → bytes)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    for path in sorted((folder / "CT").iterdir()):
        ds = pydicom.dcmread(path)
        for keyword, value in raw.items():
            tag = Tag(tag_for_keyword(keyword))
            val = value(ds) if callable(value) else value
            val = val + b" " if len(val) % 2 else val
            ds[tag] = RawDataElement(tag, "DS", len(val), val, 0, False, True)
        ds.save_as(path)


@pytest.mark.parametrize("attr", ["SliceThickness", "ImagePositionPatient", "ImageOrientationPatient"])
def test_seg_is_written_with_a_decimal_comma_in_other_spatial_attributes(attr: str, tmp_path: Path) -> None:
    """Other members of case 09's kind (a decimal comma in a spatial decimal string that highdicom parses
    from the sources): the SEG is written, each segment at its place, and the note names the attribute."""
    _, _, folder = _make("00", tmp_path)

    def commas(ds: pydicom.Dataset) -> bytes:
        values = [f"{float(v):.2f}".replace(".", ",") for v in ds[attr].value] if ds[attr].VM > 1 else None
        return ("\\".join(values) if values else f"{float(ds[attr].value):.2f}".replace(".", ",")).encode()

    with _ignore_validation():
        _rewrite(folder, **{attr: commas})
    loaded = load_case(folder)
    assert loaded.ct is not None
    notes, before, after = _seg_round_trip(loaded, tmp_path)
    for b, a in zip(before, after, strict=True):
        assert np.linalg.norm(b - a) < 1e-3, (b, a)
    assert any(attr in n and "decimal comma" in n for n in notes), notes


def test_seg_of_a_series_resampled_along_z_is_on_the_grid(tmp_path: Path) -> None:
    """A series whose uneven slice steps the loader resamples along z onto an even spacing, with as many
    slices as instances: the instances lie off the grid's slices, so the SEG states the grid's own
    positions (before, its frames sat at the instances' positions, ≈ 1 mm off, without a note)."""
    _, _, folder = _make("00", tmp_path)
    files = sorted((folder / "CT").iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    with _ignore_validation():
        for k, path in enumerate(files):
            ds = pydicom.dcmread(path)
            z = CT_ORIGIN[2] + (2.5 * k if k < 11 else 2.5 * 10 + 2.6 * (k - 10))
            ds.ImagePositionPatient = [CT_ORIGIN[0], CT_ORIGIN[1], round(z, 3)]
            ds.save_as(path)
    loaded = load_case(folder)
    assert loaded.ct is not None and loaded.ct.shape[0] == len(files)
    notes, before, after = _seg_round_trip(loaded, tmp_path)
    for b, a in zip(before, after, strict=True):
        assert np.linalg.norm(b - a) < 1e-3, (b, a)
    assert any("corrected CT grid" in n for n in notes), notes


class _ignore_validation:
    """pydicom's writing validation off for the block (raw invalid DS values are the point here)."""

    def __enter__(self) -> None:
        self.old = pydicom.config.settings.writing_validation_mode
        pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE

    def __exit__(self, *exc: object) -> None:
        pydicom.config.settings.writing_validation_mode = self.old
