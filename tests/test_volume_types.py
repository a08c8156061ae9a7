"""Grid, Volume and LabelMap: geometry checked at construction, one resampling entry point, labels
always nearest; preprocessing's MR decision made once, for training and inference alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from medfusion.config import PreprocessConfig
from medfusion.io.case import Case
from medfusion.io.volume import Grid, LabelMap, Volume
from medfusion.preprocess.prepare import MR_FAILED_QC, MR_USED, prepare_case
from medfusion.preprocess.registration import RegistrationResult
from medfusion.preprocess.resample import model_grid


def rotation_matrix(degrees: np.ndarray) -> np.ndarray:
    return Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()


def _oblique() -> np.ndarray:
    return rotation_matrix(np.array([10.0, -5.0, 20.0]))


def test_grid_refuses_bad_geometry() -> None:
    with pytest.raises(ValueError, match="orthonormal"):
        Grid((2, 2, 2), direction=np.diag([1.0, 1.0, 1.2]))
    with pytest.raises(ValueError, match="spacing"):
        Grid((2, 2, 2), spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        Grid((2, 0, 2))
    with pytest.raises(ValueError, match="orthonormal"):
        Volume(np.zeros((2, 2, 2)), direction=np.array([[1, 0.1, 0], [0, 1, 0], [0, 0, 1.0]]))
    g = Grid((4, 5, 6), (0.5, 0.7, 2.0), (1.0, 2.0, 3.0), _oblique())
    assert g.size_xyz == (6, 5, 4) and g.spacing_zyx == (2.0, 0.7, 0.5)
    assert not g.direction.flags.writeable  # a grid cannot be bent after its check


def test_model_grid_is_a_grid_centred_on_the_ct() -> None:
    ct = Volume(np.zeros((20, 30, 40), np.int16), (0.8, 0.9, 2.5), (-10.0, 5.0, 7.0), _oblique(), "CT")
    grid = model_grid(ct, 2.0, [16, 16, 16])
    assert isinstance(grid, Grid) and grid.shape == (16, 16, 16)  # no voxels allocated to carry it
    centre_ct = ct.index_to_world((np.array(ct.size_xyz, float)[None] - 1) / 2)
    assert np.allclose(grid.index_to_world(np.full((1, 3), 7.5)), centre_ct)
    assert np.allclose(grid.direction, ct.direction)


def test_resample_to_equals_simpleitk_on_a_reference_image() -> None:
    rng = np.random.default_rng(0)
    vol = Volume(
        rng.normal(size=(12, 14, 16)).astype(np.float32), (1.1, 1.2, 2.0), (3.0, -4.0, 5.0), _oblique()
    )
    grid = Grid((9, 10, 11), (1.7, 1.5, 2.2), (4.0, -3.0, 6.0), _oblique())
    matrix = np.eye(4)
    matrix[:3, :3] = rotation_matrix(np.array([3.0, 0.0, -2.0]))
    matrix[:3, 3] = [1.5, -0.5, 2.0]
    ours = vol.resample_to(grid, matrix, default=-7.0)
    ref = Volume.on(grid, np.zeros(grid.shape, np.float32)).to_sitk()
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(matrix[:3, :3].ravel().tolist())
    tx.SetTranslation(matrix[:3, 3].tolist())
    theirs = sitk.GetArrayFromImage(
        sitk.Resample(vol.to_sitk(), ref, tx, sitk.sitkLinear, -7.0, sitk.sitkFloat32)
    )
    assert ours.same_grid(grid) and np.array_equal(ours.array, theirs)
    # channels first: each channel resampled alone
    stack = Volume.on(vol.grid, np.stack([vol.array, 2 * vol.array]))
    both = stack.resample_to(grid, matrix, default=0.0)
    assert both.array.shape == (2, *grid.shape) and both.channels == 2
    assert np.allclose(both.array[1], 2 * vol.resample_to(grid, matrix, default=0.0).array, atol=1e-5)


def test_label_map_always_resamples_nearest_and_keeps_its_type() -> None:
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[2:8, 2:8, 2:8] = 2
    lab[4:6, 4:6, 4:6] = 3
    labels = LabelMap(lab, (1.0, 1.0, 1.0))
    shifted = Grid((10, 10, 10), (1.0, 1.0, 1.0), (0.5, 0.5, 0.5))  # halfway between voxels
    out = labels.resample_to(shifted)
    assert isinstance(out, LabelMap) and out.array.dtype == np.uint8
    assert set(np.unique(out.array)) <= {0, 2, 3}  # never an interpolated 1 or 2.5
    as_image = Volume(lab.astype(np.float32)).resample_to(shifted)
    assert set(np.unique(as_image.array)) - {0.0, 2.0, 3.0}  # an image does interpolate
    assert LabelMap.of(Volume(lab)).resample_to(labels).array.tolist() == lab.tolist()


def _case(tmp_path: Path) -> Case:
    ct = np.full((24, 24, 24), -1000, np.int16)
    ct[4:20, 4:20, 4:20] = 30
    mr = np.zeros((24, 24, 24), np.float32)
    mr[4:20, 4:20, 4:20] = 200.0
    return Case(
        "P1",
        tmp_path,
        ct=Volume(ct, (2.0, 2.0, 2.0), modality="CT"),
        mr=[Volume(mr, (2.0, 2.0, 2.0), modality="MR")],
        note="a note",
    )


@pytest.mark.parametrize("passed", [True, False])
def test_prepare_decides_whether_the_mr_is_used(tmp_path: Path, passed: bool) -> None:
    reg = RegistrationResult(np.eye(4), -0.5, 1, 0.0, "given", {"passed": passed, "reasons": []})
    cfg = PreprocessConfig(target_spacing_mm=4.0, target_size=[12, 12, 12])
    t = prepare_case(_case(tmp_path), cfg, registration=reg)
    assert t.has_mr is passed and t.mr_reason == (MR_USED if passed else MR_FAILED_QC)
    assert t.modalities["MR"] == t.mr_reason
    assert (t.mr_shown is not None) is passed  # a report never shows an MR the model left out
    assert isinstance(t.grid, Grid) and t.ct.shape == (2, 12, 12, 12)
    probs = np.stack([np.full(t.grid.shape, 0.25, np.float32), np.full(t.grid.shape, 0.75, np.float32)])
    back = t.probabilities_on_ct(probs)
    assert back.same_grid(t.ct_volume) and back.array.shape == (2, 24, 24, 24)


def test_label_map_metrics_refuse_a_reference_off_the_prediction_grid() -> None:
    from medfusion.evaluate.segmentation import case_metrics, label_map_metrics

    lab = np.zeros((10, 10, 10), np.int16)
    lab[3:7, 3:7, 3:7] = 1
    pred = LabelMap(lab, (1.0, 1.0, 2.0))
    names = ["background", "tumour_core"]
    assert label_map_metrics(pred, pred, names) == case_metrics(lab, lab, (1.0, 1.0, 2.0), names)
    shifted = LabelMap(lab, (1.0, 1.0, 2.0), origin=(5.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="not the prediction's"):
        label_map_metrics(pred, shifted, names)


# --- One transform conversion, warnings kept, full-geometry comparisons (#29) ---


def test_matrix_to_sitk_round_trips_and_is_the_one_registration_uses() -> None:
    from medfusion.io import volume
    from medfusion.io.volume import matrix_to_sitk, sitk_to_matrix
    from medfusion.preprocess import registration

    m = np.eye(4)
    m[:3, :3] = _oblique()
    m[:3, 3] = [4.0, -7.5, 12.0]
    tx = matrix_to_sitk(m)
    assert np.allclose(sitk_to_matrix(tx), m, atol=1e-9)
    p = np.array([10.0, 20.0, -30.0])
    assert np.allclose(tx.TransformPoint(tuple(p)), m[:3, :3] @ p + m[:3, 3])
    assert np.allclose(sitk_to_matrix(matrix_to_sitk(None)), np.eye(4))
    # one definition: registration re-exports the io layer's functions rather than its own copies
    assert registration.matrix_to_sitk is volume.matrix_to_sitk
    assert registration.sitk_to_matrix is volume.sitk_to_matrix


def test_with_array_and_resampling_keep_the_loader_warnings() -> None:
    v = Volume(np.zeros((4, 5, 6), np.float32), spacing=(1.0, 1.0, 2.0), modality="CT")
    v.warnings.append("2 missing slice(s) near slice 3; resampled to a regular 2 mm spacing")
    g = Grid((2, 3, 3), spacing=(2.0, 2.0, 2.0))
    lab = LabelMap.of(v.with_array(np.zeros((4, 5, 6), np.uint8)))
    for out in (v.with_array(v.array + 1), v.resample_to(g), lab, lab.resample_to(g)):
        assert out.warnings == v.warnings
        assert out.warnings is not v.warnings  # a copy: the derived volume's own list


def test_grid_overlap_uses_the_whole_extent() -> None:
    ct = Grid((20, 20, 20), spacing=(1.0, 1.0, 1.0))
    assert ct.overlaps(ct) and ct.overlaps(Grid((4, 4, 4), origin=(18.0, 18.0, 18.0)))
    # beside the CT along one axis only: two opposite corners' box straddles 0 on the other axes
    assert not ct.overlaps(Grid((20, 20, 20), origin=(-30.0, 0.0, 0.0)))
    assert not ct.overlaps(Grid((5, 5, 5), origin=(0.0, 0.0, 25.0)))
    # flipped axes: the first and last voxels' centres do not bound the grid in LPS order
    flipped = Grid((10, 10, 10), origin=(5.0, 5.0, 5.0), direction=np.diag([-1.0, 1.0, -1.0]))
    assert ct.overlaps(flipped) and flipped.overlaps(ct)
    assert len(ct.corners()) == 8
    shifted = Grid(ct.shape, ct.spacing, (0.0005, 0.0, 0.0), ct.direction)
    assert ct.same_as(shifted, tol=1e-3) and not ct.same_as(shifted, tol=1e-4)
    assert not ct.same_as(Grid((20, 20, 21)))
