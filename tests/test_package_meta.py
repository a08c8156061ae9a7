"""model.json read into a typed, versioned PackageMeta (network and preprocess typed too): older formats
migrate, unknown ones are refused, and every model.json is written by one writer from the type."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from medfusion.config import PreprocessConfig, RegistrationConfig
from medfusion.infer.windowed import package_roi
from medfusion.models.meta import PACKAGE_FORMAT, PackageMeta, upgrade_meta
from medfusion.models.network import MedFusionNet, NetConfig
from medfusion.package import (
    DEFAULT_PACKAGE,
    PackageError,
    load_package,
    preprocess_config,
    read_package_meta,
    save_package,
    write_package_meta,
)
from medfusion.text.encoders import Vocabulary

BASE = {
    "name": "p",
    "version": "1",
    "architecture": "medfusion-unet-v1",
    "network": {},
    "class_names": ["background", "tumour_core"],
    "score_names": ["malignant"],
    "preprocess": {},
}


def test_format_1_migrates_the_window_out_of_the_training_record() -> None:
    old = {"format": "medfusion-model-package/1", **BASE, "training": {"config": {"crop_size": [32, 48, 48]}}}
    meta = PackageMeta.of(old)
    assert meta.format == PACKAGE_FORMAT and meta.window == [32, 48, 48]
    assert old["format"] == "medfusion-model-package/1" and "window" not in old  # input untouched
    assert PackageMeta.of({**BASE, "training": {}}).window is None  # no crop recorded: the whole grid
    assert package_roi(old) == [32, 48, 48]


def test_network_and_preprocess_are_typed_and_stored_settings_keep_their_meaning() -> None:
    meta = PackageMeta.of(
        {**BASE, "network": {"fusion": "film"}, "preprocess": {"registration": {"min_head_dice": 0.85}}}
    )
    assert isinstance(meta.network, NetConfig) and meta.network.fusion == "film"
    assert isinstance(meta.preprocess, PreprocessConfig)
    # a stored registration without the later fields was made with their old values, not today's
    assert meta.preprocess.registration.mask_dilation_mm == 0.0 != RegistrationConfig().mask_dilation_mm
    assert meta.preprocess == preprocess_config(BASE) == preprocess_config(meta)


def test_unknown_format_and_bad_content_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="format 'medfusion-model-package/9'"):
        upgrade_meta({"format": "medfusion-model-package/9", **BASE})
    (tmp_path / "model.json").write_text(json.dumps({"format": PACKAGE_FORMAT, "name": "x"}))
    with pytest.raises(PackageError, match="model.json: not a valid model.json"):
        read_package_meta(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({**BASE, "network": {"layers": 9}}))
    with pytest.raises(PackageError, match=r"model.json: not a valid model.json \(network\.layers"):
        read_package_meta(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({**BASE, "preprocess": {"target_size": [8]}}))
    with pytest.raises(PackageError, match=r"preprocess\.target_size"):
        read_package_meta(tmp_path)


def test_the_shipped_package_reads_typed_and_writes_back_what_it_holds(tmp_path: Path) -> None:
    raw = json.loads((DEFAULT_PACKAGE / "model.json").read_text())
    assert raw["format"] == PACKAGE_FORMAT
    meta = read_package_meta(DEFAULT_PACKAGE)
    assert meta.window == raw["training"]["config"]["crop_size"]
    assert meta.network == NetConfig.model_validate(raw["network"])
    assert meta.preprocess == preprocess_config(raw)  # what a run has always read from it
    assert meta.block("domain") == raw["domain"] and meta.block("no_such_key") is None  # kept keys
    assert PackageMeta.of(meta) is meta  # a typed meta passes through, a dict is validated
    written = meta.to_json()
    assert list(written) == list(raw)  # the same keys in the same order
    assert {k: v for k, v in written.items() if k != "preprocess"} == {
        k: v for k, v in raw.items() if k != "preprocess"
    }
    write_package_meta(tmp_path, meta)
    assert read_package_meta(tmp_path) == meta


def test_the_shipped_package_as_format_1_loads_end_to_end(tmp_path: Path) -> None:
    """A package made before format 2 (no "window"): migrated on read, weights checked and loaded."""
    old = json.loads((DEFAULT_PACKAGE / "model.json").read_text())
    old["format"] = "medfusion-model-package/1"
    del old["window"]
    shutil.copytree(DEFAULT_PACKAGE, tmp_path / "pkg")
    (tmp_path / "pkg" / "model.json").write_text(json.dumps(old))
    model, meta = load_package(tmp_path / "pkg")
    assert meta.format == PACKAGE_FORMAT and meta.window == old["training"]["config"]["crop_size"]
    assert model.cfg == read_package_meta(DEFAULT_PACKAGE).network


def test_save_package_writes_model_json_through_the_type(tmp_path: Path) -> None:
    vocab = Vocabulary.fit(["No history of melanoma.", "Known melanoma, 64 years."], min_count=1)
    net = MedFusionNet(NetConfig(channels=[4, 8], subunits=1, transformer_layers=1), vocab).eval()
    training = {"config": {"crop_size": [16, 16, 16]}}
    pkg = save_package(
        net,
        tmp_path / "pkg",
        PreprocessConfig(),
        name="t",
        version="0",
        class_names=["bg", "a", "b", "c"],
        score_names=["malignant"],
        training=training,
    )
    raw = json.loads((pkg / "model.json").read_text())
    # the content earlier versions wrote by hand, key for key
    assert raw["network"] == net.cfg.model_dump(mode="json")
    assert raw["preprocess"] == PreprocessConfig().model_dump(mode="json")
    assert raw["vocabulary"] == vocab.words[2:] and raw["vocabulary_numbers"] == vocab.numbers
    assert raw["window"] == [16, 16, 16] and raw["training"] == training and raw["metrics"] == {}
    assert list(raw)[:8] == [
        "format",
        "name",
        "version",
        "architecture",
        "network",
        "class_names",
        "score_names",
        "preprocess",
    ]
    back, meta = load_package(pkg)
    assert isinstance(meta, PackageMeta) and meta == read_package_meta(pkg)
    for a, b in zip(net.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_model_layer_writes_no_files() -> None:
    """models/ takes tensors and dicts; the package folder is medfusion/package/ (issue #29)."""
    root = Path(__file__).resolve().parent.parent / "medfusion" / "models"
    for path in sorted(root.glob("*.py")):
        imported = {
            node.module
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not imported & {"medfusion.io.atomic", "medfusion.package", "safetensors.torch"}, path.name
        assert not imported & {"safetensors.numpy", "medfusion.package.store"}, path.name


def test_names_are_imported_from_their_homes_not_old_forwards() -> None:
    """#29's moves are finished where nothing needs the old name: `CaseTensors` is gone (it is
    `preprocess/prepare.ModelInputs`) and medfusion imports `TrainConfig` and `process_device` from
    train/config.py and train/distributed.py, not from train/loop.py's namespace."""
    import medfusion.preprocess.prepare as prepare
    import medfusion.train.loop as loop

    assert not hasattr(prepare, "CaseTensors")
    assert not {"TrainConfig", "process_device"} & set(loop.__all__)
    root = Path(__file__).resolve().parent.parent
    for path in [*sorted((root / "medfusion").rglob("*.py")), *sorted((root / "benchmarks").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "medfusion.train.loop":
                names = {a.name for a in node.names}
                assert not names & {"TrainConfig", "process_device"}, f"{path.name}:{node.lineno}"
            if isinstance(node, ast.ImportFrom) and node.module == "medfusion.preprocess.prepare":
                assert "CaseTensors" not in {a.name for a in node.names}, f"{path.name}:{node.lineno}"
