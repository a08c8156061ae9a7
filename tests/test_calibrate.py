"""`medfusion calibrate`: the temperature refitted on a labelled run, written as a new package."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from medfusion.cli import app
from medfusion.io.errors import InputError
from medfusion.package import DEFAULT_PACKAGE, load_package, read_meta, read_package_meta
from medfusion.train.calibrate import describe, recalibrate, recalibration_map


def fake_run(
    tmp: Path, sharpen: float, n: int = 400, seed: int = 0, sha: str | None = None, shift: float = 0.0
) -> tuple[Path, Path]:
    """A run whose probabilities are sigmoid(sharpen · z + shift) for outcomes drawn as
    Bernoulli(sigmoid(z)): over-confident for sharpen > 1, too low for shift < 0, calibrated at (1, 0)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    sha = sha or read_meta(DEFAULT_PACKAGE)["weights_sha256"]
    run, labels = tmp / "run", tmp / "labels"
    labels.mkdir(parents=True)
    with open(labels / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "malignant"])
        for i in range(n):
            pid = f"P{i:04d}"
            w.writerow([pid, y[i]])
            (run / pid).mkdir(parents=True)
            scores = {"probabilities": {"malignant": float(1 / (1 + np.exp(-(sharpen * z[i] + shift))))}}
            (run / pid / "scores.json").write_text(json.dumps({**scores, "model": {"weights_sha256": sha}}))
    (run / "run.json").write_text(json.dumps({"config": {"name": "default"}}))
    return run, labels


def _only_these_differ(out: Path, keys: set[str]) -> None:
    old, new = (
        load_file(str(DEFAULT_PACKAGE / "weights.safetensors")),
        load_file(str(out / "weights.safetensors")),
    )
    assert set(old) == set(new)
    assert {k for k in old if not torch.equal(old[k], new[k])} <= keys
    # typed: the new model.json is written through `PackageMeta`, the shipped one by an older hand
    changed = {"version", "weights_sha256", "recalibration"}
    new, old_meta = read_package_meta(out).to_json(), read_package_meta(DEFAULT_PACKAGE).to_json()
    assert {k: v for k, v in new.items() if k not in changed} == {
        k: v for k, v in old_meta.items() if k not in changed
    }
    assert new["recalibration"]["from"] == {k: old_meta[k] for k in ("name", "version", "weights_sha256")}


def test_temperature_method_undoes_overconfidence(tmp_path: Path) -> None:
    run, labels = fake_run(tmp_path, sharpen=2.0)
    out = tmp_path / "pkg"
    rec = recalibrate(run, labels, out, method="temperature")
    r = rec["scores"]["malignant"]
    before = float(load_file(str(DEFAULT_PACKAGE / "weights.safetensors"))["temperature"][0])
    assert r["temperature_before"] == pytest.approx(before)
    assert 1.6 < r["temperature_after"] / before < 2.5  # the sharpening undone (sampling noise aside)
    assert r["fitted_cohort_after"]["nll"] < r["fitted_cohort_before"]["nll"]
    assert r["fitted_cohort_after"]["ece"] < r["fitted_cohort_before"]["ece"]
    model, meta = load_package(out)  # hash and every weight check out
    assert float(model.temperature[0]) == pytest.approx(r["temperature_after"], rel=1e-6)
    assert meta.version.endswith("+recalibrated") and meta.block("recalibration")["run_config"] == {
        "name": "default"
    }
    _only_these_differ(out, {"temperature"})
    assert not list(tmp_path.glob(".tmp-*"))


def test_platt_moves_the_mean_and_the_package_computes_exactly_that(tmp_path: Path) -> None:
    from medfusion.measure.features import FEATURES

    run, labels = fake_run(tmp_path, sharpen=1.0, shift=-1.0)  # every probability too low
    out = tmp_path / "pkg"
    r = recalibrate(run, labels, out, version="9.9.9")["scores"]["malignant"]
    assert 0.8 < r["slope"] < 1.25 and 0.7 < r["intercept"] < 1.3
    assert r["fitted_cohort_after"]["ece"] < r["fitted_cohort_before"]["ece"]
    # a temperature alone cannot move the mean: it fits this cohort worse
    t = recalibrate(run, labels, tmp_path / "t", method="temperature")["scores"]["malignant"]
    assert r["fitted_cohort_after"]["nll"] < t["fitted_cohort_after"]["nll"] - 0.01
    _only_these_differ(out, {"temperature", "head_bias"})
    # the new package's probability is sigmoid(slope · logit(old probability) + intercept), for any input
    old, _ = load_package(DEFAULT_PACKAGE)
    new, meta = load_package(out)
    assert meta.version == "9.9.9"
    torch.manual_seed(0)
    head_in = torch.randn(5, old.score_head[0].in_features)
    note = torch.randn(5, 1)
    meas = torch.rand(5, len(FEATURES)) * 3
    with torch.no_grad():
        p_old = old.calibrated(old.score_logits(head_in, note, meas)).double()
        p_new = new.calibrated(new.score_logits(head_in, note, meas)).double()
    expect = torch.sigmoid(r["slope"] * torch.logit(p_old) + r["intercept"])
    assert torch.allclose(p_new, expect, atol=1e-5)
    # the record in model.json maps the old package's probabilities onto the new one's, and back
    fit = meta.block("recalibration")["scores"]["malignant"]
    mapped = recalibration_map(fit, p_old.numpy().ravel())
    assert np.allclose(mapped, p_new.numpy().ravel(), atol=1e-5)
    assert np.allclose(recalibration_map(fit, mapped, inverse=True), p_old.numpy().ravel(), atol=1e-9)


def test_a_calibrated_run_keeps_its_calibration(tmp_path: Path) -> None:
    run, labels = fake_run(tmp_path, sharpen=1.0, seed=1)
    r = recalibrate(run, labels, tmp_path / "pkg")["scores"]["malignant"]
    assert 0.85 < r["slope"] < 1.18 and abs(r["intercept"]) < 0.25
    r = recalibrate(run, labels, tmp_path / "pkg2", method="temperature")["scores"]["malignant"]
    assert 0.85 < r["temperature_after"] / r["temperature_before"] < 1.18


def test_refusals_name_the_problem_and_write_nothing(tmp_path: Path) -> None:
    run, labels = fake_run(tmp_path / "a", sharpen=2.0, sha="0" * 64)
    with pytest.raises(InputError, match="scores.json.*not by the package"):
        recalibrate(run, labels, tmp_path / "p1")
    run, labels = fake_run(tmp_path / "b", sharpen=2.0, n=15)
    with pytest.raises(InputError, match="at least 10 of each"):
        recalibrate(run, labels, tmp_path / "p2")
    (tmp_path / "p3").mkdir()
    with pytest.raises(InputError, match="already exists"):
        recalibrate(run, labels, tmp_path / "p3")
    assert not (tmp_path / "p1").exists() and not (tmp_path / "p2").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_cli_calibrate(tmp_path: Path) -> None:
    run, labels = fake_run(tmp_path, sharpen=2.0, n=120)
    res = CliRunner().invoke(
        app, ["calibrate", "--pred", str(run), "--labels", str(labels), "--out", str(tmp_path / "pkg")]
    )
    assert res.exit_code == 0, res.output
    assert "malignant: slope" in res.output and (tmp_path / "pkg" / "model.json").exists()
    res = CliRunner().invoke(
        app, ["calibrate", "--pred", str(run), "--labels", str(labels), "--out", str(tmp_path / "pkg")]
    )
    assert res.exit_code != 0 and "already exists" in res.output
    res = CliRunner().invoke(
        app,
        [
            "calibrate",
            "--pred",
            str(run),
            "--labels",
            str(labels),
            "--out",
            str(tmp_path / "p2"),
            "--method",
            "x",
        ],
    )
    assert res.exit_code != 0 and "platt or temperature" in res.output and not (tmp_path / "p2").exists()


def test_pooled_runs_fit_as_one_cohort(tmp_path: Path) -> None:
    run_a, lab_a = fake_run(tmp_path / "a", sharpen=1.0, shift=-1.0, n=200, seed=3)
    run_b, lab_b = fake_run(tmp_path / "b", sharpen=1.0, shift=-1.0, n=200, seed=4)
    rec = recalibrate([run_a, run_b], [lab_a, lab_b], tmp_path / "pkg")
    r = rec["scores"]["malignant"]
    assert r["n"] == 400 and isinstance(rec["pred"], list) and len(rec["labels"]) == 2
    # the same as one run holding both cohorts (patient ids repeat across the two: kept apart)
    both = tmp_path / "both"
    (both / "labels").mkdir(parents=True)
    rows = [list(csv.reader(open(lab / "labels.csv"))) for lab in (lab_a, lab_b)]
    with open(both / "labels" / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(rows[0][0])
        for k, (run, table) in enumerate(zip((run_a, run_b), rows, strict=True)):
            for pid, y in table[1:]:
                w.writerow([f"{k}{pid}", y])
                (both / "run" / f"{k}{pid}").mkdir(parents=True)
                (both / "run" / f"{k}{pid}" / "scores.json").write_text(
                    (run / pid / "scores.json").read_text()
                )
    one = recalibrate(both / "run", both / "labels", tmp_path / "pkg1")["scores"]["malignant"]
    assert r["slope"] == pytest.approx(one["slope"], rel=1e-6)
    assert r["intercept"] == pytest.approx(one["intercept"], rel=1e-6)
    with pytest.raises(ValueError, match="one labels per run"):
        recalibrate([run_a, run_b], [lab_a, lab_b, lab_a], tmp_path / "pkg2")
    res = CliRunner().invoke(
        app,
        [
            "calibrate",
            "--pred",
            str(run_a),
            "--labels",
            str(lab_a),
            "--pred",
            str(run_b),
            "--labels",
            str(lab_b),
        ]
        + ["--out", str(tmp_path / "pkg3")],
    )
    assert res.exit_code == 0, res.output
    assert read_meta(tmp_path / "pkg3")["recalibration"]["scores"]["malignant"]["n"] == 400
    assert "warning" not in res.output
    (run_b / "run.json").write_text(json.dumps({"config": {"name": "other"}}))
    rec = recalibrate([run_a, run_b], [lab_a, lab_b], tmp_path / "pkg4")
    assert rec["run_config_differs"] and "different pipeline settings" in describe(rec)[-1]
