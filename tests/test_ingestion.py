"""Ingestion faults by kind (#23), on members that no handed field case covers, with data made here.

Kinds: recognising files, splitting series, pixel values (property-based against pydicom),
geometry, NIfTI voxel hygiene, and `load_case` on mutated headers (loads or refuses, never crashes).
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from medfusion.io.case import load_case
from medfusion.io.checks import value_warnings
from medfusion.io.dicom import looks_like_dicom, parse_decimal_string, read_dicom_volume
from medfusion.io.errors import InputError
from medfusion.io.nifti import read_nifti
from medfusion.io.volume import Volume

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _slice(
    pixels: np.ndarray,
    z: float,
    *,
    series: str,
    modality: str = "CT",
    row: tuple[float, float, float] = (1.0, 0.0, 0.0),
    col: tuple[float, float, float] = (0.0, 1.0, 0.0),
    origin: tuple[float, float] = (-10.0, -10.0),
    spacing: str = "1\\1",
    intercept: float = -1024.0,
) -> Dataset:
    """One uint16 slice at height `z` along the normal, with file meta (Explicit VR LE)."""
    ds = Dataset()
    ds.SOPClassUID = CT_STORAGE if modality == "CT" else MR_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = "ING01"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName, ds.StudyDate, ds.StudyTime, ds.StudyID = "ING^TEST", "20250102", "101500", "1"
    ds.AccessionNumber, ds.SeriesNumber, ds.InstanceNumber = "", 2, int(z * 10) + 1
    normal = np.cross(row, col)
    pos = origin[0] * np.asarray(row) + origin[1] * np.asarray(col) + z * normal
    ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
    ds.PixelSpacing = spacing.split("\\")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope = f"{intercept:g}", "1"
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _head(n: int = 6, size: int = 16) -> np.ndarray:
    """Stored CT values: air (24 = −1000 HU) around a block of soft tissue (1064 = 40 HU)."""
    a = np.full((n, size, size), 24, np.uint16)
    a[:, 4:-4, 4:-4] = 1064
    return a


def _series(folder: Path, stored: np.ndarray, step: float = 2.0, **kw: object) -> list[Dataset]:
    uid = str(kw.pop("series", generate_uid()))
    out = []
    for k in range(stored.shape[0]):
        ds = _slice(stored[k], k * step, series=uid, **kw)  # type: ignore[arg-type]
        out.append(ds)
    folder.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(out):
        ds.save_as(folder / f"IM{i:04d}_{ds.SOPInstanceUID[-6:]}", enforce_file_format=True)
    return out


# --- Kind 1: recognising files ---


def test_bare_streams_without_preamble_are_dicom(tmp_path: Path) -> None:
    """Part 10 without preamble (file meta first), and a bare implicit dataset that opens with a
    (0008,0000) group length, are read like any other file."""
    stored = _head()
    datasets = _series(tmp_path / "tmp", stored)
    folder = tmp_path / "p"
    folder.mkdir()
    for k, ds in enumerate(datasets):
        raw = (tmp_path / "tmp" / f"IM{k:04d}_{ds.SOPInstanceUID[-6:]}").read_bytes()
        if k % 2:
            (folder / f"s{k}").write_bytes(raw[132:])  # file meta first: no preamble, no 'DICM'
        else:
            bare = copy.deepcopy(ds)
            del bare.file_meta
            path = folder / f"s{k}"
            bare.save_as(path, implicit_vr=True, little_endian=True)
            body = path.read_bytes()
            path.write_bytes(struct.pack("<HHI", 0x0008, 0x0000, 4) + struct.pack("<I", 0) + body)
        assert looks_like_dicom(folder / f"s{k}")
    case = load_case(folder)
    assert not case.errors, case.errors
    assert case.ct is not None and case.ct.shape == stored.shape
    assert np.array_equal(case.ct.array, stored.astype(np.int16) - 1024)


def test_dicomdir_in_a_subfolder_and_non_image_objects_are_skipped(tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    datasets = _series(tmp_path / "src", _head())
    fs = FileSet()
    for k, ds in enumerate(datasets):
        fs.add(str(tmp_path / "src" / f"IM{k:04d}_{ds.SOPInstanceUID[-6:]}"))
    fs.write(str(tmp_path / "p" / "CD"))
    case = load_case(tmp_path / "p")
    assert not case.errors and case.ct is not None
    assert [why for _, why in case.skipped] == ["DICOMDIR index (Media Storage Directory)"]
    assert case.verdict() == "ok"


# --- Kind 2: splitting series ---


def test_two_echoes_in_one_series_become_two_volumes(tmp_path: Path) -> None:
    uid = generate_uid()
    stored = _head()
    echo1 = _series(tmp_path / "p" / "e1", stored, series=uid, modality="MR")
    echo2 = _series(tmp_path / "p" / "e2", stored // 2, series=uid, modality="MR")
    for datasets, echo, folder in ((echo1, 1, "e1"), (echo2, 2, "e2")):
        for k, ds in enumerate(datasets):
            ds.EchoNumbers = echo
            ds.EchoTime = 10 * echo
            ds.save_as(tmp_path / "p" / folder / f"IM{k:04d}_{ds.SOPInstanceUID[-6:]}")
    _series(tmp_path / "p" / "ct", _head())
    case = load_case(tmp_path / "p")
    assert not case.errors and len(case.mr) == 2
    assert sorted(m.meta["series_part"] for m in case.mr) == ["EchoNumbers 1", "EchoNumbers 2"]
    assert any("split into 2 volumes" in c for c in case.choices)
    assert {float(m.array.max()) for m in case.mr} == {1064.0, 532.0}


def test_two_sizes_in_one_series_split_and_the_larger_is_chosen(tmp_path: Path) -> None:
    uid = generate_uid()
    _series(tmp_path / "p" / "a", _head(6, 16), series=uid)
    _series(tmp_path / "p" / "b", _head(4, 12), series=uid)
    case = load_case(tmp_path / "p")
    assert not case.errors
    assert case.ct is not None and case.ct.shape == (6, 16, 16)
    assert len(case.candidates) == 2 and any("geometry" in c for c in case.choices)


def test_copies_under_new_uids_are_dropped_but_conflicts_are_refused(tmp_path: Path) -> None:
    uid = generate_uid()
    stored = _head()
    _series(tmp_path / "p" / "a", stored, series=uid)
    _series(tmp_path / "p" / "b", stored, series=uid)  # same pixels and positions, new SOPInstanceUIDs
    case = load_case(tmp_path / "p")
    assert case.ct is not None and case.ct.shape == stored.shape
    assert any("6 duplicate slice(s)" in w for w in case.ct.warnings)
    other = stored.copy()
    other[2] += 7
    _series(tmp_path / "q" / "a", stored, series=uid)
    _series(tmp_path / "q" / "b", other, series=uid)
    case = load_case(tmp_path / "q")
    assert case.ct is None
    assert any("share one position" in e.problem for e in case.errors)


# --- Kind 3: pixel values ---

_SYNTAX = {
    "ExplicitLE": ExplicitVRLittleEndian,
    "ImplicitLE": ImplicitVRLittleEndian,
    "ExplicitBE": ExplicitVRBigEndian,
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bits_allocated=st.sampled_from([8, 16, 32]),
    stored_gap=st.integers(0, 7),
    signed=st.booleans(),
    syntax=st.sampled_from(sorted(_SYNTAX)),
    seed=st.integers(0, 2**16),
)
def test_pixel_values_equal_pydicom_for_any_bit_layout(
    tmp_path: Path, bits_allocated: int, stored_gap: int, signed: bool, syntax: str, seed: int
) -> None:
    """Random bytes (unused high bits set at random) read exactly as pydicom's pixel_array."""
    bits_stored = max(1, bits_allocated - stored_gap * (2 if bits_allocated > 8 else 1))
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=6 * 7 * bits_allocated // 8, dtype=np.uint8).tobytes()
    ds = _slice(np.zeros((6, 7)), 0.0, series=generate_uid(), modality="MR")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = raw
    ds.file_meta.TransferSyntaxUID = _SYNTAX[syntax]
    if syntax == "ExplicitBE":  # PixelData is stored as written: words byte-swapped in the file
        ds.PixelData = (
            np.frombuffer(raw, f"<u{bits_allocated // 8}").astype(f">u{bits_allocated // 8}").tobytes()
        )
    path = tmp_path / f"px_{bits_allocated}_{bits_stored}_{int(signed)}_{syntax}_{seed}.dcm"
    ds.save_as(path, enforce_file_format=True)
    expected = pydicom.dcmread(path).pixel_array.astype(np.float64)
    got = read_dicom_volume(path).array[0].astype(np.float64)
    assert np.array_equal(got, expected)


def test_implausible_ct_values_are_warned_about() -> None:
    air = np.full((4, 16, 16), -1000, np.int16)
    air[:, 4:12, 4:12] = 40
    assert value_warnings(Volume(air, modality="CT")) == []
    no_intercept = Volume(air + 1024, modality="CT")  # RescaleIntercept lost: air at 24
    assert "no air near −1000 HU" in value_warnings(no_intercept)[0]
    as_unsigned = Volume(air.view(np.uint16).astype(np.float32), modality="CT")
    assert "signed data read as unsigned" in value_warnings(as_unsigned)[0]
    assert value_warnings(Volume(air + 1024, modality="MR")) == []


# --- Kind 4: geometry ---


def test_tilted_series_lands_where_its_positions_say(tmp_path: Path) -> None:
    """Values that are a linear function of the LPS position survive the tilt correction exactly
    (linear interpolation of a linear function), wherever the corrected grid puts a voxel."""
    tilt = np.radians(20.0)
    row, col = (1.0, 0.0, 0.0), (0.0, float(np.cos(tilt)), float(-np.sin(tilt)))
    normal = np.cross(row, col)
    n, size, spacing, step = 8, 24, 1.0, 2.0
    uid = generate_uid()
    folder = tmp_path / "p"
    folder.mkdir()

    def f(p: np.ndarray) -> np.ndarray:  # stored value at an LPS point
        return 1000.0 + 3.0 * p[..., 1] + 5.0 * p[..., 2]

    table = np.array([0.0, 0.0, step / float(np.dot(normal, (0.0, 0.0, 1.0)))])
    for k in range(n):
        origin = np.array([-12.0, -12.0, 0.0]) + k * table
        j, i = np.mgrid[0:size, 0:size]
        pts = origin + i[..., None] * spacing * np.asarray(row) + j[..., None] * spacing * np.asarray(col)
        ds = _slice(np.round(f(pts)), 0.0, series=uid, row=row, col=col, intercept=0.0)
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin]
        ds.BitsStored, ds.HighBit = 16, 15
        ds.save_as(folder / f"IM{k}", enforce_file_format=True)
    vol = load_case(folder).ct
    assert vol is not None and any("gantry tilt 20.0°" in w for w in vol.warnings)
    assert np.allclose(vol.direction.T @ vol.direction, np.eye(3))
    k, j, i = np.mgrid[1 : vol.shape[0] - 1, 0 : vol.shape[1], 0 : vol.shape[2]]
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)
    world = vol.index_to_world(ijk)
    values = vol.array[k.ravel(), j.ravel(), i.ravel()].astype(np.float64)
    # voxels that the acquired slice at their height covers (the rest hold the fill value)
    origins = np.array([-12.0, -12.0, 0.0]) + np.outer(np.arange(n), table)
    rel = world - origins[k.ravel()]
    u_in, v_in = rel @ np.asarray(row) / spacing, rel @ np.asarray(col) / spacing
    inside = (u_in >= 0) & (u_in <= size - 1) & (v_in >= 0) & (v_in <= size - 1)
    assert np.allclose(rel @ normal, 0.0, atol=1e-3)  # every voxel lies in its slice's plane
    assert inside.mean() > 0.5
    assert np.max(np.abs(values[inside] - f(world[inside]))) <= 1.0  # rounding to integers only


@pytest.mark.parametrize(
    ("text", "n", "expected", "repaired"),
    [
        ("0.5\\0.5", 2, [0.5, 0.5], False),
        ("0,9\\0,9", 2, [0.9, 0.9], True),
        ("0.58,0.58", 2, [0.58, 0.58], True),
        ("-12,5\\40\\7,25", 3, [-12.5, 40.0, 7.25], True),
        ("1,0,0,0,1,0", 6, [1, 0, 0, 0, 1, 0], True),
        (" 2.5 ", 1, [2.5], False),
    ],
)
def test_decimal_strings_forgive_locale_commas(
    text: str, n: int, expected: list[float], repaired: bool
) -> None:
    values, warning = parse_decimal_string(text, n, "PixelSpacing")
    assert np.allclose(values, expected)
    assert (warning is not None) == repaired


@pytest.mark.parametrize("text", ["0,9", "nan\\nan", "abc\\1", "1\\2\\3"])
def test_malformed_decimal_strings_are_refused_with_the_value(text: str) -> None:
    with pytest.raises(ValueError, match="PixelSpacing"):
        parse_decimal_string(text, 2, "PixelSpacing")


@pytest.mark.parametrize("spacing", ["-1\\-1", "nan\\nan", "0,9"])
def test_bad_spacing_refuses_the_series_in_one_line(tmp_path: Path, spacing: str) -> None:
    _series(tmp_path / "p" / "ct", _head())
    mr = _series(tmp_path / "p" / "mr", _head(), modality="MR")
    for k, ds in enumerate(mr):
        raw = spacing.encode() + (b" " if len(spacing) % 2 else b"")
        ds[0x00280030] = pydicom.dataelem.RawDataElement(
            pydicom.tag.Tag(0x00280030), "DS", len(raw), raw, 0, False, True
        )
        ds.save_as(tmp_path / "p" / "mr" / f"IM{k:04d}_{ds.SOPInstanceUID[-6:]}")
    case = load_case(tmp_path / "p")
    assert case.ct is not None and case.mr == []
    assert len(case.errors) == 1 and "PixelSpacing" in case.errors[0].problem
    assert "\n" not in str(case.errors[0])


ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _enhanced(path: Path, slices: list[Dataset], stack_ids: list[int] | None = None) -> Path:
    """The single-frame `slices` as one enhanced CT object, frames in the order given, their
    geometry in the functional groups (shared: spacing, orientation, rescale; per frame: position)."""
    first = slices[0]
    ds = Dataset()
    for kw in (
        "Modality", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
        "StudyDate", "StudyTime", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
        "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    ):  # fmt: skip
        setattr(ds, kw, first.data_element(kw).value)
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_CT, generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20250102", "101500", "20250102101500"
    ds.NumberOfFrames = len(slices)
    measures, plane, rescale = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = first.PixelSpacing, 2.0
    plane.ImageOrientationPatient = first.ImageOrientationPatient
    rescale.RescaleIntercept, rescale.RescaleSlope, rescale.RescaleType = first.RescaleIntercept, 1, "HU"
    shared = Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [plane]
    shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]
    per = []
    for i, sl in enumerate(slices):
        item, pos, content = Dataset(), Dataset(), Dataset()
        pos.ImagePositionPatient = sl.ImagePositionPatient
        content.StackID = str(stack_ids[i] if stack_ids else 1)
        content.InStackPositionNumber = i + 1
        item.PlanePositionSequence, item.FrameContentSequence = [pos], [content]
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = per
    ds.PixelData = b"".join(sl.PixelData for sl in slices)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
        ENHANCED_CT,
        ds.SOPInstanceUID,
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_multiframe_loads_as_its_single_frame_series(tmp_path: Path) -> None:
    """highdicom's volume reading: shuffled frames of an oblique enhanced CT land where the same
    slices as single-frame files do (values, int16, spacing, origin, direction)."""
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    stored = (np.arange(6 * 16 * 16).reshape(6, 16, 16) % 2000).astype(np.uint16)
    slices = _series(tmp_path / "single", stored, step=2.5, row=(c, s, 0.0), col=(-s, c, 0.0))
    single = load_case(tmp_path / "single").ct
    assert single is not None
    shuffled = [slices[i] for i in (3, 0, 5, 1, 4, 2)]
    multi = read_dicom_volume(_enhanced(tmp_path / "multi" / "ct.dcm", shuffled), min_slices=2)
    assert multi.array.dtype == np.int16 and np.array_equal(multi.array, single.array)
    assert np.allclose(multi.affine, single.affine, atol=1e-4)
    assert multi.orientation_code() == single.orientation_code() and not multi.warnings


def test_enhanced_multiframe_reads_the_first_stack_of_several(tmp_path: Path) -> None:
    stored = _head(4, 8)
    echo1 = _series(tmp_path / "e1", stored)
    echo2 = _series(tmp_path / "e2", stored + 100)
    path = _enhanced(tmp_path / "mf.dcm", echo1 + echo2, stack_ids=[1] * 4 + [2] * 4)
    vol = read_dicom_volume(path, min_slices=2)
    assert np.array_equal(vol.array, stored.astype(np.int16) - 1024)
    assert any("holds 2 stacks" in w and "the first frame's" in w for w in vol.warnings)


def test_enhanced_multiframe_that_is_not_one_regular_volume_is_refused_in_one_line(tmp_path: Path) -> None:
    slices = _series(tmp_path / "s", _head(6, 8))
    with pytest.raises(InputError, match="missing or unevenly spaced") as gap:
        read_dicom_volume(_enhanced(tmp_path / "gap.dcm", slices[:3] + slices[4:]))
    assert "gap.dcm" in str(gap.value) and "\n" not in str(gap.value)
    with pytest.raises(InputError, match="nothing tells its stacks apart"):
        read_dicom_volume(_enhanced(tmp_path / "twice.dcm", slices + slices))
    short = pydicom.dcmread(_enhanced(tmp_path / "short.dcm", slices))
    short.NumberOfFrames = 5
    short.save_as(tmp_path / "short.dcm")
    with pytest.raises(InputError, match="one PerFrameFunctionalGroupsSequence item per frame"):
        read_dicom_volume(tmp_path / "short.dcm")


def test_volume_refuses_a_non_orthonormal_direction() -> None:
    with pytest.raises(ValueError, match="orthonormal"):
        Volume(np.zeros((2, 2, 2)), direction=np.array([[1.0, 0.2, 0], [0, 1, 0], [0, 0, 1]]))
    with pytest.raises(ValueError, match="positive and finite"):
        Volume(np.zeros((2, 2, 2)), spacing=(1.0, float("nan"), 1.0))


def test_nifti_qform_sform_disagreement_is_warned_about(tmp_path: Path) -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), affine)
    moved = affine.copy()
    moved[:3, 3] = [0.0, 12.0, 0.0]
    img.header.set_sform(affine, code=1)
    img.header.set_qform(moved, code=1)
    nib.save(img, tmp_path / "mr.nii.gz")
    vol = read_nifti(tmp_path / "mr.nii.gz")
    assert any("qform and sform disagree by 12.0 mm" in w for w in vol.warnings)
    assert np.allclose(vol.origin, [0.0, 0.0, 0.0])  # the sform's


# --- Kind 5: NIfTI voxel hygiene ---


def test_nifti_big_endian_float64_with_inf_is_normalised(tmp_path: Path) -> None:
    data = np.arange(60, dtype=">f8").reshape(3, 4, 5) + 10.0
    data[0, 0, :2] = [np.inf, -np.inf]
    data[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "t1.nii")
    vol = read_nifti(tmp_path / "t1.nii")
    assert vol.array.dtype == np.float32 and vol.array.dtype.isnative
    assert np.isfinite(vol.array).all()
    assert any(w.startswith("3 NaN/Inf voxel(s)") for w in vol.warnings)
    assert float(vol.array.min()) == 0.0  # non-negative image: NaN/Inf become 0


def test_nifti_int64_scaled_and_complex(tmp_path: Path) -> None:
    nib.save(
        nib.Nifti1Image(np.arange(24, dtype=np.int64).reshape(2, 3, 4), np.eye(4), dtype=np.int64),
        tmp_path / "a.nii",
    )
    assert read_nifti(tmp_path / "a.nii").array.dtype == np.int32
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, tmp_path / "ct.nii")
    vol = read_nifti(tmp_path / "ct.nii")
    assert float(vol.array.max()) == 2.0 * 23 - 1024.0 and "scl_slope 2" in vol.meta["notes"][0]
    nib.save(nib.Nifti1Image(np.zeros((2, 3, 4), np.complex64), np.eye(4)), tmp_path / "c.nii")
    with pytest.raises(InputError, match="complex"):
        read_nifti(tmp_path / "c.nii")


# --- Mutated headers: a Case or an InputError, nothing else ---

_MUTABLE = [
    "PixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SamplesPerPixel",
    "ImageType",
    "Modality",
    "NumberOfFrames",
]
_JUNK = ["", "0", "-1", "1e9", "nan", "a\\b", "0,5\\0,5", "1\\0\\0\\0\\0\\0", "65535", "\\\\\\"]


@settings(max_examples=40, deadline=20000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    attribute=st.sampled_from(_MUTABLE),
    junk=st.sampled_from([None, *_JUNK]),
    every_file=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_load_case_on_mutated_headers_loads_or_refuses(
    tmp_path: Path, attribute: str, junk: str | None, every_file: bool, seed: int
) -> None:
    folder = tmp_path / generate_uid()  # hypothesis reuses tmp_path across examples
    datasets = _series(folder, _head(4, 8))
    files = sorted(folder.iterdir())
    targets = range(len(files)) if every_file else [seed % len(files)]
    tag = pydicom.datadict.tag_for_keyword(attribute)
    assert tag is not None
    vr = pydicom.datadict.dictionary_VR(tag)
    for t in targets:
        ds = datasets[t]
        if junk is None:
            if attribute in ds:
                del ds[attribute]
        else:
            raw = junk.encode()
            if len(raw) % 2:
                raw += b" "
            if vr in ("US", "SS", "UL", "SL"):
                raw = struct.pack("<H", (seed * 7919) % 65536) if junk else b""
                vr = "US" if vr == "US" else vr
            ds[tag] = pydicom.dataelem.RawDataElement(tag, vr, len(raw), raw, 0, False, True)
        ds.save_as(files[t], enforce_file_format=True)
    case = load_case(folder)  # raises nothing: every fault lands in case.errors
    assert all("\n" not in str(e) for e in case.errors)
    if case.ct is not None:
        assert np.isfinite(case.ct.array).all()


# --- Kind 7: cohort discovery and notes ---


def _patient(folder: Path, pid: str, note: bool = True) -> None:
    for ds in _series(folder / "CT", _head()):
        ds.PatientID = pid
        ds.save_as(next((folder / "CT").glob(f"*{ds.SOPInstanceUID[-6:]}")), enforce_file_format=True)
    if note:
        (folder / "note.txt").write_text("Headache for two weeks.\n")


@pytest.mark.parametrize(
    "stray", ["README.md", "LICENSE.md", "notes.txt", "study_protocol.txt", "atlas_mni.nii.gz"]
)
def test_a_stray_file_in_a_cohort_root_does_not_make_it_a_patient(tmp_path: Path, stray: str) -> None:
    from medfusion.io.case import find_patient_folders

    root = tmp_path / "cohort"
    _patient(root / "P1", "P1", note=False)
    _patient(root / "P2", "P2", note=False)
    if stray.endswith(".nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), root / stray)
    else:
        (root / stray).write_text("not a patient\n")
    assert [p.name for p in find_patient_folders([root])] == ["P1", "P2"]


def test_a_noteless_patient_with_series_folders_stays_one_patient(tmp_path: Path) -> None:
    from medfusion.io.case import find_patient_folders

    pat = tmp_path / "PAT01"
    _patient(pat, "PAT01", note=False)
    mr = _series(pat / "MR", _head(), modality="MR")
    for k, ds in enumerate(mr):
        ds.PatientID = "PAT01"
        ds.save_as(pat / "MR" / f"IM{k:04d}_{ds.SOPInstanceUID[-6:]}", enforce_file_format=True)
    assert find_patient_folders([pat]) == [pat]
    case = load_case(pat)
    assert case.ct is not None and len(case.mr) == 1


def test_notes_licences_and_encodings(tmp_path: Path) -> None:
    from medfusion.io.case import read_note

    pat = tmp_path / "P"
    _patient(pat, "P", note=False)
    (pat / "CT" / "LICENSE.TXT").write_text("Licensed under …\n")
    (pat / "note.json").write_bytes('{"text": "Kopfschmerz seit 3 Wochen, Übelkeit"}'.encode("cp1252"))
    text, path = read_note(pat)
    assert path is not None and path.name == "note.json" and text.endswith("Übelkeit")
    (pat / "note.json").write_text("{not json")
    case = load_case(pat)
    assert case.ct is not None and case.note == ""
    assert any("note JSON is not valid" in e.problem for e in case.errors)


def test_patients_sharing_a_patient_id_stay_apart_and_series_folders_stay_together(tmp_path: Path) -> None:
    from medfusion.io.case import find_patient_folders

    root = tmp_path / "cohort"
    for name in ("A", "B", "C"):  # one made-up PatientID for everyone (a de-identified export)
        _patient(root / name, "ANON", note=True)
    assert [p.name for p in find_patient_folders([root])] == ["A", "B", "C"]
    pat = tmp_path / "PAT"
    _patient(pat, "X1", note=False)
    mr = _series(pat / "MR", _head(), modality="MR")
    for k, ds in enumerate(mr):
        ds.PatientID = "X2"  # another patient's MR: one folder still, the registration QC's to catch
        ds.save_as(pat / "MR" / f"IM{k:04d}_{ds.SOPInstanceUID[-6:]}", enforce_file_format=True)
    assert find_patient_folders([pat]) == [pat]
    assert any("2 PatientIDs" in w for w in (load_case(pat).ct or Volume(np.zeros((1, 1, 1)))).warnings)
