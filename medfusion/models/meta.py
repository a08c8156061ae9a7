"""What a model package says about its network: `PackageMeta`, the typed, versioned `model.json`.

A package is data, not code (as a MONAI bundle's checked ``metadata.json``): `model.json` names the
architecture and its config (`NetConfig`), the class and score names, the preprocessing the model was
trained with (`PreprocessConfig`), the note vocabulary, the weights' SHA-256, the sliding-window size,
and the training record and metrics. `ARCHITECTURES` maps the name to the class, so `model.json` alone
rebuilds the network (`build_network`). Older formats are migrated on read (`upgrade_meta`), so a
package made by any earlier version reads.

This module takes dicts and tensors, never files: reading and writing a package folder is
`medfusion/package/` (`load_package`, `save_package`, `read_package_meta`, `write_package_meta`).

Examples:
    >>> from medfusion.models.network import NetConfig
    >>> meta = PackageMeta.of({"format": "medfusion-model-package/1", "name": "p", "version": "1",
    ...     "architecture": "medfusion-unet-v1", "network": {}, "class_names": ["background", "core"],
    ...     "score_names": ["malignant"], "preprocess": {},
    ...     "training": {"config": {"crop_size": [32, 48, 48]}}})
    >>> meta.format, meta.window, meta.network == NetConfig()
    ('medfusion-model-package/2', [32, 48, 48], True)
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medfusion.config import PreprocessConfig, upgrade_registration
from medfusion.models.network import MedFusionNet, NetConfig
from medfusion.text.encoders import GRUTextEncoder, HFTextEncoder, Vocabulary

ARCHITECTURES: dict[str, type[MedFusionNet]] = {MedFusionNet.architecture: MedFusionNet}
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


def stored_preprocess(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored ``preprocess`` block as today's fields: registration settings it predates take the
    values it was made with (`config.upgrade_registration`); a new dict."""
    pre = dict(stored)
    pre["registration"] = upgrade_registration(dict(pre.get("registration") or {}))
    return pre


def _problems(exc: ValidationError) -> str:
    """The first three validation errors, one line: "field.path: message; …"."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])


class PackageMeta(BaseModel):
    """`model.json`, typed (format `PACKAGE_FORMAT`); keys it does not name (``recalibration``,
    ``domain``, …) are kept as they are, in `model_extra`.

    Attributes:
        format: "medfusion-model-package/2".
        name, version: the package's identity.
        architecture: a key of `ARCHITECTURES`.
        network: the network's config (`models.network.NetConfig`; unknown keys are errors).
        class_names: segmentation classes, index = label value, background first.
        score_names: the diagnostic scores, one per score-head output.
        preprocess: the preprocessing the model was trained with (`config.PreprocessConfig`); a stored
            block's registration settings that it predates read as the values it was made with.
        vocabulary, vocabulary_negation, vocabulary_numbers: the GRU note encoder's tokenizer.
        weights_sha256: SHA-256 of `weights.safetensors` (None: not recorded).
        window: sliding-window size (z, y, x voxels) the network was trained on; None: the whole grid.
        training: the training run's record; metrics: evaluation results.

    Raises:
        PackageError: `of` of content that does not fit (or of an unknown format).
    """

    model_config = ConfigDict(extra="allow")

    format: str = PACKAGE_FORMAT
    name: str
    version: str
    architecture: str
    network: NetConfig
    class_names: list[str]
    score_names: list[str]
    preprocess: PreprocessConfig
    vocabulary: list[str] = Field(default_factory=list)
    vocabulary_negation: bool = True
    vocabulary_numbers: bool = False
    weights_sha256: str | None = None
    window: list[int] | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @field_validator("preprocess", mode="before")
    @classmethod
    def _upgrade_preprocess(cls, value: Any) -> Any:
        return stored_preprocess(value) if isinstance(value, dict) else value

    @classmethod
    def of(cls, meta: PackageMeta | dict[str, Any], where: object = "model.json") -> PackageMeta:
        """`meta` (any known format) migrated and validated; `where` names it in errors. A `PackageMeta`
        is returned as it is.

        Raises:
            PackageError: an unknown format, or content that does not fit (named with `where`).
        """
        if isinstance(meta, PackageMeta):
            return meta
        try:
            return cls.model_validate(upgrade_meta(meta))
        except ValidationError as exc:
            msg = f"{where}: not a valid model.json ({_problems(exc)})"
            raise PackageError(msg) from exc

    @classmethod
    def for_model(
        cls,
        model: MedFusionNet,
        preprocess: PreprocessConfig,
        *,
        name: str,
        version: str,
        class_names: list[str],
        score_names: list[str],
        weights_sha256: str | None,
        training: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> PackageMeta:
        """The meta of `model` as a new package: its config and note vocabulary, the given names and
        records; ``training.config.crop_size`` (z, y, x voxels), when recorded, is the ``window``."""
        crop = (training or {}).get("config", {}).get("crop_size")
        vocab = model.text.vocab if isinstance(model.text, GRUTextEncoder) else None
        return cls(
            name=name,
            version=version,
            architecture=model.architecture,
            network=model.cfg,
            class_names=class_names,
            score_names=score_names,
            preprocess=preprocess,
            vocabulary=vocab.words[2:] if vocab else [],
            vocabulary_negation=vocab.negation if vocab else True,
            vocabulary_numbers=vocab.numbers if vocab else False,
            weights_sha256=weights_sha256,
            window=[int(v) for v in crop] if isinstance(crop, list) else None,
            training=training or {},
            metrics=metrics or {},
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready content of `model.json`, keys in the order above, then the kept ones."""
        return self.model_dump(mode="json")

    def block(self, key: str) -> Any:
        """The value of a key this type does not name (``domain``, ``recalibration``); None when absent."""
        return (self.model_extra or {}).get(key)

    def with_extra(self, **blocks: Any) -> PackageMeta:
        """A copy with the keys this type does not name (``domain``, ``recalibration``) set or replaced."""
        return type(self).model_validate({**self.to_json(), **blocks})


def package_vocabulary(meta: PackageMeta | dict[str, Any]) -> Vocabulary:
    """The note tokenizer's word list stored in `model.json` (a typed or a raw meta)."""
    if isinstance(meta, PackageMeta):
        return Vocabulary(list(meta.vocabulary), meta.vocabulary_negation, meta.vocabulary_numbers)
    return Vocabulary(
        list(meta.get("vocabulary", [])),
        bool(meta.get("vocabulary_negation", True)),
        bool(meta.get("vocabulary_numbers", False)),
    )


def preprocess_config(meta: PackageMeta | dict[str, Any]) -> PreprocessConfig:
    """The package's preprocessing; registration fields it predates take the values it was made with.
    A raw meta needs only ``preprocess`` (and ``name``/``version`` for the error).

    Raises:
        PackageError: the stored ``preprocess`` does not fit `PreprocessConfig` (names the field).
    """
    if isinstance(meta, PackageMeta):
        return meta.preprocess.model_copy(deep=True)
    try:
        return PreprocessConfig.model_validate(stored_preprocess(meta["preprocess"]))
    except ValidationError as exc:
        msg = f"model package {meta.get('name')} {meta.get('version')}: model.json 'preprocess' is not valid ({_problems(exc) or exc})"
        raise PackageError(msg) from exc


def external_weights(model: MedFusionNet) -> set[str]:
    """State keys not stored in the package: a frozen pretrained note encoder, which is rebuilt from its
    own (hash-checked) files; a fine-tuned one is stored whole."""
    keys: set[str] = set()
    for name, enc in (("text", model.text), ("note_text", model.note_text)):
        if isinstance(enc, HFTextEncoder) and enc.finetune_layers == 0:
            keys |= {f"{name}.model.{k}" for k in enc.model.state_dict()}
    return keys


def package_state(model: MedFusionNet) -> dict[str, torch.Tensor]:
    """The tensors a package stores: every state entry on the CPU, contiguous, except
    `external_weights`."""
    skip = external_weights(model)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in skip}


def build_network(meta: PackageMeta, state: dict[str, torch.Tensor]) -> MedFusionNet:
    """The network `meta` describes, with the weights `state` loaded (eval mode, CPU).

    Raises:
        PackageError: an architecture not in `ARCHITECTURES`.
        KeyError: weight names missing from `state` (other than `external_weights`) or unexpected.
        RuntimeError: weights whose shapes do not fit (torch's `load_state_dict`).
        ValueError, OSError: a note encoder that cannot be built (its files unavailable or altered).
    """
    if meta.architecture not in ARCHITECTURES:
        msg = f"unknown architecture {meta.architecture!r}; known: {sorted(ARCHITECTURES)}"
        raise PackageError(msg)
    model = ARCHITECTURES[meta.architecture](meta.network.model_copy(deep=True), package_vocabulary(meta))
    missing, unexpected = model.load_state_dict(state, strict=False)
    absent = sorted(set(missing) - external_weights(model))
    if absent or unexpected:
        msg = f"missing {absent[:3]}, unexpected {unexpected[:3]}"
        raise KeyError(msg)
    return model.eval()
