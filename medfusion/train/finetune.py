"""Where a fine-tune starts from and what it moves: weights copied from an `init_from` package, the
`trainable` parameter prefixes (the others frozen), a frozen `distill_from` teacher, and segmentation
head rows re-initialised for classes to learn afresh (`reinit_classes`)."""

from __future__ import annotations

import numpy as np
import torch

from medfusion.models.meta import PackageMeta
from medfusion.models.network import MedFusionNet
from medfusion.package import load_package
from medfusion.train.config import TrainConfig


def init_from(model: MedFusionNet, source: MedFusionNet, meta: PackageMeta, package: str) -> None:
    """Copy the weights of `source` (the `init_from` package, loaded and SHA-256 checked by
    `load_package`, its typed model.json `meta`) into the freshly built `model`; the measurement term may be
    absent from the source (it has no trained weights).

    Raises:
        ValueError: a network setting other than `measures` differs between the config and the package,
            or the weights do not fit the network; the message names `package`.
    """
    ours, theirs = model.cfg.model_dump(), source.cfg.model_dump()
    # the measurement term has no trained weights: a package without it can start one that has it
    differ = sorted(k for k in ours if ours[k] != theirs.get(k) and k != "measures")
    if differ:
        msg = f"{package}: init_from needs the package's network settings; these differ: " + ", ".join(
            f"{k} (config {ours[k]!r}, package {theirs.get(k)!r})" for k in differ
        )
        raise ValueError(msg)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.startswith("measure_")]:
        msg = (
            f"{package}: weights do not fit the network (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
        raise ValueError(msg)
    print(f"weights from {meta.name} {meta.version} ({package})")


def trainable_parameters(model: MedFusionNet, prefixes: list[str] | None) -> list[torch.nn.Parameter]:
    """The parameters the optimiser moves: those whose name starts with one of `prefixes` (all when
    None); the others get requires_grad False.

    Raises:
        ValueError: a prefix starts no parameter name (the message lists the names' first parts).
    """
    if prefixes is None:
        return list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    unknown = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if unknown:
        msg = f"trainable: no parameter name starts with {unknown}; names start with e.g. " + ", ".join(
            sorted({n.split(".")[0] + "." for n in names})
        )
        raise ValueError(msg)
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(tuple(prefixes)))
        if p.requires_grad:
            params.append(p)
    frozen = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in params)
    print(f"training {sum(p.numel() for p in params)} parameters, {frozen} held")
    return params


def load_teacher(cfg: TrainConfig, device: torch.device) -> MedFusionNet:
    """The `cfg.distill_from` package (SHA-256 checked), frozen, in eval mode, on `device`, in the
    configured memory layout.

    Raises:
        ValueError: its score names are not `cfg.score_names` (in order); what `load_package` raises.
    """
    assert cfg.distill_from
    teacher, meta = load_package(cfg.distill_from)
    if list(meta.score_names) != list(cfg.score_names):
        msg = f"{cfg.distill_from}: its scores {meta.score_names} are not {cfg.score_names}"
        raise ValueError(msg)
    teacher = teacher.to(device).eval()
    if cfg.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    for p in teacher.parameters():
        p.requires_grad_(False)
    print(f"distilling the scores of {meta.name} {meta.version} ({cfg.distill_from})")
    return teacher


def reinit_seg_rows(model: MedFusionNet, classes: list[int], seed: int) -> None:
    """Give the segmentation head's rows of `classes` (label values, 1 … n_classes − 1) a fresh uniform
    initialisation in ±1/√fan_in (PyTorch's default bound for a convolution, seeded with `seed`) and
    each class's bias the mean of the lower foreground classes' (0 for class 1)."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / np.sqrt(model.seg_head.in_channels)
    with torch.no_grad():
        for k in classes:
            w = torch.empty_like(model.seg_head.weight[k]).uniform_(-bound, bound, generator=gen)
            model.seg_head.weight[k].copy_(w)
            # start the class level with the other foreground classes, not above them
            bias = model.seg_head.bias
            assert bias is not None
            bias[k].copy_(bias[1:k].mean() if k > 1 else torch.zeros(()))
    print(f"segmentation head rows {classes} re-initialised")
