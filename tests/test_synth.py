"""Synthetic patients: valid DICOM, loader agreement, label alignment, HU ranges, exact misalignment, oracle gap."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from sklearn.metrics import roc_auc_score

from medfusion.io.case import load_case
from medfusion.io.volume import Volume
from medfusion.synth import notes
from medfusion.synth.generate import _priors, draw_label, generate_patient, image_facts, patient_facts

REQUIRED = [
    "PatientID",
    "PatientName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "Manufacturer",
    "FrameOfReferenceUID",
]


def _pids(cohort: Path) -> list[str]:
    return sorted(p.name for p in (cohort / "patients").iterdir())


def test_every_dicom_file_reads_with_tags(cohort: Path) -> None:
    n = 0
    for f in (cohort / "patients").rglob("IM*"):
        ds = pydicom.dcmread(f)
        for tag in REQUIRED:
            assert tag in ds, f"{f}: {tag}"
        if ds.Modality == "CT":
            assert float(ds.RescaleIntercept) == -1024
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        n += 1
    assert n > 100


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
def test_dciodvfy_reports_no_errors(cohort: Path) -> None:
    for series in ("CT", "MR"):
        f = next((cohort / "patients").rglob(f"{series}/IM*"))
        res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
        errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors


def _truth(cohort: Path, pid: str) -> dict:
    return json.loads((cohort / "labels" / pid / "truth.json").read_text())


def test_loader_reads_every_patient_and_labels_align(cohort: Path) -> None:
    for pid in _pids(cohort):
        case = load_case(cohort / "patients" / pid, labels_dir=cohort / "labels")
        assert case.ct is not None and len(case.mr) == 1 and not case.errors
        assert case.labels is not None and case.labels.same_grid(case.ct)
        assert case.note
        truth = _truth(cohort, pid)
        counts = np.bincount(case.labels.array.ravel(), minlength=4)
        assert counts.tolist() == list(truth["voxels_per_class"].values())
        assert (counts[1] > 0) == bool(truth["lesions"])
        # the head centre recorded in truth lies at the middle of the CT grid's head mask
        head = np.argwhere(case.ct.array > -500)[:, ::-1].mean(axis=0)
        assert np.linalg.norm(case.ct.index_to_world(head)[0] - truth["head_centre_lps"]) < 8.0


def test_ct_values_in_hu_ranges(cohort: Path) -> None:
    pid = _pids(cohort)[0]
    case = load_case(cohort / "patients" / pid, labels_dir=cohort / "labels")
    assert case.ct is not None and case.labels is not None
    ct = case.ct.array.astype(np.float32)
    assert ct.min() >= -1024 and -1010 < np.median(ct[ct < -500]) < -990  # air
    assert 1000 < np.percentile(ct, 99.9) <= 1600  # bone
    brain = (ct > 0) & (ct < 60)
    assert 20 < np.median(ct[brain]) < 45


def _mr_on_ct(case_mr: Volume, ct: Volume, matrix: np.ndarray) -> np.ndarray:
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(matrix[:3, :3].ravel().tolist())
    tx.SetTranslation(matrix[:3, 3].tolist())
    out = sitk.Resample(case_mr.to_sitk(), ct.to_sitk(), tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def test_recorded_misalignment_is_exact(cohort: Path) -> None:
    pid = _pids(cohort)[1]
    case = load_case(cohort / "patients" / pid)
    assert case.ct is not None
    m = np.array(_truth(cohort, pid)["registration"]["matrix_lps"])
    head_ct = case.ct.array > -500

    def dice(matrix: np.ndarray) -> float:
        head_mr = _mr_on_ct(case.mr[0], case.ct, matrix) > 100
        return 2 * np.sum(head_ct & head_mr) / (np.sum(head_ct) + np.sum(head_mr))

    off = m.copy()
    off[:3, 3] += 6.0
    d_true, d_off = dice(m), dice(off)
    print(f"head-mask Dice with the recorded transform {d_true:.3f}, 6 mm off {d_off:.3f}")
    assert d_true > 0.94
    assert d_off < d_true - 0.04


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = generate_patient(tmp_path / "a", 5, 0, "small")
    b = generate_patient(tmp_path / "b", 5, 0, "small")
    assert a == b
    ta = (tmp_path / "a" / "labels" / a["patient_id"] / "truth.json").read_text()
    tb = (tmp_path / "b" / "labels" / b["patient_id"] / "truth.json").read_text()
    assert ta == tb


def test_oracle_gap_on_500_patients() -> None:
    imgs, nts = _priors()
    y: list[int] = []
    probs: dict[str, list[float]] = {"all": [], "image": [], "note": []}
    for i in range(500):
        head, nf, _ = patient_facts(2024, i)
        facts = image_facts(head)
        p = float(1 / (1 + np.exp(-notes.logit(facts, nf))))
        y.append(draw_label(2024, i, p))
        for k, v in notes.oracle_probabilities(
            facts, nf, imgs, nts, np.random.default_rng([2024, i, 7])
        ).items():
            probs[k].append(v)
    auc = {k: roc_auc_score(y, v) for k, v in probs.items()}
    print(
        f"prevalence {np.mean(y):.3f}; oracle AUROC all {auc['all']:.3f} image {auc['image']:.3f} note {auc['note']:.3f}"
    )
    assert 0.25 < np.mean(y) < 0.65
    assert auc["all"] - auc["image"] >= 0.08
    assert auc["all"] - auc["note"] >= 0.08


def test_rotation_matrix_is_scipys_extrinsic_xyz_and_the_explicit_product() -> None:
    """`rotation_matrix` (scipy's Rotation) gives the matrices the generator's hand-written Rz·Ry·Rx
    gave, to rounding (≤ 1e-15), for the angles it draws; a swapped axis order would not."""
    from medfusion.synth.generate import MAX_ROTATION_DEG, rotation_matrix

    def explicit(angles_deg: np.ndarray) -> np.ndarray:
        ax, ay, az = np.radians(angles_deg)
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx

    rng = np.random.default_rng(0)
    for _ in range(200):
        angles = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3)
        r = rotation_matrix(angles)
        assert np.abs(r - explicit(angles)).max() < 1e-15
        assert np.allclose(r @ r.T, np.eye(3), atol=1e-15) and np.isclose(np.linalg.det(r), 1.0)
    angles = np.array([10.0, -5.0, 12.0])
    assert not np.allclose(rotation_matrix(angles), explicit(angles[::-1]), atol=1e-3)


def test_generator_and_training_share_one_list_of_classes_and_scores(cohort: Path) -> None:
    """The label codes the generator writes, the names in its cohort.json and labels.csv, and the
    training defaults all come from medfusion.labels."""
    from medfusion.labels import CLASS_NAMES, SCORE_NAMES, Label
    from medfusion.synth.phantom import Tissue, labels_from_tissue
    from medfusion.train.config import DataConfig, TrainConfig

    meta = json.loads((cohort / "labels" / "cohort.json").read_text())
    assert meta["class_names"] == list(CLASS_NAMES) and meta["score_names"] == list(SCORE_NAMES)
    header = (cohort / "labels" / "labels.csv").read_text().splitlines()[0].split(",")
    assert set(SCORE_NAMES) <= set(header)
    codes = labels_from_tissue(np.array([Tissue.WHITE, Tissue.NECROSIS, Tissue.OEDEMA, Tissue.CALCIFICATION]))
    assert [CLASS_NAMES[c] for c in codes] == ["background", "tumour_core", "oedema", "calcification"]
    assert list(codes) == [Label.BACKGROUND, Label.TUMOUR_CORE, Label.OEDEMA, Label.CALCIFICATION]
    cfg = TrainConfig(data=DataConfig(patients="p", labels="l"))
    assert cfg.class_names == list(CLASS_NAMES) and cfg.score_names == list(SCORE_NAMES)
