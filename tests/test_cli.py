"""The command line itself (#28, #29): clean help, command lines rebuilt from the options given (the
resume hint, the torchrun relaunch), a stop during the first seconds, refusals against the setup of
an earlier run. None of these runs the model."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import pytest
import typer
from typer.testing import CliRunner

from medfusion.cli import _resume_command, app, torchrun_command
from medfusion.config import PipelineConfig

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "patients"
# typer's type markers: <path>, <str>, <int range>, <list[Path]>, {FOLDER}
MARKER = re.compile(r"<(?:path|str|text|int|float|bool|integer|list\[\w+\]|\w+ range)>|\{[A-Z_]+\}", re.I)


def _commands() -> list[list[str]]:
    group: Any = typer.main.get_command(app)  # typer's TyperGroup
    out: list[list[str]] = [[]]
    for name, cmd in group.commands.items():
        out.append([name])
        out += [[name, sub] for sub in getattr(cmd, "commands", {})]
    return out


@pytest.mark.parametrize("words", _commands(), ids=lambda w: " ".join(w) or "medfusion")
def test_help_is_plain(words: list[str]) -> None:
    res = CliRunner().invoke(app, [*words, "--help"])
    assert res.exit_code == 0, res.output
    assert not MARKER.findall(res.output), res.output
    if words == ["run"]:
        assert "run [OPTIONS] FOLDER..." in res.output and "FOLDER...  Patient folder" in res.output
        assert "--out PATH" in res.output and "--workers N" in res.output


def _context(command: str, args: list[str]) -> click.Context:
    group: Any = typer.main.get_command(app)
    ctx: click.Context = group.commands[command].make_context(command, list(args))
    return ctx


def _params(command: str, args: list[str]) -> dict[str, Any]:
    return dict(_context(command, args).params)


def test_the_resume_hint_repeats_every_option_of_the_run(tmp_path: Path) -> None:
    args = [
        str(SAMPLE),
        "--out",
        str(tmp_path / "o"),
        "--device",
        "cpu",
        "--workers",
        "2",
        "--retries",
        "3",
        "--modality",
        "t1=MR",
        "--modality",
        "ct=CT",
        "--only",
        "SYN20260001,SYN20260002",
        "--pipeline",
        "p.yaml",
        "--model",
        "pkg",
        "--overwrite",
    ]
    ctx = _context("run", args)
    hint = _resume_command(ctx, tmp_path / "o")  # type: ignore[arg-type]
    assert hint[:2] == ["medfusion", "run"]
    again = _params("run", hint[2:])
    expected = _params("run", args) | {"resume": True, "overwrite": False}
    assert again == expected
    assert hint.count("--modality") == 2 and "--retries" in hint and "--resume" in hint


def test_torchrun_relaunch_keeps_package_only_and_epochs_zero(tmp_path: Path) -> None:
    args = ["--config", "t.yaml", "--out", str(tmp_path), "--epochs", "0", "--package-only"]
    ctx = _context("train", [*args, "--nproc-per-node", "2"])
    cmd = torchrun_command(ctx, 2)  # type: ignore[arg-type]
    assert cmd[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    i = cmd.index("train")
    assert cmd[i - 2 : i] == ["-m", "medfusion.cli"]
    assert _params("train", cmd[i + 1 :]) == _params("train", args)  # --nproc-per-node not passed on
    assert "--package-only" in cmd and cmd[cmd.index("--epochs") + 1] == "0"


def test_train_starts_torchrun_with_that_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def call(cmd: list[str]) -> int:
        calls.append(cmd)
        return 0

    monkeypatch.setattr(subprocess, "call", call)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = Path(__file__).resolve().parents[1] / "pipelines" / "train_default.yaml"
    res = CliRunner().invoke(
        app,
        ["train", "--config", str(config), "--out", str(tmp_path), "--epochs", "0", "--package-only"]
        + ["--nproc-per-node", "2"],
    )
    assert res.exit_code == 0, res.output
    assert len(calls) == 1 and "--package-only" in calls[0] and "--epochs" in calls[0]


def _wait_for_handler(proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """Until the process catches SIGTERM (medfusion's stop handler is installed; Linux /proc)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            break
        caught = int(re.search(r"SigCgt:\s*([0-9a-f]+)", status).group(1), 16)  # type: ignore[union-attr]
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.01)
    pytest.skip("could not see the stop handler installed")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_signal_during_the_first_seconds_is_a_clean_stop(tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "medfusion.cli", "run", str(SAMPLE), "--out", str(out), "--device", "cpu"]
    cmd += ["--retries", "2", "--modality", "x=CT"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_handler(proc)
    proc.send_signal(sig)  # torch and the pipeline are still being imported
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + int(sig), err
    assert "Traceback" not in err and f"interrupted ({sig.name})" in err, err
    assert len(err.strip().splitlines()) == 1, err
    hint = err.split("Resume with: ", 1)[1].split()
    assert hint[:2] == ["medfusion", "run"] and "--resume" in hint
    assert hint[hint.index("--retries") + 1] == "2" and hint[hint.index("--modality") + 1] == "x=CT"


# --- An earlier run's setup (refused before any work) ---


def _earlier_run(out: Path, *, version: str | None = None, config: PipelineConfig | None = None) -> None:
    """An output folder as a run of the shipped model (another `version`) with `config` left it."""
    from medfusion.run.cohort import model_identity

    model = model_identity(None)
    if version:
        model["version"] = version
    d = out / "SYN20260001"
    d.mkdir(parents=True)
    # a complete result (the output contract; --resume runs a patient whose result does not fit it again)
    from medfusion.run.result import CaseResult, QCRecord, Scores

    scores = {
        "patient_id": d.name,
        "probabilities": {"malignant": 0.2},
        "predicted": {"malignant": False},
        "threshold": 0.5,
        "uncertainty": {"malignant": 0.01},
        "domain": {"in_domain": True, "reasons": []},
        "measurements": {
            "volumes_ml": {},
            "lesion_count": 0,
            "largest_diameter_mm": 0.0,
            "lesion_diameters_mm": [],
            "lesions": [],
        },
        "model": model,
        "qc_verdict": "pass",
    }
    result = CaseResult(scores=Scores.model_validate(scores), qc=QCRecord(patient_id=d.name))
    result.write_qc(d)
    result.write_scores(d)
    cfg = config or PipelineConfig()
    (out / "run.json").write_text(json.dumps({"config": cfg.model_dump(mode="json"), "model": model}))


def test_resume_of_a_run_made_by_another_model_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "o"
    _earlier_run(out, version="0.0.1")
    res = CliRunner().invoke(app, ["run", str(SAMPLE), "--out", str(out), "--device", "cpu", "--resume"])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and "--resume" in line and "model version ('0.0.1' →" in line, line
    assert not (out / "summary.csv").exists()


def test_resume_with_another_pipeline_config_is_refused_and_names_the_setting(tmp_path: Path) -> None:
    out = tmp_path / "o"
    cfg = PipelineConfig()
    cfg.infer.mc_samples = cfg.infer.mc_samples + 3
    _earlier_run(out, config=cfg)
    res = CliRunner().invoke(app, ["run", str(SAMPLE), "--out", str(out), "--device", "cpu", "--resume"])
    assert res.exit_code == 2, res.output
    assert "config infer.mc_samples" in res.output and len(res.output.strip().splitlines()) == 1
    # the device is not part of the setup: a run may resume on another machine
    cfg = PipelineConfig()
    cfg.infer.device = "cuda"
    out2 = tmp_path / "o2"
    _earlier_run(out2, config=cfg)
    from medfusion.run.cohort import plan_cohort
    from medfusion.run.pipeline import RunOptions

    opts = RunOptions(out=out2, pipeline=PipelineConfig(), device="cpu", resume=True)
    plan = plan_cohort(sorted(SAMPLE.iterdir()), opts)
    assert plan.resumed == ["SYN20260001"] and len(plan.todo) == len(list(SAMPLE.iterdir())) - 1


def test_refusals_print_one_line_and_no_progress_bar(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app, ["run", str(SAMPLE), "--out", str(tmp_path / "o"), "--device", "cpu", "--only", "NOPE"]
    )
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        "error: --only: no patient folder named NOPE (found 7 patient folder(s))"
    ]


def test_model_identity_holds_what_the_predictor_describes() -> None:
    from medfusion.infer.predictor import Predictor
    from medfusion.run.cohort import model_identity

    described = Predictor(None, "cpu").describe()
    identity = model_identity(None)
    assert {k: identity[k] for k in described} == described
    assert identity["domain_sha256"]  # the shipped package has a fitted guard


def test_an_out_holding_foreign_folders_named_like_the_patients_is_refused_before_any_work(
    tmp_path: Path,
) -> None:
    out = tmp_path / "labels"  # e.g. a copy of the reference labels: SYN…/segmentation.nii.gz
    (out / "SYN20260001").mkdir(parents=True)
    (out / "SYN20260001" / "segmentation.nii.gz").write_bytes(b"reference")
    res = CliRunner().invoke(app, ["run", str(SAMPLE), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and "SYN20260001" in line and "not medfusion outputs" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["SYN20260001"]  # nothing written there
    assert (out / "SYN20260001" / "segmentation.nii.gz").read_bytes() == b"reference"


def test_inspect_of_a_folder_without_patients_is_refused(tmp_path: Path) -> None:
    (tmp_path / "EMPTY").mkdir()
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "EMPTY")])
    assert res.exit_code != 0 and "no patient folder" in res.output, res.output


def test_register_without_an_mr_is_refused_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    import shutil

    patient = tmp_path / "CTONLY"
    shutil.copytree(SAMPLE / "SYN20260001" / "CT", patient / "CT")
    out = tmp_path / "reg"
    res = CliRunner().invoke(app, ["register", str(patient), "--out", str(out)])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and "CTONLY" in line and "at least one MR" in line, line
    assert not out.exists()


def test_the_cli_imports_the_device_choice_and_packages_from_their_homes() -> None:
    """The CLI parses options and prints (#29): no re-exported helpers, no pipeline work of its own."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parents[1] / "medfusion" / "cli.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "medfusion.models.package" not in imported and "medfusion.device" in imported
    assert not imported & {
        "medfusion.preprocess.registration",
        "medfusion.preprocess.resample",
        "medfusion.io.nifti",
    }
