"""Training: a tiny run whose loss falls and whose package reloads; DDP with 2 gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from medfusion.package import load_package
from medfusion.train.config import TrainConfig
from medfusion.train.data import split_patients
from medfusion.train.distributed import process_device
from medfusion.train.finetune import reinit_seg_rows
from medfusion.train.loop import Trainer, train
from medfusion.train.temperature import fit_temperature


def _cfg(cohort: Path, cache: Path, **kw: object) -> dict:
    cfg = {
        "name": "tiny",
        "data": {
            "patients": str(cohort / "patients"),
            "labels": str(cohort / "labels"),
            "cache": str(cache),
            "val_fraction": 0.34,
        },
        "network": {"fusion": "sequence", "channels": [4, 8, 16, 32]},
        "preprocess": {
            "target_spacing_mm": 4.0,
            "target_size": [48, 48, 48],
            "registration": {"consistency_check": False},
        },
        "epochs": 4,
        "steps_per_epoch": 4,
        "batch_size": 2,
        "crop_size": [32, 32, 32],
        "lr": 0.003,
        "workers": 1,
        "threads": 1,
    }
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def cache(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_tiny_training_loss_falls_and_package_reloads(cohort: Path, cache: Path, tmp_path: Path) -> None:
    os.environ["MEDFUSION_QUIET"] = "1"
    cfg = TrainConfig.model_validate(_cfg(cohort, cache))
    summary = train(cfg, tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    print("losses", [round(r["loss"], 3) for r in log])
    assert log[-1]["loss"] < log[0]["loss"]
    model, meta = load_package(summary["package"])
    assert meta.name == "tiny" and list(meta.preprocess.target_size) == [48, 48, 48]
    assert "." in meta.vocabulary and any(w.startswith("<num_") for w in meta.vocabulary)


def test_resume_continues_from_checkpoint(cohort: Path, cache: Path, tmp_path: Path) -> None:
    os.environ["MEDFUSION_QUIET"] = "1"
    train(TrainConfig.model_validate(_cfg(cohort, cache, epochs=2)), tmp_path / "r")
    train(TrainConfig.model_validate(_cfg(cohort, cache, epochs=3)), tmp_path / "r", resume=True)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "r" / "train.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_init_from_starts_from_a_package_and_checks_its_network(
    cohort: Path, cache: Path, tmp_path: Path
) -> None:
    os.environ["MEDFUSION_QUIET"] = "1"
    first = train(TrainConfig.model_validate(_cfg(cohort, cache, epochs=1)), tmp_path / "a")
    source, meta = load_package(first["package"])
    # zero epochs: the package written is the source's weights, re-packaged with the source's word list
    tuned = train(
        TrainConfig.model_validate(_cfg(cohort, cache, epochs=0, init_from=first["package"])), tmp_path / "b"
    )
    model, meta_b = load_package(tuned["package"])
    assert meta_b.vocabulary == meta.vocabulary
    a, b = source.state_dict(), model.state_dict()
    moved = [k for k in a if k not in ("temperature",) and not np.allclose(a[k].numpy(), b[k].numpy())]
    assert not [k for k in moved if not k.startswith(("head_gain", "note_scale", "head_bias"))]
    bad = _cfg(cohort, cache, epochs=0, init_from=first["package"])
    bad["network"] = {"fusion": "sequence", "channels": [4, 8, 16, 16]}
    with pytest.raises(ValueError, match="channels"):
        train(TrainConfig.model_validate(bad), tmp_path / "c")


def test_the_temperature_is_fitted_on_logits_before_the_models_own_temperature(
    cohort: Path, cache: Path, tmp_path: Path
) -> None:
    """Defect (#29): with `init_from` and no stacking, the validation logits the package's temperature is
    fitted on were already divided by the source package's temperature, so the packaged temperature was
    off by that factor. The logits validation and the diagnosis stage hand to the fit must not depend on
    the temperature the network holds; its Brier score must (it is of the current probabilities)."""
    from medfusion.models.network import MedFusionNet

    os.environ["MEDFUSION_QUIET"] = "1"
    cfg = TrainConfig.model_validate(_cfg(cohort, cache, domain={"fit": False}))
    trainer = Trainer(cfg, tmp_path / "t")
    train_recs, val, vocab = trainer.prepare()
    torch.manual_seed(0)
    model = MedFusionNet(cfg.network, vocab)
    outs = []
    for t in (1.0, 4.0):
        model.temperature.fill_(t)
        outs.append((trainer.validate(model, val), trainer.diagnosis_stage(model, train_recs, val)))
    (v1, d1), (v4, d4) = outs
    assert np.array_equal(v1["logits"], v4["logits"]) and np.array_equal(d1["logits"], d4["logits"])
    assert np.abs(v1["logits"]).max() > 0
    p1 = 1 / (1 + np.exp(-v1["logits"]))
    p4 = 1 / (1 + np.exp(-v1["logits"] / 4.0))
    y = np.stack([r["scores"] for r in val])
    assert np.isclose(v1["brier"], np.mean((p1 - y) ** 2)) and np.isclose(v4["brier"], np.mean((p4 - y) ** 2))


def test_fine_tune_trains_only_the_named_parts_and_distils_the_scores(
    cohort: Path, cache: Path, tmp_path: Path
) -> None:
    os.environ["MEDFUSION_QUIET"] = "1"
    first = train(TrainConfig.model_validate(_cfg(cohort, cache, epochs=1)), tmp_path / "a")
    kw = {"init_from": first["package"], "distill_from": first["package"], "distill_weight": 1.0}
    tuned = train(
        TrainConfig.model_validate(
            _cfg(cohort, cache, epochs=1, trainable=["decoder.", "seg_head."], selection="last", **kw)
        ),
        tmp_path / "b",
    )
    a = load_package(first["package"])[0].state_dict()
    b = load_file(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))  # the last epoch's weights
    moved = {k.split(".")[0] for k in a if not np.allclose(a[k].numpy(), b[k].numpy())}
    assert moved == {"decoder", "seg_head"}
    # selection "last" packages that epoch (with "best" the package may hold the starting weights)
    packaged = load_package(tuned["package"])[0].state_dict()
    assert all(np.array_equal(packaged[k].numpy(), b[k].numpy()) for k in b if k.startswith("decoder."))
    log = [json.loads(line) for line in (tmp_path / "b" / "train.jsonl").read_text().splitlines()]
    assert log[-1]["distill_mse"] >= 0
    with pytest.raises(ValueError, match="distill_from"):
        TrainConfig.model_validate(_cfg(cohort, cache, distill_weight=1.0))
    with pytest.raises(ValueError, match="no parameter name starts with"):
        train(
            TrainConfig.model_validate(_cfg(cohort, cache, epochs=1, trainable=["decodr."])), tmp_path / "c"
        )


@pytest.mark.slow  # two torchrun processes: 22 s of make test's 10 minutes
def test_ddp_two_processes_keep_parameters_identical(cohort: Path, cache: Path, tmp_path: Path) -> None:
    cfg_path = tmp_path / "ddp.yaml"
    # device cpu: gloo, also on a machine with one GPU (where NCCL would refuse two ranks on it); each rank
    # with a forked batch-making worker (loader_workers), as a GPU run would use
    cfg = _cfg(cohort, cache, epochs=1, steps_per_epoch=3, batch_size=1, device="cpu", loader_workers=1)
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MEDFUSION_QUIET": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "medfusion.cli",
            "train",
            "--config",
            str(cfg_path),
            "--out",
            str(tmp_path / "ddp"),
            "--nproc-per-node",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    sums = json.loads((tmp_path / "ddp" / "ddp_check.json").read_text())["parameter_sums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert (tmp_path / "ddp" / "package" / "weights.safetensors").exists()


def test_process_device_gives_each_rank_its_own_gpu_or_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    assert process_device("cpu", 1, 2) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert process_device("cuda", 1, 2) == torch.device("cuda", 1)
    assert process_device("auto", 0, 1) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"2 training processes per node but 1 CUDA device"):
        process_device("auto", 0, 2)


def test_split_and_temperature() -> None:
    tr, va = split_patients([f"p{i}" for i in range(10)], 0.2, 0)
    assert len(va) == 2 and not set(tr) & set(va)
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 4000)  # calibrated logits
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(float)
    t = fit_temperature((z * 3)[:, None], y[:, None])  # logits 3× too confident
    assert 2.6 < t[0] < 3.4


def test_temperature_is_the_likelihood_minimum_not_a_grid_point() -> None:
    """scipy's bounded search lands on the NLL minimum: no temperature of a fine grid does better, and the
    NLL's derivative there is ≈ 0 (a 200-point grid, as before, is off by up to 0.9 %)."""
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (3000, 2))
    y = (rng.random((3000, 2)) < 1 / (1 + np.exp(-z / np.array([0.7, 2.3])))).astype(float)

    def nll(t: float, s: int) -> float:
        p = 1 / (1 + np.exp(-z[:, s] / t))
        return float(-np.mean(y[:, s] * np.log(p) + (1 - y[:, s]) * np.log(1 - p)))

    t = fit_temperature(z, y)
    assert t.shape == (2,) and t.dtype == np.float32
    for s in range(2):
        grid = np.linspace(0.5 * t[s], 1.5 * t[s], 4001)
        assert nll(float(t[s]), s) <= min(nll(g, s) for g in grid) + 1e-9
        h = 1e-4 * float(t[s])
        assert abs(nll(float(t[s]) + h, s) - nll(float(t[s]) - h, s)) / (2 * h) < 1e-4
    # perfectly separated cases push the temperature to the lower bound
    assert np.isclose(
        fit_temperature(np.array([[-3.0], [4.0]]), np.array([[0.0], [1.0]]))[0], 0.25, atol=1e-3
    )
    with pytest.raises(ValueError, match="no cases"):
        fit_temperature(np.zeros((0, 1)), np.zeros((0, 1)))
    with pytest.raises(ValueError, match=r"\(n_cases, n_scores\)"):
        fit_temperature(np.zeros((4, 1)), np.zeros((4, 2)))


def test_labels_table_refuses_a_label_that_is_not_zero_or_one(tmp_path: Path) -> None:
    from medfusion.io.errors import InputError
    from medfusion.train.data import read_labels_csv

    path = tmp_path / "labels.csv"
    path.write_text("patient_id,malignant\na,1\nb,0.0\n")
    assert read_labels_csv(path, ["malignant"]) == {"a": {"malignant": 1}, "b": {"malignant": 0}}
    path.write_text("patient_id,malignant\na,1\nb,yes\n")
    with pytest.raises(
        InputError, match=r"labels.csv: patient 'b': column 'malignant' holds 'yes', not 0 or 1"
    ):
        read_labels_csv(path, ["malignant"])
    with pytest.raises(InputError, match="missing column"):
        read_labels_csv(path, ["benign"])


def test_cache_keeps_registration_when_the_grid_changes_and_rereads_notes(
    cohort: Path, cache: Path, tmp_path: Path
) -> None:
    """A new grid rebuilds the tensors without registering again (in place, or from another cache
    folder); an edited note reaches the cache; a registration setting change registers again."""
    import shutil

    import SimpleITK as sitk

    from medfusion.config import PreprocessConfig
    from medfusion.train.data import build_cache, load_cached

    folder = cohort / "patients" / "SYN00110001"
    work = tmp_path / "patients"
    shutil.copytree(folder, work / folder.name)
    pid = folder.name
    a = PreprocessConfig.model_validate(_cfg(cohort, cache)["preprocess"])
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    first = build_cache([work / pid], cohort / "labels", a, tmp_path / "a", workers=1)[0]
    # registered as inference registers, on one SimpleITK thread: two builds give the same transform
    # bit for bit (on 2 threads it moved by up to 0.12 mm; benchmarks/registration_threads.py)
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1

    def registered(rec: dict) -> bool:  # a real registration takes seconds; a reused one, microseconds
        return rec["seconds"].get("register", 0.0) > 0.3

    assert registered(first) and first["registration"]["matrix_lps"]
    b = a.model_copy(update={"target_size": [40, 40, 40]})
    for cache_dir, donor in ((tmp_path / "a", None), (tmp_path / "b", tmp_path / "a")):
        rec = build_cache([work / pid], cohort / "labels", b, cache_dir, workers=1, registration_from=donor)[
            0
        ]
        assert not registered(rec), "the stored registration should have been reused"
        assert rec["registration"]["matrix_lps"] == first["registration"]["matrix_lps"]
        assert load_cached(cache_dir, pid)["ct"].shape[1:] == (40, 40, 40)
    (work / pid / "note.txt").write_text("No known melanoma.\n")
    assert build_cache([work / pid], cohort / "labels", b, tmp_path / "b", workers=1)[0]["note"] == (
        "No known melanoma."
    )
    c = b.model_copy(update={"registration": b.registration.model_copy(update={"candidates": 1})})
    rec = build_cache([work / pid], cohort / "labels", c, tmp_path / "b", workers=1)[0]
    assert registered(rec) and rec["has_mr"] and rec["mr_reason"] == "used"
    # a record written before training left out an MR that failed its registration QC (no "mr_reason"):
    # prepared again with its registration, and such an MR is left out, as inference leaves it out
    meta_path = tmp_path / "b" / f"{pid}.json"
    old = json.loads(meta_path.read_text())
    del old["mr_reason"]
    old["registration"]["qc"]["passed"] = False
    meta_path.write_text(json.dumps(old))
    rec = build_cache([work / pid], cohort / "labels", c, tmp_path / "b", workers=1)[0]
    assert not registered(rec) and not rec["has_mr"] and rec["mr_reason"] == "registration failed its QC"


def test_diagnosis_stage_pretrains_note_head_and_refits_score_head(
    cohort: Path, cache: Path, tmp_path: Path
) -> None:
    """The note head is pre-trained on a notes-only corpus (it must learn the diagnosis from notes alone),
    the score head is refitted on frozen image features, the two logits are stacked on the validation
    split, and the package carries all of it."""
    from medfusion.synth.generate import generate_note_corpus

    os.environ["MEDFUSION_QUIET"] = "1"
    generate_note_corpus(tmp_path / "corpus", 1500, seed=11)
    run = tmp_path / "run"
    diag = {
        "note_corpus": str(tmp_path / "corpus" / "notes.csv"),
        "note_epochs": 3,
        "head_epochs": 5,
        "head_windows": 2,
        "stack": True,
    }
    net = {"fusion": "sequence", "channels": [4, 8, 16, 32], "note_head": True}
    cfg = TrainConfig.model_validate(_cfg(cohort, cache, epochs=1, network=net, diagnosis=diag))
    summary = train(cfg, run)
    log = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    notes = [r for r in log if r.get("stage") == "note"]
    heads = [r for r in log if r.get("stage") == "head"]
    assert len(notes) == 3 and len(heads) == 6
    print("note-only AUROC on held-out corpus notes", [round(r["val_auroc"], 3) for r in notes])
    assert max(r["val_auroc"] for r in notes) > 0.65  # the note-only oracle's AUROC is ≈ 0.74
    model, meta = load_package(summary["package"])
    assert meta.network.note_head and meta.training["diagnosis_stage"]["note"]["n_val"] == 150
    assert model.note_text is not None
    stack = meta.training["diagnosis_stage"]["stack"]
    assert np.isclose(float(model.note_scale[0].detach()), stack["note_scale"][0])
    inputs = np.load(run / "diagnosis_inputs.npz")
    assert inputs["val_heads"].shape[0] == inputs["val_y"].shape[0] == stack["n_cases"]
    assert inputs["train_heads"].shape[0] == 2 * meta.training["n_train"]
    off = model.note_offset(["Known melanoma. Onset 2 weeks ago with rapid worsening.", ""])
    assert not np.isclose(float(off[0, 0]), float(off[1, 0]))


def test_settings_stored_before_a_default_changed_keep_their_old_meaning() -> None:
    from medfusion.config import PreprocessConfig, RegistrationConfig
    from medfusion.train.data import _same

    old = PreprocessConfig().model_dump(mode="json")
    polish = ("polish_iterations", "polish_smoothing_mm", "polish_histogram_bins")
    for key in ("mask_dilation_mm", "sampling_strategy", *polish):
        del old["registration"][key]  # as written before these fields existed
    then_reg = RegistrationConfig(mask_dilation_mm=0.0, polish_iterations=0)
    then = PreprocessConfig(registration=then_reg).model_dump(mode="json")
    now = PreprocessConfig().model_dump(mode="json")
    assert now["registration"]["mask_dilation_mm"] > 0 and now["registration"]["polish_iterations"] > 0
    assert _same(old, then) and not _same(old, now)
    assert _same(old["registration"], then["registration"], RegistrationConfig)
    # a record holding a since-removed field at the value that meant today's behaviour is still valid;
    # at another value it is not
    removed = {**then, "registration": {**then["registration"], "consistency_levels": "coarse"}}
    assert _same(removed, then)
    removed["registration"]["consistency_levels"] = "full"
    assert not _same(removed, then)


def test_stacking_recovers_the_gains_of_a_known_combination() -> None:
    import torch

    from medfusion.models.network import MedFusionNet, NetConfig
    from medfusion.text.encoders import Vocabulary
    from medfusion.train.diagnosis import stack_logits

    torch.manual_seed(0)
    model = MedFusionNet(NetConfig(channels=[4, 8, 16, 32], note_head=True), Vocabulary(["a"])).eval()
    rng = np.random.default_rng(0)
    heads = rng.normal(0, 3, (6000, model.score_head[0].in_features)).astype(np.float32)
    with torch.no_grad():
        raw = model.score_head(torch.from_numpy(heads)).numpy()[:, 0]  # the image-side logit
    note = rng.normal(0, 1, 6000).astype(np.float32)  # the note logit (gain 1 at the start)
    gain = 1.5 / raw.std()
    truth = gain * raw + 0.7 * note + 0.5
    y = (rng.random(6000) < 1 / (1 + np.exp(-truth))).astype(np.float32)[:, None]
    fit = stack_logits(model, heads, note[:, None], y, c=100.0)
    assert abs(fit["head_gain"][0] - gain) < 0.15 * gain
    assert abs(fit["note_scale"][0] - 0.7) < 0.15 and abs(fit["head_bias"][0] - 0.5) < 0.15
    # a logit that falls with the label gets gain 0, not a sign flip; the other is refitted alone
    y_flip = (rng.random(6000) < 1 / (1 + np.exp(-(gain * raw - 1.0 * note)))).astype(np.float32)[:, None]
    fit = stack_logits(model, heads, note[:, None], y_flip, c=100.0)
    assert fit["note_scale"][0] == 0.0 and abs(fit["head_gain"][0] - gain) < 0.3 * gain


def test_out_of_fold_stacked_logits_give_a_less_overconfident_temperature() -> None:
    from sklearn.model_selection import StratifiedKFold

    from medfusion.train.diagnosis import nonnegative_logistic, out_of_fold_logits

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (64, 2))
    y = (rng.random(64) < 1 / (1 + np.exp(-(1.2 * x[:, 0] + 0.8 * x[:, 1])))).astype(float)
    oof = out_of_fold_logits(x, y, 1.0, 8)
    assert np.isfinite(oof).all()
    tr, te = next(StratifiedKFold(n_splits=8, shuffle=True, random_state=0).split(x, y))
    coef, bias = nonnegative_logistic(x[tr], y[tr], 1.0)  # each case is scored without its own fold
    assert np.allclose(oof[te], x[te] @ np.asarray(coef) + bias)
    assert np.isnan(out_of_fold_logits(x, y, 1.0, 0)).all()
    one = np.zeros(64)
    one[3] = 1.0  # a single positive: no stratified split exists
    assert np.isnan(out_of_fold_logits(x, one, 1.0, 8)).all()
    # what it is for: in-sample stacked logits are over-confident, so their temperature is too low
    higher = 0
    for seed in range(20):
        r = np.random.default_rng(seed)
        x = r.normal(0, 1, (64, 2))
        y = (r.random(64) < 1 / (1 + np.exp(-(0.8 * x[:, 0] + 0.5 * x[:, 1])))).astype(float)
        coef, bias = nonnegative_logistic(x, y, 1.0)
        t_in = fit_temperature((x @ np.asarray(coef) + bias)[:, None], y[:, None])[0]
        t_oof = fit_temperature(out_of_fold_logits(x, y, 1.0, 8)[:, None], y[:, None])[0]
        higher += t_oof > t_in
    assert higher >= 15, higher


def test_reinit_classes_gives_a_collapsed_class_fresh_rows() -> None:
    import torch

    from medfusion.models.network import MedFusionNet, NetConfig
    from medfusion.text.encoders import Vocabulary

    model = MedFusionNet(NetConfig(channels=[4, 8, 16, 32]), Vocabulary(["a"]))
    bias = model.seg_head.bias
    assert bias is not None
    with torch.no_grad():
        model.seg_head.weight[3].zero_()
        bias[3] = -14.0  # a class the network learnt never to predict
    before = model.seg_head.weight[:3].clone()
    reinit_seg_rows(model, [3], seed=0)
    assert torch.equal(model.seg_head.weight[:3], before)
    assert torch.any(model.seg_head.weight[3] != 0) and abs(float(bias[3]) - float(bias[1:3].mean())) < 1e-6


def test_present_only_dice_leaves_an_absent_class_to_the_cross_entropy() -> None:
    import torch
    from monai.losses import DiceCELoss, DiceLoss

    from medfusion.train.losses import PresentDiceCELoss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8, 8, requires_grad=True)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8))  # class 3 absent from the batch
    ours = PresentDiceCELoss(batch=True, smooth=1e-5, weight=None)(logits, label)
    per_class = DiceLoss(
        to_onehot_y=True, softmax=True, include_background=False, batch=True, reduction="none"
    )(logits, label).reshape(-1)
    ce = torch.nn.functional.cross_entropy(logits, label[:, 0])
    assert torch.allclose(ours, per_class[:2].mean() + ce, atol=1e-6)
    # an absent class whose probabilities sum to ≈ 1 over the batch, Dice smoothing 1 (the default
    # recipe's): MONAI's Dice pushes its logit down hard and finishes the collapse; here only the
    # cross-entropy's mean probability does
    shift = torch.zeros(1, requires_grad=True)
    low = logits.detach().clone()
    low[:, 3] -= 7.0

    def moved() -> torch.Tensor:
        return low + shift * torch.eye(4)[3].view(1, 4, 1, 1, 1)

    g_ours = torch.autograd.grad(PresentDiceCELoss(True, 1.0, None)(moved(), label), shift)[0]
    monai_loss = DiceCELoss(
        to_onehot_y=True, softmax=True, include_background=False, batch=True, smooth_nr=1.0, smooth_dr=1.0
    )
    g_monai = torch.autograd.grad(monai_loss(moved(), label), shift)[0]
    assert float(g_monai) > 10 * float(g_ours) > 0
    # with every class present it is MONAI's Dice+CE
    label[0, 0, 0, 0, 0] = 3
    ours = PresentDiceCELoss(batch=True, smooth=1e-5, weight=None)(logits, label)
    monai = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)(logits, label)
    assert torch.allclose(ours, monai, atol=1e-6)
    # per-crop Dice: a class present in one crop counts in that crop only
    per_crop = PresentDiceCELoss(batch=False, smooth=1e-5, weight=None)(logits, label)
    assert torch.isfinite(per_crop) and not torch.allclose(per_crop, ours)


def test_empty_crop_term_charges_the_worst_voxels_of_crops_without_foreground() -> None:
    from medfusion.train.losses import EmptyCropTopK, PresentDiceCELoss

    base = PresentDiceCELoss(batch=True, smooth=1.0, weight=None)
    logits = torch.zeros(2, 4, 8, 8, 8)
    logits[:, 0] = 6.0  # background everywhere, confidently
    label = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    label[0, 0, :2, :2, :2] = 1  # crop 0 holds a lesion, crop 1 is empty
    logits[0, 1, :2, :2, :2] = 12.0
    loss = EmptyCropTopK(base, weight=1.0, k=8)
    clean = float(loss(logits, label) - base(logits, label))
    assert 0 < clean < 0.01  # nothing foreground-looking in the empty crop: −log p_bg ≈ 0.007
    # eight confident false-positive voxels in the empty crop: charged in full (≈ 6 nats each), where
    # the mean cross-entropy over the crop's 512 voxels sees a sixty-fourth of it
    fp = logits.clone()
    fp[1, 1, 4:6, 4:6, 4:6] = 12.0
    term = float(loss(fp, label) - base(fp, label))
    ce_share = float(base(fp, label) - base(logits, label))
    assert term > 5.5 and term > 20 * ce_share
    # the same voxels in the crop that has a lesion are not its business
    fp0 = logits.clone()
    fp0[0, 1, 4:6, 4:6, 4:6] = 12.0
    assert float(loss(fp0, label) - base(fp0, label)) == pytest.approx(clean, abs=1e-6)
    # its gradient lowers the false-positive logits; weight 0 and a batch without empty crops add nothing
    fp.requires_grad_(True)
    grad = torch.autograd.grad(loss(fp, label), fp)[0]
    assert float(grad[1, 1, 4:6, 4:6, 4:6].min()) > 0
    fp = fp.detach()
    assert float(EmptyCropTopK(base, 0.0, 8)(fp, label)) == pytest.approx(float(base(fp, label)))
    full = label.clone()
    full[1, 0, 0, 0, 0] = 2
    assert float(loss(logits, full)) == pytest.approx(float(base(logits, full)))


def test_the_config_turns_the_empty_crop_term_on() -> None:
    from medfusion.train.losses import EmptyCropTopK, segmentation_loss

    data = {"patients": "p", "labels": "l"}
    off = TrainConfig.model_validate({"data": data})
    on = TrainConfig.model_validate({"data": data, "empty_topk_weight": 0.5, "empty_topk_voxels": 32})
    assert not isinstance(segmentation_loss(off, torch.device("cpu")), EmptyCropTopK)
    wrapped = segmentation_loss(on, torch.device("cpu"))
    assert isinstance(wrapped, EmptyCropTopK) and (wrapped.weight, wrapped.k) == (0.5, 32)


@pytest.mark.parametrize(
    "name",
    [
        "train_default.yaml",
        "finetune_default.yaml",
        "distill_default.yaml",
        "measures_default.yaml",
        "segrefine_default.yaml",
    ],
)
def test_shipped_training_recipes_validate_and_keep_the_cache_settings(name: str) -> None:
    """The recipes in pipelines/ load, and their preprocessing is the one the shipped model was made
    with (a field added since must be pinned there, or the cache would be rebuilt)."""
    from medfusion.config import load_yaml_model
    from medfusion.package import DEFAULT_PACKAGE, preprocess_config, read_meta
    from medfusion.train.data import _same

    root = Path(__file__).resolve().parent.parent
    cfg = load_yaml_model(root / "pipelines" / name, TrainConfig)
    shipped = preprocess_config(read_meta(DEFAULT_PACKAGE)).model_dump(mode="json")
    assert _same(cfg.preprocess.model_dump(mode="json"), shipped)
    # validation windows as these recipes were run (their checkpoint selections depend on it)
    assert cfg.val_window_overlap == 0.25
    assert TrainConfig.model_fields["val_window_overlap"].default == 0.5  # a new recipe's: as inference


@pytest.mark.parametrize("name", ["default.yaml", "evaluate-fast.yaml"])
def test_shipped_run_pipelines_validate(name: str) -> None:
    from medfusion.config import PipelineConfig, load_yaml_model

    root = Path(__file__).resolve().parent.parent
    assert load_yaml_model(root / "pipelines" / name, PipelineConfig).name


def test_measurement_term_is_fitted_packaged_and_validated(cohort: Path, cache: Path, tmp_path: Path) -> None:
    """`diagnosis.measures`: the training cases' reference label maps are measured, the term is fitted
    and stored as buffers of the package; a config that cannot fit it is refused up front."""
    os.environ["MEDFUSION_QUIET"] = "1"
    net = {"fusion": "sequence", "channels": [4, 8, 16, 32], "note_head": True, "measures": True}
    diag = {"stack": True, "measures": True}
    cfg = TrainConfig.model_validate(_cfg(cohort, cache, epochs=1, network=net, diagnosis=diag))
    summary = train(cfg, tmp_path / "m")
    log = [json.loads(line) for line in (tmp_path / "m" / "train.jsonl").read_text().splitlines()]
    stage = [r for r in log if r.get("stage") == "measures"]
    assert len(stage) == 1 and stage[0]["n_cases"] == 2
    inputs = np.load(tmp_path / "m" / "diagnosis_inputs.npz")
    assert inputs["train_measures"].shape == (2, 7) and inputs["val_measures"].shape == (1, 7)
    model, meta = load_package(summary["package"])
    assert meta.network.measures and "measures" in meta.training["diagnosis_stage"]
    # the buffers hold the training features' standardisation
    assert np.allclose(model.measure_mean.numpy(), inputs["train_measures"].mean(0), atol=1e-5)
    # the note logits it was fitted on are the packaged note head's, without dropout
    train_recs = Trainer(cfg, tmp_path / "m").prepare()[0]
    with torch.inference_mode():
        again = np.concatenate(
            [model.note_logits([r["note"]]).numpy() for r in train_recs]
        )  # one by one, as inference
    # (1e-4: fitted on a GPU, recomputed here on the CPU, they differ by 3e-5; dropout would move them ~0.1)
    assert np.allclose(again, inputs["train_note_logits_all"], atol=1e-4)
    with pytest.raises(ValueError, match="network.measures"):
        TrainConfig.model_validate(_cfg(cohort, cache, diagnosis=diag))


def test_loader_workers_make_the_planned_batches_in_step_order_and_reproducibly(
    cohort: Path, cache: Path, tmp_path: Path
) -> None:
    """`loader_workers`: forked workers make the epoch's batches; the steps must still receive them in
    the planned order (worker w makes steps w, w + n, …), and the same seed must give the same batches."""
    from medfusion.train.batches import image_augment, make_batch

    cfg = TrainConfig.model_validate(_cfg(cohort, cache, loader_workers=2, device="cpu"))
    trainer = Trainer(cfg, tmp_path / "l")
    recs = trainer.prepare()[0]
    a = cfg.augment
    aug = image_augment(cfg.crop_size, a, 0)
    n = len(recs)
    plan = [[s % n, (s + 1) % n] for s in range(5)]
    first = list(trainer._loader(recs, plan, aug, [0, 0, 1]))
    again = list(trainer._loader(recs, plan, aug, [0, 0, 1]))
    assert len(first) == 5
    for idx, b, c in zip(plan, first, again, strict=True):
        assert torch.equal(
            b["scores"], torch.stack([torch.as_tensor(recs[i]["scores"]).float() for i in idx])
        )
        assert b["ct"].shape == (2, 2, *cfg.crop_size) and torch.equal(b["ct"], c["ct"])
        assert b["notes"] == c["notes"]
    # another epoch's seed gives other crops
    other = list(trainer._loader(recs, plan, aug, [0, 0, 2]))
    assert not all(torch.equal(b["ct"], o["ct"]) for b, o in zip(first, other, strict=True))
    # the in-process path makes batches of the same form
    inproc = make_batch([recs[i] for i in plan[0]], aug, np.random.default_rng(0), a)
    assert inproc.keys() == first[0].keys() and inproc["ct"].shape == first[0]["ct"].shape


def test_slice_blur_smooths_along_slices_only() -> None:
    """`AugmentConfig.slice_blur`: a point in the CT spreads across slices (z) and not in plane; the MR
    gets its own draw; off by default; a reversed range is refused."""
    from medfusion.train.batches import image_augment
    from medfusion.train.config import AugmentConfig

    crop = [9, 9, 9]
    point = np.zeros((1, 9, 9, 9), np.float32)
    point[0, 4, 4, 4] = 1.0
    case = {"ct": point, "mr": point.copy(), "label": np.ones((1, 9, 9, 9), np.uint8)}
    plain = {"flip": False, "rotate_deg": 0.0, "noise": 0.0, "intensity_scale": 0.0, "lesion_crop_prob": 1.0}
    off = image_augment(crop, AugmentConfig(**plain), 0)(dict(case))[0]["image"]
    assert float(off[0, 4, 4, 4]) == 1.0
    a = AugmentConfig(**plain, slice_blur=(0.6, 0.8), slice_blur_prob=1.0)
    img = np.asarray(image_augment(crop, a, 0)(dict(case))[0]["image"])
    for c in (0, 1):
        assert 0.3 < img[c, 4, 4, 4] < 0.8 and img[c, 3, 4, 4] > 0.05 and img[c, 5, 4, 4] > 0.05
        assert img[c, 4, 3, 4] == 0.0 and img[c, 4, 4, 3] == 0.0
        assert img[c].sum() == pytest.approx(1.0, abs=1e-3)
    # a crop's first and last slices keep their intensity (edges extended, not zero-padded)
    flat = {"ct": np.full((1, 9, 9, 9), 0.45, np.float32), "mr": np.full((1, 9, 9, 9), 2.0, np.float32)}
    flat["label"] = case["label"]
    even = np.asarray(image_augment(crop, a, 0)(flat)[0]["image"])
    assert np.allclose(even[0], 0.45, atol=1e-5) and np.allclose(even[1], 2.0, atol=1e-5)
    for bad in [(0.8, 0.2), (0.1, float("inf")), (6.0, 6.0)]:
        with pytest.raises(ValueError, match="slice_blur"):
            AugmentConfig(slice_blur=bad)
