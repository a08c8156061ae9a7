"""model.json read into a typed, versioned PackageMeta: older formats migrate, unknown ones are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medfusion.infer.windowed import package_roi
from medfusion.models.package import (
    DEFAULT_PACKAGE,
    PACKAGE_FORMAT,
    PackageError,
    PackageMeta,
    read_package_meta,
    upgrade_meta,
)

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


def test_unknown_format_and_bad_content_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="format 'medfusion-model-package/9'"):
        upgrade_meta({"format": "medfusion-model-package/9", **BASE})
    (tmp_path / "model.json").write_text(json.dumps({"format": PACKAGE_FORMAT, "name": "x"}))
    with pytest.raises(PackageError, match="model.json: not a valid model.json"):
        read_package_meta(tmp_path)


def test_the_shipped_package_is_current_and_its_window_is_its_training_crop() -> None:
    raw = json.loads((DEFAULT_PACKAGE / "model.json").read_text())
    assert raw["format"] == PACKAGE_FORMAT
    meta = read_package_meta(DEFAULT_PACKAGE)
    assert meta.window == raw["training"]["config"]["crop_size"]
    assert "domain" in (meta.model_extra or {})  # keys the type does not name are kept
    assert meta.to_json()["domain"] == raw["domain"]
