"""A model package on disk: a folder with `weights.safetensors` and `model.json` (and, with a fitted
domain guard, `domain.safetensors`). Loading never unpickles.

Every `model.json` is written by `write_package_meta` from a `models.meta.PackageMeta` and read by
`read_package_meta` (typed; `load_package` returns the same type) or `read_meta` (the migrated dict,
unvalidated); files appear atomically (`io.atomic`). The network and the typed meta live in `models/`, which never touches files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from medfusion.config import PreprocessConfig
from medfusion.hashing import sha256_of
from medfusion.io.atomic import atomic_path, write_json
from medfusion.models.domain import SIDECAR, DomainGuard
from medfusion.models.meta import (
    ARCHITECTURES,
    PackageError,
    PackageMeta,
    build_network,
    package_state,
    upgrade_meta,
)
from medfusion.models.network import MedFusionNet

DEFAULT_PACKAGE = Path(__file__).resolve().parent.parent / "weights" / "default"
META = "model.json"
WEIGHTS = "weights.safetensors"


# --- model.json ---


def read_meta(path: str | Path) -> dict[str, Any]:
    """The parsed `model.json` of the package folder `path`, migrated to the current format
    (`upgrade_meta`) but otherwise unvalidated (no weights are read); `read_package_meta` types it.

    Raises:
        PackageError: `path` holds no `model.json`, it is not valid JSON, or its format is unknown.
    """
    path = Path(path)
    mj = path / META
    if not mj.exists():
        msg = f"{path}: not a model package (no model.json)"
        raise PackageError(msg)
    try:
        meta: Any = json.loads(mj.read_text())
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


def read_package_meta(path: str | Path) -> PackageMeta:
    """The typed `model.json` of the package folder `path` (migrated to the current format).

    Raises:
        PackageError: no `model.json`, invalid JSON, an unknown format, or content that does not fit
            (the message names the file and the first fields at fault).
    """
    return PackageMeta.of(read_meta(path), Path(path) / META)


def write_package_meta(path: str | Path, meta: PackageMeta) -> Path:
    """Write `meta` as the `model.json` of the package folder `path` (atomically); the one writer of
    `model.json`. Returns the file's path.

    Raises:
        OSError: the file cannot be written.
    """
    return write_json(Path(path) / META, meta.to_json())


# --- Weights ---


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
    from its own files, `models.meta.external_weights`); the weights file is written atomically before
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
    with atomic_path(out / WEIGHTS) as tmp:
        save_file(package_state(model), str(tmp))
    meta = PackageMeta.for_model(
        model,
        preprocess,
        name=name,
        version=version,
        class_names=class_names,
        score_names=score_names,
        weights_sha256=sha256_of(out / WEIGHTS),
        training=training,
        metrics=metrics,
    )
    write_package_meta(out, meta)
    return out


def load_package(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[MedFusionNet, PackageMeta]:
    """Rebuild the network from `model.json` and load `weights.safetensors` (checked against its SHA-256).

    Weights are read with safetensors, never unpickled. A frozen pretrained note encoder is rebuilt
    from its own hash-checked files, so its weights may be absent from the package.

    Args:
        path: the package folder; None: the bundled default package (`DEFAULT_PACKAGE`).
        device: where to put the network (a torch device or its name; not resolved here: "auto" is
            `medfusion.device.pick_device`'s job).

    Returns:
        The network in eval mode on `device`, and its `model.json`, typed (`PackageMeta`, migrated to
        the current format; the keys it does not name, such as ``domain`` and ``recalibration``, in
        `PackageMeta.block`).

    Raises:
        PackageError: no `model.json`, invalid JSON or content that does not fit `PackageMeta`; an
            architecture not in `ARCHITECTURES`; no `weights.safetensors`; weights whose SHA-256
            differs from the recorded one; or a network that cannot be built or loaded from the
            package (missing or unexpected weight names, shape mismatches, a note encoder's files
            unavailable).
        RuntimeError: `device` is not a torch device name (torch's message).
    """
    path = Path(path) if path is not None else DEFAULT_PACKAGE
    meta = read_package_meta(path)
    if meta.architecture not in ARCHITECTURES:
        msg = f"{path}: unknown architecture {meta.architecture!r}; known: {sorted(ARCHITECTURES)}"
        raise PackageError(msg)
    weights = path / WEIGHTS
    if not weights.exists():
        msg = f"{path}: no weights.safetensors (pickled weights are never loaded)"
        raise PackageError(msg)
    digest = sha256_of(weights)
    if meta.weights_sha256 and digest != meta.weights_sha256:
        msg = f"{weights}: SHA-256 {digest[:12]}… does not match model.json ({meta.weights_sha256[:12]}…); the file was altered"
        raise PackageError(msg)
    try:
        model = build_network(meta, load_file(str(weights)))
    except Exception as exc:
        msg = f"{path}: cannot build the network from the package ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        raise PackageError(msg) from exc
    return model.to(device), meta


# --- The domain guard (models/domain.py) ---


def save_domain_guard(package: str | Path, guard: DomainGuard) -> dict[str, Any]:
    """Write the guard's `domain.safetensors` and its ``"domain"`` block into the `model.json` of
    `package` (both atomically, the sidecar first: the block records its SHA-256); returns the block.

    Raises:
        PackageError: the package's `model.json` is missing or invalid.
        OSError: the files cannot be written.
    """
    package = Path(package)
    meta = read_package_meta(package)
    with atomic_path(package / SIDECAR) as tmp:
        save_numpy(guard.tensors(), str(tmp))
    block = guard.block(sha256_of(package / SIDECAR))
    write_package_meta(package, meta.with_extra(domain=block))
    return block


def load_domain_guard(package: str | Path, meta: PackageMeta | dict[str, Any]) -> DomainGuard | None:
    """The guard stored in `package` (whose `model.json` is `meta`), or None if it has none.

    Raises:
        ValueError: the sidecar named in `model.json` is missing or altered (its SHA-256 differs), or the
            block's calibration is malformed (`models.domain.check_calibration`).
    """
    block = meta.block("domain") if isinstance(meta, PackageMeta) else meta.get("domain")
    if not block:
        return None
    path = Path(package) / block.get("sidecar", SIDECAR)
    if not path.exists():
        msg = f"{path}: the domain sidecar named in model.json is missing"
        raise ValueError(msg)
    if block.get("sidecar_sha256") and sha256_of(path) != block["sidecar_sha256"]:
        msg = f"{path}: SHA-256 does not match model.json; the file was altered"
        raise ValueError(msg)
    try:
        return DomainGuard.from_block(block, load_numpy(str(path)))
    except ValueError as exc:  # a malformed block: name the file, not a failure deep in a run
        msg = f"{Path(package) / 'model.json'}: domain block: {exc}"
        raise ValueError(msg) from exc
