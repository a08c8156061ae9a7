"""Model packages: a folder with `weights.safetensors` and `model.json`. Loading never unpickles.

`model.json` holds the architecture name and its config, class and score names, the preprocessing
parameters, the text vocabulary, the weights' SHA-256, version, training description and metrics;
`ARCHITECTURES` maps the name to the class, so `model.json` alone rebuilds the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from medfusion.config import PreprocessConfig, upgrade_registration
from medfusion.io.atomic import atomic_path, write_json
from medfusion.models.network import MedFusionNet, NetConfig
from medfusion.text.encoders import GRUTextEncoder, HFTextEncoder, Vocabulary, sha256_of

ARCHITECTURES: dict[str, type[MedFusionNet]] = {MedFusionNet.architecture: MedFusionNet}
DEFAULT_PACKAGE = Path(__file__).resolve().parent.parent / "weights" / "default"


class PackageError(ValueError):
    pass


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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k not in external_weights(model)
    }
    with atomic_path(out / "weights.safetensors") as tmp:
        save_file(state, str(tmp))
    meta = {
        "format": "medfusion-model-package/1",
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
    return meta


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
    """Rebuild the network from `model.json` and load `weights.safetensors` (checked against its SHA-256)."""
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


def pick_device(requested: str = "auto") -> torch.device:
    """cuda, then mps, then cpu for 'auto'; otherwise what was asked (refused if unavailable)."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(requested)
    except RuntimeError as exc:
        msg = f"device {requested!r} is not a device name (auto, cpu, cuda, cuda:N, mps)"
        raise ValueError(msg) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device {requested!r} requested but CUDA is not available"
        raise ValueError(msg)
    n_gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.type == "cuda" and dev.index is not None and dev.index >= n_gpus:
        msg = f"device {requested!r} requested but this machine has {n_gpus} CUDA device(s)"
        raise ValueError(msg)
    return dev
