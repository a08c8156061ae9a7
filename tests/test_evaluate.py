"""Metrics against independent references (MONAI, scikit-learn), empty cases, and the command."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.evaluate.diagnosis import diagnosis_metrics, ece
from medfusion.evaluate.segmentation import case_metrics, dice, lesion_detection, surface_metrics
from medfusion.io.errors import InputError


def _blob(shape: tuple[int, int, int], centre: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    z, y, x = np.indices(shape)
    d = np.sqrt(((z - centre[0]) * 1.0) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    return d < r + rng.normal(0, 0.8, shape)


def _monai_onehot(m: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(m[None, None].astype(np.float32))


@pytest.mark.parametrize("seed", range(4))
def test_dice_hd95_nsd_match_monai(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (30, 34, 38)
    a = _blob(shape, np.array([15, 17, 19]), 8, rng)
    b = _blob(shape, np.array([15, 18, 18]) + rng.integers(-2, 3, 3), 7, rng)
    spacing = (3.0, 0.8, 1.1)  # z, y, x; anisotropic
    ours = surface_metrics(a, b, spacing, tolerance_mm=2.0)
    hd = float(
        compute_hausdorff_distance(_monai_onehot(a), _monai_onehot(b), percentile=95, spacing=list(spacing))[
            0, 0
        ]
    )
    nsd = float(
        compute_surface_dice(
            _monai_onehot(a),
            _monai_onehot(b),
            class_thresholds=[2.0],
            spacing=list(spacing),
            include_background=True,
        )[0, 0]
    )
    # MONAI returns float32 tensors: agreement is to float32 precision (relative 1e-6)
    assert ours["hd95_mm"] == pytest.approx(hd, rel=1e-6)
    assert ours["nsd"] == pytest.approx(nsd, rel=1e-6)
    inter = np.logical_and(a, b).sum()
    assert dice(a, b) == pytest.approx(2 * inter / (a.sum() + b.sum()), abs=1e-12)


def test_empty_cases_have_documented_values() -> None:
    z = np.zeros((10, 10, 10), bool)
    m = z.copy()
    m[3:6, 3:6, 3:6] = True
    both = surface_metrics(z, z, (1.0, 1.0, 1.0))
    assert both == {"hd95_mm": 0.0, "assd_mm": 0.0, "nsd": 1.0, "empty": "both"}
    miss = surface_metrics(z, m, (1.0, 1.0, 2.0))
    assert miss["empty"] == "pred" and miss["nsd"] == 0.0
    assert miss["hd95_mm"] == pytest.approx(np.linalg.norm([10, 10, 20]))  # image diagonal in mm
    assert dice(z, z) == 1.0 and dice(z, m) == 0.0
    rows = case_metrics(m.astype(np.int16), z.astype(np.int16), (1.0, 1.0, 1.0), ["bg", "a"])
    assert rows[0]["empty"] == "ref" and rows[0]["volume_rel_error"] is None and rows[0]["lesions_fp"] == 1


def test_diagnosis_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.uniform(0, 0.7, 200), 0, 1)
    d = diagnosis_metrics(y, p, {"model": 0.5}, n_boot=200)
    assert d["auroc"]["value"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert d["auprc"]["value"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert d["brier"]["value"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    assert d["auroc"]["ci_low"] < d["auroc"]["value"] < d["auroc"]["ci_high"]
    yhat = p >= 0.5
    assert d["sensitivity@model"]["value"] == pytest.approx(np.sum(yhat & (y == 1)) / np.sum(y == 1))
    assert ece(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0


def _fake_run(cohort: Path, out: Path) -> None:
    """A `medfusion run`-shaped folder whose predictions are the labels, slightly eroded."""
    from scipy import ndimage

    from medfusion.io.nifti import read_nifti, write_nifti

    labels = {r["patient_id"]: r for r in csv.DictReader(open(cohort / "labels" / "labels.csv"))}
    for i, pid in enumerate(sorted(labels)):
        ref = read_nifti(cohort / "labels" / pid / "segmentation.nii.gz")
        arr = ref.array.copy()
        arr[(arr == 2) & ~ndimage.binary_erosion(arr == 2)] = 0
        (out / pid).mkdir(parents=True)
        write_nifti(ref.with_array(arr), out / pid / "segmentation.nii.gz")
        (out / pid / "segmentation.json").write_text(
            json.dumps(
                {"labels": {"0": "background", "1": "tumour_core", "2": "oedema", "3": "calcification"}}
            )
        )
        p = 0.8 if labels[pid]["malignant"] == "1" else 0.3 - 0.1 * i
        (out / pid / "scores.json").write_text(
            json.dumps({"probabilities": {"malignant": p}, "threshold": 0.5})
        )


def _with_positives(cohort: Path, tmp_path: Path) -> Path:
    """A copy of the cohort's labels in which the first patient is malignant (the test cohort has
    none, and AUROC needs both classes)."""
    labels = tmp_path / "mixed" / "labels"
    shutil.copytree(cohort / "labels", labels)
    rows = list(csv.DictReader(open(labels / "labels.csv")))
    rows[0]["malignant"] = "1"
    with open(labels / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return labels.parent


def test_evaluate_command(cohort: Path, tmp_path: Path) -> None:
    cohort = _with_positives(cohort, tmp_path)
    run = tmp_path / "run"
    _fake_run(cohort, run)
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--pred",
            str(run),
            "--labels",
            str(cohort / "labels"),
            "--bootstrap",
            "100",
            "--subgroup",
            "sex",
        ],
    )
    assert res.exit_code == 0, res.output
    ev = run / "evaluation"
    rows = list(csv.DictReader(open(ev / "metrics_per_case.csv")))
    assert {
        "patient_id",
        "class",
        "dice",
        "iou",
        "hd95_mm",
        "assd_mm",
        "nsd",
        "volume_pred_ml",
        "volume_ref_ml",
    } <= set(rows[0])
    core = [float(r["dice"]) for r in rows if r["class"] == "tumour_core" and r["empty"] != "both"]
    assert core and min(core) == 1.0  # core untouched
    summary = json.loads((ev / "metrics_summary.json").read_text())
    assert summary["segmentation"]["oedema"]["dice"]["mean"] < 1.0
    assert {"auroc", "auprc", "brier", "ece"} <= set(summary["diagnosis"])
    assert {"value", "ci_low", "ci_high"} <= set(summary["diagnosis"]["brier"])
    assert (ev / "evaluation.pdf").stat().st_size > 1000 and (ev / "segmentation.png").exists()


def test_reference_in_other_geometry_is_resampled(cohort: Path, tmp_path: Path) -> None:
    from medfusion.io.nifti import read_nifti, write_nifti

    cohort = _with_positives(cohort, tmp_path)
    run = tmp_path / "run"
    _fake_run(cohort, run)
    labels = tmp_path / "labels"
    shutil.copytree(cohort / "labels", labels)
    pid = sorted(p.name for p in run.iterdir())[0]
    ref = read_nifti(labels / pid / "segmentation.nii.gz")
    # the same label map, written with doubled in-plane sampling
    up = np.repeat(np.repeat(ref.array, 2, axis=1), 2, axis=2)
    fine = type(ref)(
        up,
        (ref.spacing[0] / 2, ref.spacing[1] / 2, ref.spacing[2]),
        tuple(ref.index_to_world(np.array([[-0.25, -0.25, 0.0]]))[0]),
        ref.direction,
        "SEG",
    )
    write_nifti(fine, labels / pid / "segmentation.nii.gz")
    res = CliRunner().invoke(
        app, ["evaluate", "--pred", str(run), "--labels", str(labels), "--bootstrap", "50"]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "evaluation" / "metrics_summary.json").read_text())
    assert pid in summary["resampled_references"]


def test_ece_comes_with_what_a_calibrated_model_would_score() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(0.05, 0.95, 100)
    calibrated = (rng.random(100) < p).astype(int)
    d = diagnosis_metrics(calibrated, p, {"model": 0.5}, n_boot=200)
    null = d["ece"]["calibrated_null"]
    # on 100 cases a calibrated model's ECE is far from 0, and this one is not flagged
    assert 0.05 < null["median"] < null["p95"] < 0.25 and null["p_value"] > 0.05
    overconfident = np.where(p > 0.5, 0.99, 0.01)
    d = diagnosis_metrics(calibrated, overconfident, {"model": 0.5}, n_boot=200)
    assert d["ece"]["calibrated_null"]["p_value"] < 0.01


def _evaluated_run(root: Path, dice: dict[str, list[float]], probs: list[float]) -> Path:
    """A run folder as `medfusion run` + `medfusion evaluate` leave it, with given per-case values."""
    (root / "evaluation").mkdir(parents=True)
    lines = ["patient_id,class,dice,empty"]
    for c, vals in dice.items():
        for i, v in enumerate(vals):
            lines.append(f"P{i:03d},{c},{v},{'both' if np.isnan(v) else ''}")
    (root / "evaluation" / "metrics_per_case.csv").write_text("\n".join(lines) + "\n")
    for i, pr in enumerate(probs):
        (root / f"P{i:03d}").mkdir()
        (root / f"P{i:03d}" / "scores.json").write_text(json.dumps({"probabilities": {"malignant": pr}}))
    return root


def test_compare_pairs_the_runs_over_patients(tmp_path: Path) -> None:
    from medfusion.evaluate.compare import compare

    rng = np.random.default_rng(0)
    n = 60
    y = (np.arange(n) % 2).astype(int)
    base = rng.uniform(0.5, 0.9, n)
    base[0] = np.nan  # both masks empty: counts 1 for both runs
    good = np.clip(y * 0.6 + rng.normal(0.2, 0.15, n), 0, 1)
    a = _evaluated_run(tmp_path / "a", {"core": list(base + 0.02)}, list(good))
    b = _evaluated_run(tmp_path / "b", {"core": list(base)}, list(rng.uniform(0, 1, n)))
    (tmp_path / "labels.csv").write_text(
        "patient_id,malignant\n" + "".join(f"P{i:03d},{v}\n" for i, v in enumerate(y))
    )
    res = compare(a, b, tmp_path / "labels.csv", n_boot=500)
    core = res["segmentation"]["core"]
    # a small but consistent gain is significant when paired, though far inside either run's spread
    assert core["delta"] == pytest.approx(0.02 * (n - 1) / n)
    assert 0 < core["ci_low"] <= core["delta"] <= core["ci_high"] and core["p"] < 0.01
    assert (core["better"], core["worse"]) == (n - 1, 0)
    auc = res["diagnosis"]["malignant"]["auroc"]
    assert auc["a"] > 0.9 and auc["delta"] > 0.3 and auc["ci_low"] > 0
    # the same run against itself: no difference
    same = compare(a, a, tmp_path / "labels.csv", n_boot=200)
    assert same["segmentation"]["core"]["delta"] == 0 and same["diagnosis"]["malignant"]["auroc"]["p"] == 1.0
    args = ["compare", "--pred", str(a), "--baseline", str(b), "--labels", str(tmp_path / "labels.csv")]
    result = CliRunner().invoke(app, [*args, "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    assert json.loads((a / "evaluation" / "compare.json").read_text())["b"] == str(b)
    result = CliRunner().invoke(app, [*args, "--bootstrap", "200", "--out", str(tmp_path / "c" / "ab.json")])
    assert json.loads((tmp_path / "c" / "ab.json").read_text())["segmentation"]["core"]["n"] == n
    (b / "evaluation" / "metrics_per_case.csv").unlink()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "medfusion evaluate" in result.output.replace("\n", "")
    with pytest.raises(InputError, match="medfusion evaluate"):
        compare(a, b, tmp_path / "labels.csv")


def test_lesion_fp_split_into_edge_fragments_and_isolated() -> None:
    ref = np.zeros((20, 20, 20), np.int16)
    ref[5:9, 5:9, 5:9] = 1  # a core with no oedema in the reference
    pred = ref.copy()
    pred[9, 5:9, 5:9] = 2  # an oedema rim on the core's face: an edge fragment
    pred[15:17, 15:17, 15:17] = 2  # a lesion far from every reference lesion: a false detection
    pred[16, 16, 16] = 1
    rows = {r["class"]: r for r in case_metrics(pred, ref, (1.0, 1.0, 1.0), ["bg", "core", "oedema"])}
    assert rows["core"]["lesions_tp"] == 1 and rows["core"]["lesions_fp"] == 1
    assert rows["oedema"]["lesions_fp"] == 2 and rows["oedema"]["lesions_fp_isolated"] == 1
    pred[11:13, 5:9, 5:9] = 1  # a lesion two voxels away: isolated too
    detection = lesion_detection(pred, ref, ["bg", "core", "oedema"], (1.0, 1.0, 1.0))
    assert detection["core"]["lesions_fp_isolated"] == 2


def test_calibration_in_the_large_and_slope() -> None:
    from medfusion.evaluate.diagnosis import calibration_in_the_large, calibration_slope

    rng = np.random.default_rng(5)
    z = rng.normal(0.0, 1.5, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)
    calibrated = 1 / (1 + np.exp(-z))
    assert abs(calibration_in_the_large(y, calibrated)) < 0.02
    assert calibration_slope(y, calibrated) == pytest.approx(1.0, abs=0.1)
    too_sharp = 1 / (1 + np.exp(-2 * z))  # over-confident: slope ≈ 1/2
    assert calibration_slope(y, too_sharp) == pytest.approx(0.5, abs=0.06)
    too_low = 1 / (1 + np.exp(-(z - 1.0)))  # every probability too low
    assert calibration_in_the_large(y, too_low) < -0.1
    d = diagnosis_metrics(y[:300], too_low[:300], {"model": 0.5}, n_boot=100)
    assert d["calibration_in_the_large"]["ci_high"] < 0
    assert np.isnan(calibration_slope(y[:10], np.full(10, 0.3)))
    # outcomes the probability separates: no finite slope (not Newton's last iterate)
    sep_y, sep_p = np.array([0, 0, 0, 1, 1]), np.array([0.1, 0.2, 0.4, 0.4, 0.9])
    assert np.isnan(calibration_slope(sep_y, sep_p))
    assert np.isnan(calibration_slope(1 - sep_y, sep_p))
    assert np.isfinite(calibration_slope(np.array([0, 1, 0, 1, 1]), sep_p))  # one pair out of order
    # the same slope as scikit-learn's unpenalised logistic regression on the logit
    from sklearn.linear_model import LogisticRegression

    q = too_sharp[:500]
    ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(np.log(q / (1 - q))[:, None], y[:500])
    assert calibration_slope(y[:500], q) == pytest.approx(float(ref.coef_[0, 0]), rel=1e-4)


# --- Refusals and predictions from other tools (#28, #23) ---


def _eval(*args: str) -> object:
    return CliRunner().invoke(app, ["evaluate", "--bootstrap", "50", *args])


def test_evaluate_refuses_missing_folders_in_one_line(cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _fake_run(cohort, run)
    for args, what in (
        (
            ["--pred", str(tmp_path / "nope"), "--labels", str(cohort / "labels")],
            "predictions folder does not exist",
        ),
        (["--pred", str(run), "--labels", str(tmp_path / "nolabels")], "labels folder or CSV does not exist"),
    ):
        res = _eval(*args)
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and what in res.output
        assert len([line for line in res.output.splitlines() if "error" in line]) == 1
    assert not (run / "evaluation").exists()


def test_evaluate_refuses_predictions_that_share_no_patient_with_the_labels(
    cohort: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    _fake_run(cohort, run)
    for d in sorted(run.iterdir()):
        d.rename(run / f"OTHER{d.name}")
    res = _eval("--pred", str(run), "--labels", str(cohort / "labels"))
    assert res.exit_code == 2, res.output
    assert "no overlap" in res.output and "ece" not in res.output
    assert not (run / "evaluation").exists()  # a refusal writes nothing (was: a header-only CSV)
    assert res.output.strip().splitlines() == [res.output.strip()]  # one line, no progress bar before it


def test_evaluate_refuses_an_unknown_subgroup_before_writing(cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _fake_run(cohort, run)
    res = _eval("--pred", str(run), "--labels", str(cohort / "labels"), "--subgroup", "shoe_size")
    assert res.exit_code == 2, res.output
    assert "no column 'shoe_size'" in res.output and not (run / "evaluation").exists()


def test_evaluate_refuses_metrics_on_two_cases_instead_of_a_degenerate_ci(
    cohort: Path, tmp_path: Path
) -> None:
    cohort = _with_positives(cohort, tmp_path)
    run = tmp_path / "run"
    _fake_run(cohort, run)
    shutil.rmtree(sorted(run.iterdir())[-1])  # 2 patients left: one malignant, one not
    res = _eval("--pred", str(run), "--labels", str(cohort / "labels"))
    assert res.exit_code == 1, res.output
    assert "too few cases for auroc" in res.output and "needs at least 3" in res.output
    assert "95% CI" not in res.output  # no interval from 3 distinct resamples (was 1.000 to 1.000)
    assert "sensitivity (1/1), specificity (1/1)" in res.output  # counts, not rates, on 2 cases
    summary = json.loads((run / "evaluation" / "metrics_summary.json").read_text())
    auroc = summary["diagnosis"]["auroc"]
    assert auroc["value"] is None and auroc["ci_low"] is None and "needs at least 3" in auroc["refused"]


def test_evaluation_names_the_run_and_model_it_evaluated(cohort: Path, tmp_path: Path) -> None:
    from pypdf import PdfReader

    cohort = _with_positives(cohort, tmp_path)
    run = tmp_path / "run-2026-x"
    _fake_run(cohort, run)
    (run / "run.json").write_text(json.dumps({"model": {"name": "medfusion-default", "version": "9.9.9"}}))
    res = _eval("--pred", str(run), "--labels", str(cohort / "labels"))
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "evaluation" / "metrics_summary.json").read_text())
    assert summary["model"] == "medfusion-default 9.9.9" and summary["run"] == str(run.resolve())
    text = " ".join(
        page.extract_text() for page in PdfReader(str(run / "evaluation" / "evaluation.pdf")).pages
    )
    assert "9.9.9" in " ".join(text.split())


def test_evaluate_says_n_and_refuses_metrics_it_cannot_compute(cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _fake_run(cohort, run)
    keep = sorted(d.name for d in run.iterdir())[0]
    for d in run.iterdir():
        if d.name != keep:
            shutil.rmtree(d)
    res = _eval("--pred", str(run), "--labels", str(cohort / "labels"))
    assert res.exit_code == 1, res.output  # one patient: no AUROC, said in one line
    assert "2 of 3 labelled patient(s) have no prediction" in res.output
    assert "n = 1" in res.output and "too few cases for auroc" in res.output
    assert "sensitivity" in res.output and "specificity" in res.output


def test_evaluate_reports_sensitivity_at_the_threshold(cohort: Path, tmp_path: Path) -> None:
    cohort = _with_positives(cohort, tmp_path)
    run = tmp_path / "run"
    _fake_run(cohort, run)
    res = _eval("--pred", str(run), "--labels", str(cohort / "labels"))
    assert res.exit_code == 0, res.output
    labels = list(csv.DictReader(open(cohort / "labels" / "labels.csv")))
    pos = sum(r["malignant"] == "1" for r in labels)
    # _fake_run gives every malignant patient p = 0.8 ≥ 0.5: all found
    assert f"sensitivity 1.000 ({pos}/{pos})" in res.output, res.output
    assert f"n = {len(labels)}" in res.output


def test_evaluate_counts_the_flagged_and_scores_the_in_domain_cases_apart(
    cohort: Path, tmp_path: Path
) -> None:
    cohort = _with_positives(cohort, tmp_path)
    run = tmp_path / "run"
    _fake_run(cohort, run)
    pids = sorted(p.name for p in run.iterdir())
    # the last patient flagged with a confident wrong answer: it counts in "all", not "in domain"
    flagged = pids[-1]
    sc = json.loads((run / flagged / "scores.json").read_text())
    sc["probabilities"]["malignant"] = 0.99
    sc["domain"] = {"in_domain": False, "reasons": ["no skull ring"]}
    (run / flagged / "scores.json").write_text(json.dumps(sc))
    for pid in pids[:-1]:
        sc = json.loads((run / pid / "scores.json").read_text())
        sc["domain"] = {"in_domain": True, "reasons": []}
        (run / pid / "scores.json").write_text(json.dumps(sc))
    res = _eval("--pred", str(run), "--labels", str(cohort / "labels"), "--bootstrap", "50")
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "evaluation" / "metrics_summary.json").read_text())
    dom = summary["domain"]
    assert (dom["n_flagged"], dom["n_in_domain"], dom["flagged"]) == (1, len(pids) - 1, [flagged])
    diag = summary["diagnosis"]
    assert diag["n"] == len(pids) and diag["in_domain"]["n"] == len(pids) - 1
    assert diag["confusion"]["fp"] == 1 and diag["in_domain"]["confusion"]["fp"] == 0
    assert (
        "1 of" in res.output
        and "flagged" in res.output
        and f"in domain only: n = {len(pids) - 1}" in res.output
    )


def test_evaluate_numbers_classes_without_segmentation_json(cohort: Path, tmp_path: Path) -> None:
    cohort = _with_positives(cohort, tmp_path)
    run = tmp_path / "run"
    _fake_run(cohort, run)
    for f in run.glob("*/segmentation.json"):
        f.unlink()
    res = _eval("--pred", str(run), "--labels", str(cohort / "labels"))
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "evaluation" / "metrics_summary.json").read_text())
    assert {"1", "2"} <= set(summary["segmentation"]) and summary["class_names"].startswith("numbered")
    res = _eval(
        "--pred",
        str(run),
        "--labels",
        str(cohort / "labels"),
        "--classes",
        "bg,core,oedema,calc",
        "--out",
        str(tmp_path / "e"),
    )
    assert res.exit_code == 0, res.output
    named = json.loads((tmp_path / "e" / "metrics_summary.json").read_text())
    assert named["segmentation"]["core"]["dice"]["mean"] == summary["segmentation"]["1"]["dice"]["mean"]


def test_evaluate_refuses_a_segmentation_json_without_labels_in_one_line(
    cohort: Path, tmp_path: Path
) -> None:
    cohort = _with_positives(cohort, tmp_path)
    run = tmp_path / "run"
    _fake_run(cohort, run)
    bad = sorted(run.glob("*/segmentation.json"))[0]
    for text in ("{}", "[1]", '{"labels": {"1": "core"}}', "{"):
        bad.write_text(text)
        res = _eval("--pred", str(run), "--labels", str(cohort / "labels"))
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and f"{bad.parent.name}/segmentation.json" in res.output
        assert len([line for line in res.output.splitlines() if "error" in line.lower()]) == 1, res.output
    assert not (run / "evaluation").exists()
