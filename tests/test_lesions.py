"""The one lesion definition (measure/lesions.py) and the findings measured on it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from medfusion.config import PipelineConfig, PreprocessConfig
from medfusion.evaluate.segmentation import lesion_detection
from medfusion.io.case import Case
from medfusion.io.volume import Grid, LabelMap, Volume
from medfusion.measure.features import FEATURES, lesion_features
from medfusion.measure.lesions import (
    axial_diameters_mm,
    bidimensional_mm,
    find_lesions,
    label_lesions,
    lesion_regions,
    slices_are_axial,
)
from medfusion.preprocess.prepare import prepare_case
from medfusion.run.measure import measure
from medfusion.run.pipeline import RunOptions, case_result

NAMES = ["background", "tumour_core", "oedema", "calcification"]


def _two_touching(shape: tuple[int, int, int] = (20, 40, 60)) -> np.ndarray:
    """Two cores whose oedema touches: one foreground region, two lesions (z, y, x)."""
    lab = np.zeros(shape, np.int16)
    lab[5:15, 10:30, 5:30] = 2
    lab[8:12, 15:25, 10:18] = 1
    lab[5:15, 10:30, 30:55] = 2
    lab[8:12, 15:25, 40:50] = 1
    return lab


def _features(lab: np.ndarray, spacing_zyx: tuple[float, ...]) -> dict[str, float]:
    return dict(zip(FEATURES, (float(v) for v in lesion_features(lab, spacing_zyx, NAMES)), strict=True))


def test_touching_lesions_are_two_everywhere() -> None:
    """Two cores whose oedema touches are two lesions for the findings and the diagnosis's features
    alike (each voxel to its nearest core); the main lesion's core diameter and oedema ratio are its
    own, not the pair's."""
    vol = Volume(_two_touching(), (1.0, 1.0, 2.0))
    m = measure(vol, NAMES)
    f = _features(vol.array, vol.spacing_zyx)
    assert m.lesion_count == 2 and f["lesion_count"] == 2
    # each core's own Feret diameter (10 × 10 and 8 × 10 voxels in plane, 4 slices of 2 mm), largest
    # first, not the pair's 40 mm span
    assert m.lesion_diameters_mm == [
        pytest.approx(np.sqrt(9**2 + 9**2 + 6**2), abs=0.05),
        pytest.approx(np.sqrt(7**2 + 9**2 + 6**2), abs=0.05),
    ]
    main = m.lesions[0]
    assert f["core_diameter_mm"] == pytest.approx(main.core_diameter_mm, abs=0.05)
    ratio = (main.total_ml / (main.volumes_ml["tumour_core"] + main.volumes_ml["calcification"])) ** (1 / 3)
    assert f["oedema_radius_ratio"] == pytest.approx(ratio, rel=1e-3)
    volumes = [les.volumes_ml["oedema"] for les in m.lesions]
    assert sum(volumes) == pytest.approx(m.volumes_ml["oedema"], abs=1e-3) and min(volumes) > 0
    assert np.expm1(f["log_oedema_ml"]) == pytest.approx(m.volumes_ml["oedema"], rel=1e-5)


def test_touching_lesions_agree_in_scores_json(tmp_path: Path) -> None:
    """scores.json's two readings of one case — "score_features" (the diagnosis's, on the model grid,
    as the predictor computes them) and "measurements" (the run's, on the CT's grid) — count the same
    lesions and give the main lesion the same core diameter (within a model voxel)."""
    ct = np.full((24, 64, 64), -1000, np.int16)
    ct[2:22, 4:60, 4:60] = 30
    case = Case(
        "P1", tmp_path, ct=Volume(ct, (1.0, 1.0, 2.0), modality="CT", meta={"format": "dicom"}), mr=[]
    )
    cfg = PreprocessConfig(target_spacing_mm=[1.6, 1.6, 2.0], target_size=[40, 40, 24])
    inputs = prepare_case(case, cfg)
    on_model = np.zeros(inputs.grid.shape, np.int16)  # (24, 40, 40) voxels of 2 × 1.6 × 1.6 mm
    on_model[6:18, 8:32, 2:20] = 2
    on_model[9:14, 12:22, 5:12] = 1  # 5 × 10 × 7 voxels
    on_model[6:18, 8:32, 20:38] = 2  # the oedema touches
    on_model[9:14, 14:26, 26:34] = 1  # 5 × 12 × 8 voxels: the main lesion's core
    assert len(lesion_regions(on_model, 1)[1]) == 1  # one region
    f = lesion_features(on_model, inputs.grid.spacing_zyx, NAMES)  # as the predictor computes them
    features = {n: round(float(v), 4) for n, v in zip(FEATURES, f, strict=True)}
    on_ct = LabelMap.on(inputs.grid, on_model).resample_to(case.ct.grid)  # type: ignore[union-attr]
    pred = SimpleNamespace(scores={"malignant": 0.7}, uncertainty={"malignant": 0.01}, features=features)
    predictor = SimpleNamespace(
        describe=lambda: {"name": "m", "version": "1"}, device="cpu", amp=False, sw_batch_size=2, seed=0
    )
    result = case_result(
        case,
        inputs,
        pred,  # type: ignore[arg-type]
        {"in_domain": True, "reasons": []},
        measure(on_ct, NAMES, ct=case.ct),
        RunOptions(out=tmp_path, pipeline=PipelineConfig()),
        predictor,  # type: ignore[arg-type]
        cfg,
    )
    scores = json.loads(result.write_scores(tmp_path).read_text())
    sf, ms = scores["score_features"], scores["measurements"]
    assert sf["lesion_count"] == ms["lesion_count"] == 2
    voxel_diagonal = float(np.linalg.norm([1.6, 1.6, 2.0]))
    assert sf["core_diameter_mm"] == pytest.approx(ms["lesions"][0]["core_diameter_mm"], abs=voxel_diagonal)
    assert sf["core_diameter_mm"] < 25.0  # one core, not the two tumours' span (> 40 mm)


def test_separate_lesions_get_one_row_each_largest_first() -> None:
    lab = np.zeros((20, 40, 60), np.int16)
    lab[4:8, 5:10, 5:10] = 1  # small, at low x (patient right in LPS)
    lab[10:18, 20:35, 40:56] = 1  # large, at high x (patient left)
    lab[2, 2, 58] = 2  # oedema without core: not a lesion
    vol = Volume(lab, (1.0, 1.0, 2.0))
    found = label_lesions(lab, NAMES, vol.spacing_zyx)
    assert len(found.ids) == 2 and found.components[2, 2, 58] == 0
    assert found.solid_voxels[found.ids[0]] > found.solid_voxels[found.ids[1]]
    lesions = find_lesions(vol, NAMES)
    assert [les.number for les in lesions] == [1, 2]
    assert lesions[0].volumes_ml["tumour_core"] > lesions[1].volumes_ml["tumour_core"]
    assert lesions[0].side == "left" and lesions[1].side == "right"
    assert lesions[0].axial_diameters_mm[0] >= lesions[0].axial_diameters_mm[1] > 0


def test_ct_density_and_mr_enhancement() -> None:
    lab = np.zeros((10, 30, 30), np.int16)
    lab[3:7, 10:20, 10:20] = 1
    lab[5, 14:16, 14:16] = 3  # a calcification inside the core: not part of the core's density
    ct = np.full(lab.shape, 30.0, np.float32)
    ct[lab == 1] = 60.0
    ct[lab == 3] = 600.0
    mr = np.full(lab.shape, 100.0, np.float32)
    mr[lab == 1] = 250.0
    vol = Volume(lab, (1.0, 1.0, 1.0))
    (lesion,) = find_lesions(vol, NAMES, ct=vol.with_array(ct, "CT"), mr=vol.with_array(mr, "MR"))
    assert lesion.ct_core_hu == pytest.approx(60.0)
    assert lesion.mr_enhancement_ratio == pytest.approx(2.5, abs=0.05)
    with pytest.raises(ValueError, match="not on the label map's grid"):
        find_lesions(vol, NAMES, ct=Volume(np.zeros((2, 2, 2)), modality="CT"))
    # the same shape on another grid (a CT not resampled to the label map) is refused too
    moved = Volume(ct, (1.0, 1.0, 1.0), (5.0, 0.0, 0.0), modality="CT")
    with pytest.raises(ValueError, match="not on the label map's grid"):
        find_lesions(vol, NAMES, ct=moved)
    with pytest.raises(ValueError, match="mr is not on the label map's grid"):
        find_lesions(vol, NAMES, mr=Volume(mr, (1.0, 1.0, 2.0), modality="MR"))


def test_bidimensional_diameters_of_a_rectangle() -> None:
    mask = np.zeros((40, 40), bool)
    mask[10:14, 5:35] = True  # 30 × 4 voxels at 0.5 mm
    d1, d2 = bidimensional_mm(mask, (0.5, 0.5))
    assert d1 == pytest.approx(np.hypot(29 * 0.5, 3 * 0.5), abs=1e-6)
    assert 1.5 <= d2 < 4.0 < d1  # the extent across the longest (diagonal) diameter


def _axial_lesion() -> Volume:
    """A core elongated along LPS x in the axial plane (24 × 8 mm at its widest) and tall along z
    (30 mm), in oedema, on an axial grid of 1 × 1.25 × 2 mm."""
    lab = np.zeros((24, 30, 40), np.int16)
    z, y, x = np.indices(lab.shape)
    lab[(((x - 20) / 15.0) ** 2 + ((y - 15) / 7.0) ** 2 <= 1) & (abs(z - 12) <= 9)] = 2
    lab[(((x - 20) / 12.0) ** 2 + ((y - 15) / 3.5) ** 2 <= 1) & (abs(z - 12) <= 7)] = 1
    return Volume(lab, (1.0, 1.25, 2.0), (-20.0, 10.0, 30.0))


def _as_sagittal(vol: Volume) -> Volume:
    """The same voxels on a sagittal grid: i runs posterior (LPS +y), j inferior (−z), k left (+x)."""
    nz = vol.shape[0]
    arr = vol.array[::-1].transpose(2, 0, 1).copy()  # [k, j, i] = axial[nz - 1 - j, i, k]
    sx, sy, sz = vol.spacing
    ox, oy, oz = vol.origin
    direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    return Volume(arr, (sy, sz, sx), (ox, oy, oz + (nz - 1) * sz), direction)


def test_axial_diameters_do_not_depend_on_the_acquisition_plane() -> None:
    """RANO's bidimensional pair is read on the patient's axial plane: a sagittal grid holding the same
    voxels gives the same pair (its array slices are sagittal planes, where the lesion is 30 mm tall)."""
    axial = _axial_lesion()
    sagittal = _as_sagittal(axial)
    assert slices_are_axial(axial.grid) and not slices_are_axial(sagittal.grid)
    # the same voxel at the same place
    assert np.allclose(
        axial.index_to_world(np.array([3, 5, 7])), sagittal.index_to_world(np.array([5, 23 - 7, 3]))
    )
    assert sagittal.array[3, 23 - 7, 5] == axial.array[7, 5, 3]
    (a,) = find_lesions(axial, NAMES)
    (s,) = find_lesions(sagittal, NAMES)
    assert a.axial_diameters_mm[0] == pytest.approx(24.0, abs=1.0)  # 2 × 12 voxels of 1 mm along x
    for da, ds in zip(a.axial_diameters_mm, s.axial_diameters_mm, strict=True):
        assert ds == pytest.approx(da, abs=1.25)
    assert s.core_diameter_mm == pytest.approx(a.core_diameter_mm, abs=0.05)
    assert s.volumes_ml == a.volumes_ml and s.centroid_lps == pytest.approx(a.centroid_lps, abs=0.05)
    # reading the sagittal grid's own slices would have measured the lesion's height instead
    core = sagittal.array == 1
    k = int(np.argmax(core.sum(axis=(1, 2))))
    assert bidimensional_mm(core[k], (sagittal.spacing_zyx[1], sagittal.spacing_zyx[2]))[0] > 27.0


def test_axial_diameters_on_a_tilted_grid() -> None:
    """A grid tilted 20° about LPS x (a gantry tilt), sampling the same lesion finely: the axial pair
    agrees with the axial grid's within a voxel or two (resampling twice, nearest-neighbour)."""
    axial = _axial_lesion()
    t = np.deg2rad(20.0)
    tilt = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), -np.sin(t)], [0.0, np.sin(t), np.cos(t)]])
    centre = axial.index_to_world(np.array([19.5, 14.5, 11.5]))[0]
    shape, spacing = (40, 48, 48), (1.0, 1.0, 1.0)
    origin = centre - tilt @ (np.array(spacing) * (np.array(shape[::-1]) - 1) / 2)
    grid = Grid(shape, spacing, tuple(origin), tilt)  # type: ignore[arg-type]
    tilted = LabelMap.of(axial).resample_to(grid)
    assert not slices_are_axial(grid)
    (a,) = find_lesions(axial, NAMES)
    (s,) = find_lesions(tilted, NAMES)
    for da, ds in zip(a.axial_diameters_mm, s.axial_diameters_mm, strict=True):
        assert ds == pytest.approx(da, abs=2.5)
    with pytest.raises(ValueError, match="not on the grid"):
        axial_diameters_mm(np.zeros((2, 2, 2), bool), grid)


def test_detection_counts_the_lesions_medfusion_reports() -> None:
    """Evaluation's lesion detection reads the same lesions: two touching tumours in the reference,
    one of them predicted, is one found and one missed for core and oedema alike (one oedema region,
    two lesions); a predicted lesion far from every reference lesion is an isolated FP."""
    ref = _two_touching()
    pred = ref.copy()
    pred[:, :, 29:] = 0  # the second tumour is missed (its lesion starts at x = 29, nearer its core)
    pred[16:19, 34:38, 50:55] = 1  # a lesion where the reference has none
    pred[16:19, 33, 50:55] = 2
    rows = lesion_detection(pred, ref, NAMES, (2.0, 1.0, 1.0))
    for name in ("tumour_core", "oedema"):
        assert (rows[name]["lesions_tp"], rows[name]["lesions_fn"]) == (1, 1)
        assert rows[name]["lesions_fp"] == rows[name]["lesions_fp_isolated"] == 1
    assert rows["calcification"] == dict.fromkeys(rows["calcification"], 0)
    stray = ref.copy()
    stray[17, 35, 5] = 2  # oedema with no core belongs to no lesion: no detection, no FP
    assert lesion_detection(stray, ref, NAMES, (2.0, 1.0, 1.0))["oedema"]["lesions_fp"] == 0


def test_no_lesion() -> None:
    vol = Volume(np.zeros((4, 5, 6), np.int16))
    m = measure(vol, NAMES)
    assert m.lesion_count == 0 and m.largest_diameter_mm == 0.0 and m.lesions == []
    assert _features(vol.array, (1.0, 1.0, 1.0))["lesion_count"] == 0


def test_the_midline_is_the_body_masks_not_a_head_rest_beside_it() -> None:
    """The side is read against the CT body mask the domain guard uses (> −500 HU, largest component,
    holes filled): a head rest apart from the head does not move the midline."""
    ct = np.full((6, 40, 60), -1000.0, np.float32)  # (z, y, x) of 2 mm: LPS +x (index +) is left
    ct[:, :, 5:36] = 40.0  # the head, x index 5 … 35: midline at index 20
    ct[:, 20:, 44:58] = 300.0  # a head rest 8 voxels (16 mm) to the side, not touching the head
    lab = np.zeros(ct.shape, np.int16)
    lab[2:4, 10:14, 26:29] = 1  # centred at x index 27: 14 mm left of the head's midline
    vol = Volume(lab, (2.0, 2.0, 2.0))
    (lesion,) = find_lesions(vol, NAMES, ct=vol.with_array(ct, "CT"))
    assert lesion.side == "left", lesion  # with the head rest in the mask the midline moves 11 mm left
    head = ct.copy()
    head[:, 20:, 44:58] = -1000.0
    (alone,) = find_lesions(vol, NAMES, ct=vol.with_array(head, "CT"))
    assert alone.side == lesion.side and alone.region == lesion.region
