"""Model packages: a folder with `weights.safetensors` and `model.json`. Loading never unpickles.

`model.json` holds the architecture name and its config, class and score names, the preprocessing
parameters, the text vocabulary, the weights' SHA-256, version, the sliding-window size, training
description and metrics; `ARCHITECTURES` maps the name to the class, so `model.json` alone rebuilds
the network. It is read into a typed, versioned `PackageMeta` (format "medfusion-model-package/2");
older formats are migrated on read (`upgrade_meta`), so a package made by any earlier version loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, save_file

from medfusion.config import PreprocessConfig, upgrade_registration
from medfusion.device import (
    pick_device as pick_device,  # moved to medfusion/device.py; re-exported for cli.py
)
from medfusion.hashing import sha256_of
from medfusion.io.atomic import atomic_path, write_json
from medfusion.models.network import MedFusionNet, NetConfig
from medfusion.text.encoders import GRUTextEncoder, HFTextEncoder, Vocabulary

ARCHITECTURES: dict[str, type[MedFusionNet]] = {MedFusionNet.architecture: MedFusionNet}
DEFAULT_PACKAGE = Path(__file__).resolve().parent.parent / "weights" / "default"


PACKAGE_FORMAT = "medfusion-model-package/2"


class PackageError(ValueError):
    """A model package that cannot be used: missing or invalid `model.json`, unknown architecture,
    missing or altered weights, or weights that do not fit the network. The message names the package."""


def upgrade_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """`model.json` content migrated to `PACKAGE_FORMAT` (a new dict; the input is not changed).

    Format 1 → 2: the sliding-window size moves from ``training.config.crop_size`` (z, y, x voxels,
    where the training recipe kept it) to the top-level ``window``; packages without one get None
    (the whole grid in one pass).

    Raises:
        PackageError: a format this version does not know (a newer medfusion's package).
    """
    out = dict(meta)
    fmt = out.get("format", "medfusion-model-package/1")
    if fmt == "medfusion-model-package/1":
        training = out.get("training")
        cfg = training.get("config") if isinstance(training, dict) else None
        crop = cfg.get("crop_size") if isinstance(cfg, dict) else None
        out["window"] = [int(v) for v in crop] if isinstance(crop, list) else None
        out["format"] = fmt = PACKAGE_FORMAT
    if fmt != PACKAGE_FORMAT:
        msg = f"model.json format {fmt!r} is not one this medfusion reads ({PACKAGE_FORMAT} or older)"
        raise PackageError(msg)
    return out


class PackageMeta(BaseModel):
    """`model.json`, typed (format `PACKAGE_FORMAT`); keys it does not name (``recalibration``,
    ``domain``, …) are kept as they are.

    Attributes:
        format: "medfusion-model-package/2".
        name, version: the package's identity.
        architecture: a key of `ARCHITECTURES`.
        network: the network's config (`models.network.NetConfig`).
        class_names: segmentation classes, index = label value, background first.
        score_names: the diagnostic scores, one per score-head output.
        preprocess: the preprocessing the model was trained with (`config.PreprocessConfig`).
        vocabulary, vocabulary_negation, vocabulary_numbers: the GRU note encoder's tokenizer.
        weights_sha256: SHA-256 of `weights.safetensors` (None: not recorded).
        window: sliding-window size (z, y, x voxels) the network was trained on; None: the whole grid.
        training: the training run's record; metrics: evaluation results.
    """

    model_config = ConfigDict(extra="allow")

    format: str = PACKAGE_FORMAT
    name: str
    version: str
    architecture: str
    network: dict[str, Any]
    class_names: list[str]
    score_names: list[str]
    preprocess: dict[str, Any]
    vocabulary: list[str] = Field(default_factory=list)
    vocabulary_negation: bool = True
    vocabulary_numbers: bool = False
    weights_sha256: str | None = None
    window: list[int] | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, meta: dict[str, Any], where: str | Path = "model.json") -> PackageMeta:
        """`meta` (any known format) migrated and validated.

        Raises:
            PackageError: an unknown format, or content that does not fit (named with `where`).
        """
        try:
            return cls.model_validate(upgrade_meta(meta))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3]
            )
            msg = f"{where}: not a valid model.json ({problems})"
            raise PackageError(msg) from exc

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready content of `model.json`."""
        return self.model_dump(mode="json")


def read_package_meta(path: str | Path) -> PackageMeta:
    """The typed `model.json` of the package folder `path` (migrated to the current format).

    Raises:
        PackageError: no `model.json`, invalid JSON, an unknown format, or content that does not fit.
    """
    return PackageMeta.of(read_meta(path), Path(path) / "model.json")


def save_package(
    model: MedFusionNet,
    out: str | Path,
    preprocess: PreprocessConfig,
    *,
    name: str,
    version: str,
    class_names: list[str],
    score_names: list[str],
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write `model` as a package folder: `weights.safetensors` and `model.json`.

    Weights are stored on the CPU, contiguous, without the frozen pretrained note encoder's (rebuilt
    from its own files, `external_weights`); the weights file is written atomically before
    `model.json`, which records its SHA-256, so `load_package` can refuse altered weights.

    Args:
        model: the trained network (its `cfg` and, for the GRU note encoder, its vocabulary are stored).
        out: the package folder; created if missing, existing files of the same names are replaced.
        preprocess: the preprocessing the model was trained with (stored as ``preprocess``).
        name: package name (``name`` in `model.json`).
        version: package version string.
        class_names: segmentation classes, index = label value, background first.
        score_names: the diagnostic scores' names, one per score-head output.
        training: the training run's record, stored as given ({} if None); its ``config.crop_size``
            (z, y, x voxels) is recorded as the package's sliding-window size (``window``).
        metrics: evaluation results to record; {} if None.

    Returns:
        The package folder `out`.

    Raises:
        OSError: the folder or its files cannot be written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k not in external_weights(model)
    }
    with atomic_path(out / "weights.safetensors") as tmp:
        save_file(state, str(tmp))
    crop = (training or {}).get("config", {}).get("crop_size")
    meta = {
        "format": PACKAGE_FORMAT,
        "name": name,
        "version": version,
        "architecture": model.architecture,
        "network": model.cfg.model_dump(),
        "class_names": class_names,
        "score_names": score_names,
        "preprocess": preprocess.model_dump(),
        "vocabulary": model.text.vocab.words[2:] if isinstance(model.text, GRUTextEncoder) else [],
        "vocabulary_negation": model.text.vocab.negation if isinstance(model.text, GRUTextEncoder) else True,
        "vocabulary_numbers": model.text.vocab.numbers if isinstance(model.text, GRUTextEncoder) else False,
        "weights_sha256": sha256_of(out / "weights.safetensors"),
        "window": [int(v) for v in crop] if isinstance(crop, list) else None,
        "training": training or {},
        "metrics": metrics or {},
    }
    write_json(out / "model.json", meta)
    return out


def external_weights(model: MedFusionNet) -> set[str]:
    """State keys not stored in the package: a frozen pretrained note encoder, which is rebuilt from its
    own (hash-checked) files; a fine-tuned one is stored whole."""
    keys: set[str] = set()
    for name, enc in (("text", model.text), ("note_text", model.note_text)):
        if isinstance(enc, HFTextEncoder) and enc.finetune_layers == 0:
            keys |= {f"{name}.model.{k}" for k in enc.model.state_dict()}
    return keys


def read_meta(path: str | Path) -> dict[str, Any]:
    """The parsed `model.json` of the package folder `path`, migrated to the current format
    (`upgrade_meta`) but otherwise unvalidated (no weights are read); `read_package_meta` types it.

    Raises:
        PackageError: `path` holds no `model.json`, it is not valid JSON, or its format is unknown.
    """
    path = Path(path)
    mj = path / "model.json"
    if not mj.exists():
        msg = f"{path}: not a model package (no model.json)"
        raise PackageError(msg)
    try:
        meta: dict[str, Any] = json.loads(mj.read_text())
    except json.JSONDecodeError as exc:
        msg = f"{mj}: invalid JSON ({exc})"
        raise PackageError(msg) from exc
    if not isinstance(meta, dict):
        msg = f"{mj}: expected a JSON object"
        raise PackageError(msg)
    try:
        return upgrade_meta(meta)
    except PackageError as exc:
        msg = f"{mj}: {exc}"
        raise PackageError(msg) from exc


def package_vocabulary(meta: dict[str, Any]) -> Vocabulary:
    """The note tokenizer's word list stored in `model.json`."""
    return Vocabulary(
        list(meta.get("vocabulary", [])),
        bool(meta.get("vocabulary_negation", True)),
        bool(meta.get("vocabulary_numbers", False)),
    )


def load_package(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[MedFusionNet, dict[str, Any]]:
    """Rebuild the network from `model.json` and load `weights.safetensors` (checked against its SHA-256).

    Weights are read with safetensors, never unpickled. A frozen pretrained note encoder is rebuilt
    from its own hash-checked files, so its weights may be absent from the package.

    Args:
        path: the package folder; None: the bundled default package (`DEFAULT_PACKAGE`).
        device: where to put the network (a torch device or its name).

    Returns:
        The network in eval mode on `device`, and the `model.json` dict.

    Raises:
        PackageError: no `model.json` or invalid JSON; an architecture not in `ARCHITECTURES`; no
            `weights.safetensors`; weights whose SHA-256 differs from the recorded one; or a network
            that cannot be built or loaded from the package (invalid ``network`` config, missing or
            unexpected weight names, shape mismatches, a note encoder's files unavailable).
    """
    path = Path(path) if path is not None else DEFAULT_PACKAGE
    meta = read_meta(path)
    arch = meta.get("architecture")
    if arch not in ARCHITECTURES:
        msg = f"{path}: unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}"
        raise PackageError(msg)
    weights = path / "weights.safetensors"
    if not weights.exists():
        msg = f"{path}: no weights.safetensors (pickled weights are never loaded)"
        raise PackageError(msg)
    digest = sha256_of(weights)
    if meta.get("weights_sha256") and digest != meta["weights_sha256"]:
        msg = f"{weights}: SHA-256 {digest[:12]}… does not match model.json ({str(meta['weights_sha256'])[:12]}…); the file was altered"
        raise PackageError(msg)
    try:
        cfg = NetConfig.model_validate(meta["network"])
        model = ARCHITECTURES[arch](cfg, package_vocabulary(meta))
        state = load_file(str(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        absent = sorted(set(missing) - external_weights(model))
        if absent or unexpected:
            msg = f"missing {absent[:3]}, unexpected {unexpected[:3]}"
            raise KeyError(msg)
    except Exception as exc:
        msg = f"{path}: cannot build the network from the package ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        raise PackageError(msg) from exc
    model.eval()
    return model.to(device), meta


def preprocess_config(meta: dict[str, Any]) -> PreprocessConfig:
    """The package's preprocessing; registration fields it predates take the values it was made with."""
    pre = dict(meta["preprocess"])
    pre["registration"] = upgrade_registration(pre.get("registration", {}))
    try:
        return PreprocessConfig.model_validate(pre)
    except ValidationError as exc:
        errors = exc.errors()
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:3])
        msg = f"model package {meta.get('name')} {meta.get('version')}: model.json 'preprocess' is not valid ({where or exc})"
        raise PackageError(msg) from exc
