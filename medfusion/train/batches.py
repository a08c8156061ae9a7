"""Training batches: augmentation (MONAI dictionary transforms on the image side, sentence shuffling and
dropping on the note), an epoch's plan of which cases each step takes, one batch made from cached cases,
the forked loader that makes them ahead of the steps (`TrainConfig.loader_workers`), and a batch moved
to the training device in the configured memory layout."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.utils import convert_to_dst_type
from scipy import ndimage

from medfusion.models.network import channels_last
from medfusion.text.sentences import split_sentences
from medfusion.train.config import AugmentConfig

# --- Augmentation ---


class RandSliceBlurd(mt.RandomizableTransform):
    """Gaussian blur along the slice axis (the first spatial axis, z) of `key`, σ drawn uniformly from
    `sigma` (voxels), with probability `prob`: a thicker slice profile. The edges are extended by their
    own values (scipy's mode "nearest"), so a crop's first and last slices keep their intensity;
    MONAI's `RandGaussianSmoothd` pads with zeros, which darkened them by up to 27 % at σ 0.8.

    Input: {key: array (C, z, y, x)}; returns the dict with that entry blurred, float32."""

    def __init__(self, key: str, sigma: tuple[float, float], prob: float) -> None:
        mt.RandomizableTransform.__init__(self, prob)
        self.key, self.sigma = key, sigma
        self._s = 0.0

    def randomize(self, data: Any = None) -> None:
        """Draw whether to blur (probability `prob`) and σ (uniform in `sigma`)."""
        super().randomize(None)
        self._s = float(self.R.uniform(*self.sigma))

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        """`data` with `key` blurred along z (a new dict; the other entries shared), or as it was."""
        self.randomize()
        if not self._do_transform or self._s <= 0:
            return data
        out = dict(data)
        x = data[self.key]
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        blurred = ndimage.gaussian_filter1d(arr.astype(np.float32), self._s, axis=1, mode="nearest")
        out[self.key] = convert_to_dst_type(
            blurred, x, dtype=torch.float32 if isinstance(x, torch.Tensor) else np.float32
        )[0]
        return out


def image_augment(crop: list[int], a: AugmentConfig, seed: int) -> mt.Compose:
    """Lesion-biased crop, slice-profile blur, flips, small rotations, intensity noise/scale (MONAI
    dictionary transforms).

    With `a.class_crop_ratios` (one weight per class, background first) crops are centred on a voxel of
    a class drawn with those weights (classes absent from a case are skipped), so that a rare class such
    as a few-millimetre calcification is seen in a fixed share of crops; otherwise a crop is centred on
    lesion with probability `a.lesion_crop_prob`. A case smaller than the crop is padded to it.

    Args:
        crop: crop size in voxels (z, y, x).
        a: which augmentations, how strong (`AugmentConfig`; the note-side fields are not used here).
        seed: seed of the transforms' own random state (MONAI's `set_random_state`).

    Returns:
        A transform taking {"ct": (C_ct, z, y, x), "mr": (C_mr, z, y, x), "label": (1, z, y, x)} as
        stored (any dtype) and returning {"image": float32 (C_ct + C_mr, *crop), "label": (1, *crop)}
        (a list of one such dict from the crop). The crop comes first, so only the crop is copied and
        made float32, then CT and MR become one "image".
    """
    keys = ["ct", "mr", "label"]
    crop_t: Any
    if a.class_crop_ratios:
        crop_t = mt.RandCropByLabelClassesd(
            keys=keys,
            label_key="label",
            spatial_size=crop,
            ratios=list(a.class_crop_ratios),
            num_classes=len(a.class_crop_ratios),
            num_samples=1,
            allow_smaller=True,
            warn=False,
        )
    else:
        crop_t = mt.RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=crop,
            pos=max(a.lesion_crop_prob, 1e-3),
            neg=max(1.0 - a.lesion_crop_prob, 1e-3),
            num_samples=1,
            allow_smaller=True,
        )
    ts: list[Any] = [
        crop_t,
        mt.SpatialPadd(keys=keys, spatial_size=crop),
        mt.CastToTyped(keys=keys, dtype=np.float32),
    ]
    if a.slice_blur is not None:
        # CT and MR each get their own draw, as a thick-slice CT need not come with a thick-slice MR
        ts += [RandSliceBlurd(key, a.slice_blur, a.slice_blur_prob) for key in ("ct", "mr")]
    ts += [
        mt.ConcatItemsd(keys=["ct", "mr"], name="image", dim=0),
        mt.DeleteItemsd(keys=["ct", "mr"]),
    ]
    if a.flip:
        ts.append(mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2))
    if a.rotate_deg > 0:
        r = float(np.radians(a.rotate_deg))
        ts.append(
            mt.RandAffined(
                keys=["image", "label"],
                prob=0.5,
                rotate_range=(r, r, r),
                scale_range=(0.05, 0.05, 0.05),
                mode=("bilinear", "nearest"),
                padding_mode="border",
            )
        )
    if a.noise > 0:
        ts.append(mt.RandGaussianNoised(keys=["image"], prob=0.5, std=a.noise))
    if a.intensity_scale > 0:
        ts.append(mt.RandScaleIntensityd(keys=["image"], prob=0.5, factors=a.intensity_scale))
    comp = mt.Compose(ts)
    comp.set_random_state(seed=seed)
    return comp


def note_augment(note: str, rng: np.random.Generator, *, shuffle: bool, drop: float) -> str:
    """The note with its sentences after the first shuffled (`shuffle`) and each of them dropped with
    probability `drop` in [0, 1]; the first sentence (the referral's reason) is always kept first. A note
    of fewer than two sentences is returned unchanged.

    Examples:
        >>> note_augment("A. B. C.", np.random.default_rng(0), shuffle=False, drop=0.0)
        'A. B. C.'
    """
    sents = split_sentences(note)
    if len(sents) < 2:
        return note
    head, tail = sents[:1], sents[1:]
    if shuffle:
        rng.shuffle(tail)  # type: ignore[arg-type]
    tail = [s for s in tail if rng.random() >= drop]
    return " ".join(head + tail)


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """A float32, C-contiguous CPU tensor of the array's values (shares memory when it already is)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


# --- Batches ---


def epoch_plan(
    rng: np.random.Generator, n_cases: int, steps: int, batch_size: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """Which training cases each step of an epoch takes: a permutation of the cases drawn from `rng`,
    rank `rank` of `world` taking every world-th of it, cycled as long as the steps need.

    Returns:
        `steps` lists of `batch_size` case indices in [0, n_cases).
    """
    order = rng.permutation(n_cases)[rank::world]
    return [
        [int(order[(step * batch_size + b) % len(order)]) for b in range(batch_size)] for step in range(steps)
    ]


def _plain(x: Any) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (same values; nothing to pickle but the data)."""
    t = torch.as_tensor(x)
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def make_batch(
    recs: list[dict[str, Any]], aug: mt.Compose, rng: np.random.Generator, a: AugmentConfig
) -> dict[str, Any]:
    """One training batch on the CPU: augmented crops, modality dropout, note augmentation.

    Args:
        recs: cached cases (`train.data.load_cached` plus "scores": float32 (n_scores,) 0/1): "ct"
            (C_ct, z, y, x), "mr" (C_mr, z, y, x), "target" (z, y, x) class codes, "has_mr", "note".
        aug: `image_augment`'s transform.
        rng: draws the modality dropout and the note augmentation.
        a: the augmentation settings (modality dropout, sentence shuffle/drop).

    Returns:
        {"ct": float32 (B, C_ct, *crop), "mr": float32 (B, C_mr, *crop), "label": int64 (B, 1, *crop),
        "has_mr": bool (B,), "notes": B strings ("" when dropped), "scores": float32 (B, n_scores)}.
    """
    cts, mrs, labels, has, notes, scores = [], [], [], [], [], []
    for r in recs:
        out = aug({"ct": r["ct"], "mr": r["mr"], "label": r["target"][None]})
        out = out[0] if isinstance(out, list) else out
        img = _plain(out["image"]).float()
        nct = r["ct"].shape[0]
        cts.append(img[:nct])
        mrs.append(img[nct:])
        labels.append(_plain(out["label"]).round().long())
        present = bool(r["has_mr"]) and rng.random() >= a.modality_dropout
        has.append(present)
        note = note_augment(r["note"], rng, shuffle=a.sentence_shuffle, drop=a.sentence_drop)
        notes.append("" if rng.random() < a.modality_dropout else note)
        scores.append(to_tensor(r["scores"]))
    return {
        "ct": torch.stack(cts),
        "mr": torch.stack(mrs),
        "label": torch.stack(labels),
        "has_mr": torch.tensor(has),
        "notes": notes,
        "scores": torch.stack(scores),
    }


class BatchStream(torch.utils.data.IterableDataset):
    """An epoch's batches, shared out among a loader's workers: worker w of n makes steps w, w + n, …
    Each worker's random state (MONAI's and the numpy generator) is seeded from (`seed`, worker id), so
    a given seed and worker count give the same batches.

    Args:
        recs: the cached training cases (see `make_batch`).
        plan: `epoch_plan`'s case indices per step.
        aug: `image_augment`'s transform (each worker has its own copy after the fork).
        seed: the stream's seed, e.g. [run seed, rank, epoch].
        a: the augmentation settings.
    """

    def __init__(
        self,
        recs: list[dict[str, Any]],
        plan: list[list[int]],
        aug: mt.Compose,
        seed: list[int],
        a: AugmentConfig,
    ) -> None:
        self.recs, self.plan, self.aug, self.seed, self.a = recs, plan, aug, seed, a

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([*self.seed, wid])
        self.aug.set_random_state(seed=int(rng.integers(2**31)))
        for step in range(wid, len(self.plan), n):
            yield make_batch([self.recs[i] for i in self.plan[step]], self.aug, rng, self.a)


def batch_loader(stream: BatchStream, *, workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """A loader of `stream`'s batches in step order, made by `workers` (≥ 1) processes (the loader takes
    from the workers in turn, two batches ahead each). Forked where the platform can, so the cached
    arrays are shared, not copied; `pin_memory` for a CUDA device's non-blocking copies."""
    ctx = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        multiprocessing_context=ctx,
        prefetch_factor=2,
    )


# --- On the device ---


def in_layout(x: torch.Tensor, channels_last_3d: bool) -> torch.Tensor:
    """`x` in channels_last_3d memory order when `channels_last_3d` (`TrainConfig.channels_last`), else
    as it is; the values are the same either way."""
    return channels_last(x) if channels_last_3d else x


def to_device(b: dict[str, Any], device: torch.device, channels_last_3d: bool) -> dict[str, Any]:
    """A `make_batch` batch on the training device, images in the configured memory layout (copied
    without blocking from pinned memory on CUDA, when a loader made the batch); "notes" stay strings."""
    nb = device.type == "cuda"
    return {
        "ct": in_layout(b["ct"].to(device, non_blocking=nb), channels_last_3d),
        "mr": in_layout(b["mr"].to(device, non_blocking=nb), channels_last_3d),
        "label": b["label"].to(device, non_blocking=nb),
        "has_mr": b["has_mr"].to(device),
        "notes": b["notes"],
        "scores": b["scores"].to(device, non_blocking=nb),
    }
