"""One forward pass over a case the way the network was trained: on windows of the training crop size.

A network trained on crops (instance normalisation, pooled features) sees other statistics when run on
the whole volume at once; on the 1.6 mm grid this cost the tumour core most of its Dice (0.05 against
0.75 on the same validation cases). So segmentation runs as a Gaussian-weighted sliding window of the
crop size (MONAI `sliding_window_inference`), and the diagnosis head reads one window centred on the
predicted lesion — what most training crops were — or on the volume's centre when none is predicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from medfusion.models.domain import EncoderFeatures
from medfusion.models.meta import PackageMeta
from medfusion.models.network import MedFusionNet


def lesion_window(probs: torch.Tensor, roi: list[int]) -> tuple[slice, ...]:
    """Slices (z, y, x) of a `roi` window centred on the predicted lesion's mass (probability of any
    foreground class above 0.5), or on the volume's centre; kept inside the volume."""
    shape = probs.shape[-3:]
    fg = (1.0 - probs[0, 0]) > 0.5
    if bool(fg.any()):
        weights = (1.0 - probs[0, 0]) * fg
        grids = torch.meshgrid(
            *[torch.arange(s, device=probs.device, dtype=probs.dtype) for s in shape], indexing="ij"
        )
        centre = [float((g * weights).sum() / weights.sum()) for g in grids]
    else:
        centre = [(s - 1) / 2.0 for s in shape]
    return centred_window(tuple(shape), centre, roi)


def centred_window(shape: tuple[int, ...], centre: Sequence[float], roi: list[int]) -> tuple[slice, ...]:
    """Slices of a `roi`-sized window centred on `centre` (voxels), moved to lie inside `shape`."""
    out = []
    for c, r, s in zip(centre, roi, shape, strict=True):
        r = min(r, s)
        start = int(np.clip(round(c - r / 2.0), 0, s - r))
        out.append(slice(start, start + r))
    return tuple(out)


def forward_case(
    model: MedFusionNet,
    ct: torch.Tensor,
    mr: torch.Tensor,
    has_mr: torch.Tensor,
    note: str,
    roi: list[int] | None,
    flips: list[tuple[int, ...]],
    *,
    amp: bool = False,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    features: EncoderFeatures | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Class probabilities (1, K, z, y, x) averaged over `flips`, and the score head's input per flip.

    `roi` None (or at least the volume's size) runs the whole volume at once; otherwise windows of
    `roi` overlapping by the fraction `overlap`, blended with Gaussian weights, `sw_batch_size` windows
    per network call. `features`, if given, records the encoder's pooled features during the unflipped
    segmentation pass only (models/domain.py), so they do not depend on test-time augmentation.

    Args:
        model: the network, in eval mode for inference.
        ct: float32 (1, C_ct, z, y, x) CT windows in [0, 1] on the model grid.
        mr: float32 (1, 1, z, y, x) robust z-scored MR on the same grid (zeros when absent).
        has_mr: bool (1,), whether the MR is used.
        note: the clinical note ("" for none).
        roi: window size (z, y, x) in voxels, or None for the whole volume.
        flips: test-time flips as tensor dimensions to flip, () for none, e.g. [(), (4,)] (x).
        amp: bf16 autocast (on the tensors' device type).
        overlap: fraction in [0, 1) by which neighbouring windows overlap.
        sw_batch_size: windows per network call (≥ 1).
        features: an `EncoderFeatures` recorder, or None.

    Returns:
        (probabilities (1, K, z, y, x) float32 softmax, one score-head input (1, D) per flip); with
        windows the score head reads the `lesion_window` of the mean probabilities.

    Raises:
        RuntimeError: from torch when the network cannot take the input, e.g. the whole volume whose
            axes are not divisible by 2 ** (len(network.channels) - 1) (8 for four levels).
    """
    dev = ct.device.type
    nct = ct.shape[1]
    whole = roi is None or all(r >= s for r, s in zip(roi, ct.shape[-3:], strict=True))
    probs, heads = [], []
    for f in flips:
        x = torch.cat([ct, mr], 1)
        x = x.flip(f) if f else x
        recorder: EncoderFeatures | nullcontext[None] = (
            features if features is not None and not f else nullcontext()
        )
        with recorder:
            p, head_in = _segment(
                model,
                x,
                nct,
                has_mr,
                note,
                roi,
                whole=whole,
                amp=amp,
                overlap=overlap,
                sw_batch_size=sw_batch_size,
            )
        if head_in is not None:
            heads.append(head_in)
        probs.append(p.flip(f) if f else p)
    mean = torch.stack(probs).mean(0)
    if not whole:
        assert roi is not None
        win = (slice(None), slice(None), *lesion_window(mean, roi))
        for f in flips:
            x = torch.cat([ct, mr], 1)[win]
            x = x.flip(f) if f else x
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
                _, head_in = model.encode(x[:, :nct], x[:, nct:], has_mr, [note])
            heads.append(head_in.float())
    return mean, heads


def _segment(
    model: MedFusionNet,
    x: torch.Tensor,
    nct: int,
    has_mr: torch.Tensor,
    note: str,
    roi: list[int] | None,
    *,
    whole: bool,
    amp: bool,
    overlap: float,
    sw_batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (possibly flipped) segmentation pass: probabilities, and the score head's input when the
    whole volume ran at once."""
    dev = x.device.type

    def seg_probs(w: torch.Tensor) -> torch.Tensor:  # w: a batch of windows of the one case
        n = w.shape[0]
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            seg, _ = model.encode(w[:, :nct], w[:, nct:], has_mr.expand(n), [note] * n)
        return torch.softmax(seg.float(), 1)

    if whole:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            seg, head_in = model.encode(x[:, :nct], x[:, nct:], has_mr, [note])
        return torch.softmax(seg.float(), 1), head_in.float()
    assert roi is not None
    out = sliding_window_inference(x, roi, sw_batch_size, seg_probs, overlap=overlap, mode="gaussian")
    assert isinstance(out, torch.Tensor)
    return out, None


@torch.inference_mode()
def encoder_features(
    model: MedFusionNet,
    ct: torch.Tensor,
    mr: torch.Tensor,
    has_mr: torch.Tensor,
    roi: list[int] | None,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
) -> np.ndarray:
    """The domain features (D,) of one case (ct (1, C, z, y, x), mr (1, 1, z, y, x)) that `forward_case`
    records, from the image encoder alone over the same windows: for fitting a domain density without
    the cost of the decoder."""
    rec = EncoderFeatures(model)
    nct = ct.shape[1]
    x = torch.cat([ct, mr], 1)

    def encode_only(w: torch.Tensor) -> torch.Tensor:
        model.image_features(w[:, :nct], w[:, nct:], has_mr.expand(w.shape[0]))
        return torch.zeros((w.shape[0], 1, *w.shape[2:]), device=w.device)

    with rec:
        if roi is None or all(r >= s for r, s in zip(roi, ct.shape[-3:], strict=True)):
            encode_only(x)
        else:
            sliding_window_inference(x, roi, sw_batch_size, encode_only, overlap=overlap, mode="constant")
    return rec.vector()


def default_sw_batch_size(device: torch.device) -> int:
    """Windows per network call when the config leaves it open: 8 on a GPU (8.9× the CPU on an H200,
    against 3.4× one at a time), 2 on the CPU (1.45-1.64× one at a time on 2 cores); RESULTS "GPU"."""
    return 8 if device.type == "cuda" else 2


def package_roi(meta: PackageMeta | dict[str, Any]) -> list[int] | None:
    """The sliding-window size (z, y, x voxels; the training crop) a package records, None for
    packages that record none (`PackageMeta.window`; older model.json formats are migrated)."""
    return (meta if isinstance(meta, PackageMeta) else PackageMeta.of(meta)).window
