"""Real-anatomy synthetic patients (`medfusion synth --anatomy mni`): determinism, valid DICOM, labels
aligned with the CT, HU and MR ranges per tissue, lesion-like normal structures in normal patients."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

pytest.importorskip("nilearn")

from medfusion.io.case import load_case  # noqa: E402
from medfusion.io.volume import Volume  # noqa: E402
from medfusion.synth import mni  # noqa: E402
from medfusion.synth.generate import generate_cohort, generate_patient, image_facts, patient_facts  # noqa: E402
from medfusion.synth.phantom import HeadPhantom, Tissue, labels_from_tissue  # noqa: E402
from medfusion.synth.render import grid_points  # noqa: E402

SEED = 25  # index 1 of this seed carries a calcified pineal, choroid plexus and falx
PLAN = {0: {"mr_format": "dicom", "n_lesions": 1}, 1: {"mr_format": "nifti", "n_lesions": 0}}


@pytest.fixture(scope="module")
def mni_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mni")
    generate_cohort(out, 2, seed=SEED, preset="small", workers=1, plan=PLAN, anatomy="mni")
    return out


def _head(seed: int, index: int, n_lesions: int) -> tuple[HeadPhantom, mni.MniHead]:
    phantom, _, rng = patient_facts(seed, index)
    phantom.lesions = phantom.lesions[:n_lesions] + [
        phantom._random_lesion(rng) for _ in range(n_lesions - len(phantom.lesions))
    ]
    return phantom, mni.MniHead.from_phantom(phantom, np.random.default_rng([seed, index, 11]))


def _tissue_on(head: mni.MniHead, ct: Volume, centre: list[float]) -> np.ndarray:
    voxel = float(np.prod(ct.spacing) ** (1 / 3))
    return head.sample(grid_points(ct) - np.asarray(centre), voxel)[0].reshape(ct.shape)


def _case(cohort: Path, index: int) -> tuple[object, dict]:
    pid = f"MNI{SEED:04d}{index:04d}"
    truth = json.loads((cohort / "labels" / pid / "truth.json").read_text())
    return load_case(cohort / "patients" / pid, labels_dir=cohort / "labels"), truth


def test_same_seed_same_patient_other_seed_other_anatomy(mni_cohort: Path, tmp_path: Path) -> None:
    generate_patient(tmp_path, SEED, 1, "small", "nifti", {"n_lesions": 0}, "mni")
    pid = f"MNI{SEED:04d}0001"
    a = load_case(mni_cohort / "patients" / pid)
    b = load_case(tmp_path / "patients" / pid)
    assert a.ct is not None and b.ct is not None
    np.testing.assert_array_equal(a.ct.array, b.ct.array)
    np.testing.assert_array_equal(a.mr[0].array, b.mr[0].array)
    assert (mni_cohort / "patients" / pid / "note.txt").read_text() == (
        tmp_path / "patients" / pid / "note.txt"
    ).read_text()
    # another anatomy seed moves the tissues
    pts = np.random.default_rng(0).uniform(-60, 60, (4000, 3))
    _, h1 = _head(SEED, 1, 0)
    h2 = mni.MniHead.from_phantom(patient_facts(SEED, 1)[0], np.random.default_rng([SEED, 1, 12]))
    assert np.mean(h1.tissue(pts) != h2.tissue(pts)) > 0.05


def test_dicom_reads_back_and_labels_align_with_ct(mni_cohort: Path) -> None:
    case, truth = _case(mni_cohort, 0)
    assert case.ct is not None and len(case.mr) == 1 and not case.errors  # type: ignore[attr-defined]
    labels = case.labels.array  # type: ignore[attr-defined]
    assert case.labels.same_grid(case.ct)  # type: ignore[attr-defined]
    counts = np.bincount(labels.ravel(), minlength=4)
    assert counts.tolist() == list(truth["voxels_per_class"].values())
    assert counts[1] > 0 and truth["anatomy"] == "mni"
    # the label map is the one the CT was rendered from: recomputing the tissue on the CT grid read
    # back from DICOM gives the same lesion voxels (a flipped or shifted label map would not)
    _, head = _head(SEED, 0, 1)
    tissue = _tissue_on(head, case.ct, truth["head_centre_lps"])  # type: ignore[attr-defined]
    again = labels_from_tissue(tissue)
    inter = np.sum((again > 0) & (labels > 0))
    assert 2 * inter / (np.sum(again > 0) + np.sum(labels > 0)) > 0.99
    # and the lesion sits in the brain on the CT: its core's HU are soft tissue, not bone or air
    core_hu = case.ct.array[labels == 1]  # type: ignore[attr-defined]
    assert 15 < np.median(core_hu) < 60


def test_lesions_keep_the_phantom_facts_and_sit_in_white_matter() -> None:
    at = mni.atlas()
    for index in range(6):
        phantom, head = _head(SEED + 100, index, 1 + index % 2)
        assert image_facts(phantom) == image_facts(head)  # type: ignore[arg-type]
        for les in head.lesions:
            a = head.to_atlas(les.core.centre[None])
            assert at.sample("wm", at.index(a))[0] > 0.5
            assert at.sample("sd", at.index(a))[0] < -3.0


def test_hu_and_mr_ranges_per_tissue(mni_cohort: Path) -> None:
    case, truth = _case(mni_cohort, 1)
    ct = case.ct  # type: ignore[attr-defined]
    _, head = _head(SEED, 1, 0)
    tissue = _tissue_on(head, ct, truth["head_centre_lps"])

    def median_hu(t: Tissue, erode: int = 1) -> float:
        mask = ndimage.binary_erosion(tissue == t, iterations=erode) if erode else tissue == t
        assert mask.sum() > 0, t
        return float(np.median(ct.array[mask]))

    wm, gm = median_hu(Tissue.WHITE), median_hu(Tissue.GREY, 0)
    assert 18 < wm < 34 and 3 < gm - wm < 18
    near_bone = ndimage.binary_dilation(
        np.isin(tissue, (Tissue.BONE_CORTEX, Tissue.BONE_DIPLOE)), iterations=2
    )
    assert -5 < float(np.median(ct.array[(tissue == Tissue.CSF) & ~near_bone])) < 25  # ventricles, cisterns
    assert median_hu(Tissue.BONE_CORTEX, 0) > 500
    assert median_hu(Tissue.AIR) < -950
    assert -130 < median_hu(Tissue.FAT, 0) < 20  # thin scalp: partial volume with bone and air
    assert np.max(ct.array[tissue == Tissue.CALC_NORMAL]) > 90
    # MR (its own grid, through the recorded rigid motion): T1c ordering fat > WM > GM > CSF > bone
    mr = case.mr[0]  # type: ignore[attr-defined]
    m = np.asarray(truth["registration"]["matrix_lps"])
    pts = (grid_points(mr) - m[:3, 3]) @ m[:3, :3] - np.asarray(truth["head_centre_lps"])
    t_mr = head.tissue(pts).reshape(mr.shape)

    def median_mr(t: Tissue) -> float:
        return float(np.median(mr.array[ndimage.binary_erosion(t_mr == t)]))

    assert median_mr(Tissue.WHITE) > median_mr(Tissue.GREY) > median_mr(Tissue.CSF)
    assert median_mr(Tissue.CSF) > median_mr(Tissue.AIR)


def test_normal_patients_carry_lesion_like_normal_structures(mni_cohort: Path) -> None:
    case, truth = _case(mni_cohort, 1)
    assert truth["lesions"] == [] and not case.labels.array.any()  # type: ignore[attr-defined]
    ns = truth["normal_structures"]
    assert ns["pineal_calcification"] and ns["choroid_plexus_calcification"]
    # calcified, dense, unlabelled: bright voxels inside the cranium that are not skull
    _, head = _head(SEED, 1, 0)
    tissue = _tissue_on(head, case.ct, truth["head_centre_lps"])  # type: ignore[attr-defined]
    assert np.sum(tissue == Tissue.CALC_NORMAL) >= 3
    assert np.sum(tissue == Tissue.SKULL_BASE) > 100 and np.sum(tissue == Tissue.FALX) > 10
    # prevalence over many normal patients
    rng = np.random.default_rng(3)
    flags = [
        mni.normal_structures(
            mni.MniHead.from_phantom(HeadPhantom.random(rng, 0), np.random.default_rng([9, i]))
        )
        for i in range(200)
    ]
    for name, (lo, hi) in {
        "pineal_calcification": (0.5, 0.7),
        "choroid_plexus_calcification": (0.45, 0.65),
        "falx_calcification": (0.15, 0.35),
        "dense_venous_sinuses": (0.2, 0.4),
    }.items():
        assert lo < np.mean([f[name] for f in flags]) < hi, name


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_dciodvfy_reports_no_errors(mni_cohort: Path) -> None:
    for series in ("CT", "MR"):
        f = next((mni_cohort / "patients").rglob(f"{series}/IM*"))
        res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
        errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors


def test_missing_nilearn_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"medfusion\[mni\]") as err:
        mni.template_dir()
    assert "\n" not in str(err.value)


def test_thick_slice_reconstructions_blur_along_slices_only() -> None:
    """`render_ct` draws a thick-slice reconstruction for about `THICK_SLICE_P` of CTs: its FWHM lies in
    `THICK_SLICE_MM` and a bone edge across slices spreads over more slices than in a thin one, while
    the in-plane edge stays as sharp."""
    _, head = _head(SEED, 1, 0)
    grid = Volume(np.zeros((24, 8, 8), np.float32), (1.6, 1.6, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    tissue = np.full(grid.shape, int(Tissue.WHITE), np.uint8)
    tissue[12:] = int(Tissue.BONE_CORTEX)
    zero = np.zeros(grid.shape, np.float32)
    fwhm, width = [], []
    for s in range(40):
        hu, f = mni.render_ct(head, tissue, zero, tissue, grid, np.random.default_rng(s))
        step = np.clip(np.diff(hu[:, 2:6, 2:6].mean(axis=(1, 2))), 0.0, None)  # the edge's slice profile
        w = step / step.sum()
        x = np.arange(len(w), dtype=float)
        fwhm.append(f)
        width.append(float(np.sqrt(np.sum(w * (x - np.sum(w * x)) ** 2))))  # its s.d., in slices
    thick = np.array([f > 2.0 * 1.5 for f in fwhm])
    assert 4 <= thick.sum() <= 22  # p = 0.3 of 40
    assert all(
        mni.THICK_SLICE_MM[0] <= f <= mni.THICK_SLICE_MM[1] for f, t in zip(fwhm, thick, strict=True) if t
    )
    width_arr = np.array(width)
    # on a coarse grid (3 mm slices: thin profiles up to 4.5 mm) a thick draw is still the thicker
    coarse = Volume(np.zeros((24, 8, 8), np.float32), (2.1, 2.1, 3.0), (0.0, 0.0, 0.0), np.eye(3))
    draws = [
        mni.render_ct(head, tissue, zero, tissue, coarse, np.random.default_rng(s))[1] for s in range(40)
    ]
    assert min(f for f in draws if f > 4.5) >= 4.5 and any(f > 4.5 for f in draws)
    assert np.corrcoef(fwhm, width_arr)[0, 1] > 0.75  # 0.85 measured: kernel and noise vary too
    assert width_arr[thick].mean() > 1.3 * width_arr[~thick].mean()
