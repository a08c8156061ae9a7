"""Inference: one model per process, test-time flip augmentation, MC-dropout score uncertainty, and
the domain check of each case against the package's guard (models/domain.py).

Deterministic: the same input, package and device give the same numbers. MC dropout draws from a
generator seeded with `seed` (restored afterwards), torch runs with deterministic algorithms (cuDNN
autotuning off, cuBLAS with a fixed workspace), and SimpleITK — whose registration runs in the same
process after the predictor is made — on one thread (`deterministic_torch`), so label maps and scores
repeat bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfusion.device import pick_device, repeatable_registration
from medfusion.infer.postprocess import postprocess_labels
from medfusion.infer.windowed import default_sw_batch_size, forward_case
from medfusion.io.volume import LabelMap, Volume
from medfusion.measure.features import FEATURES as MEASURE_FEATURES
from medfusion.measure.features import lesion_features
from medfusion.models.domain import DomainVerdict, EncoderFeatures, assess, case_facts
from medfusion.models.network import MedFusionNet, channels_last
from medfusion.package import DEFAULT_PACKAGE, load_domain_guard, load_package
from medfusion.preprocess.prepare import ModelInputs


@dataclasses.dataclass
class Prediction:
    """What `Predictor.predict` returns for one case, in the CT's own geometry.

    Attributes:
        labels: `LabelMap` (int16 (z', y', x') class indices into `Predictor.class_names`) on the CT's
            grid: the argmax of `probabilities` after `infer.postprocess.postprocess_labels` (core-less
            lesions dropped when configured). Carries the CT's meta, modality "SEG".
        probabilities: `Volume` (K, z', y', x') float32 softmax class probabilities on the CT's grid,
            averaged over the test-time flips and linearly resampled from the model grid (outside
            it: background 1, other classes 0); each voxel sums to 1 over the K classes.
        scores: calibrated (temperature-scaled) probability in [0, 1] per score name.
        uncertainty: per score name, the standard deviation (Bessel-corrected) of the calibrated
            probability over the samples: one per test-time flip, plus `mc_samples` × flips with
            dropout on in the score head. NaN when there is only one sample (no flip, no MC dropout).
        features: the label map's measurements the scores read (`measure.features.FEATURES`,
            measured on the model grid), when the network has `measures`; empty otherwise.
        model_probabilities: the same probabilities on the model grid (`ModelInputs.grid`).
        domain_features: float64 (D,) pooled encoder features of the unflipped pass, for the domain
            check (models/domain.py).
    """

    labels: LabelMap
    probabilities: Volume
    scores: dict[str, float]
    uncertainty: dict[str, float]
    features: dict[str, float] = dataclasses.field(default_factory=dict)
    model_probabilities: Volume | None = None
    domain_features: np.ndarray | None = None


def deterministic_torch(device: torch.device) -> None:
    """Ask for repeatable numbers (process-wide): torch's deterministic algorithms, cuDNN without
    autotuning, cuBLAS with a fixed workspace (set before its first call); and SimpleITK on one thread
    (`device.repeatable_registration`, which the training cache calls too: on 2 threads ITK's
    multithreaded Mattes sums move the same seeded registration by up to 0.12 mm from call to call).
    The cost is the registration's (and resampling's) parallelism: 1.25× on one small pair."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    repeatable_registration()


@contextlib.contextmanager
def mc_dropout_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the generators dropout draws from on `device` (the CPU's, and CUDA's or MPS's for those
    devices) with `seed`, and restore their states on exit (`torch.random.fork_rng`).

    Only the generators that are forked are seeded: `torch.manual_seed` would reseed every CUDA
    device while the fork restored the one in use only, leaving the others' random streams reset
    for the rest of the process.
    """
    accel = device.type if device.type in ("cuda", "mps") else None
    index = (
        (device.index if device.index is not None else torch.cuda.current_device()) if accel == "cuda" else 0
    )
    with torch.random.fork_rng(devices=[index] if accel else [], device_type=accel or "cuda"):
        torch.random.default_generator.manual_seed(seed)
        if accel == "cuda":
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        elif accel == "mps":
            torch.mps.manual_seed(seed)
        yield


class Predictor:
    """Loads a model package once; `predict` maps one `ModelInputs` to a `Prediction`.

    Making a predictor calls `deterministic_torch`, which changes process-wide torch and SimpleITK
    settings (deterministic algorithms, one SimpleITK thread).

    Args:
        package: model package folder (`model.json` + `weights.safetensors`); None: the bundled default.
        device: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N" or "mps".
        tta: also run the x-flipped volume (last array axis) and average the probabilities.
        mc_samples: Monte-Carlo dropout passes of the score head per head input (0: none), for
            `Prediction.uncertainty`.
        amp: bf16 autocast; only takes effect on CUDA.
        sliding_window: segment with windows of the package's training crop size (z, y, x voxels)
            when the package records one; False, or a package without one: the whole grid in one pass.
        lesions_need_core: set connected lesions without a tumour-core voxel to background (packages
            whose classes include "tumour_core").
        window_overlap: fraction in [0, 1) by which neighbouring windows overlap.
        sw_batch_size: windows per network call; None: 8 on CUDA, 2 otherwise.
        seed: seed of the MC-dropout generator, so the same case gives the same uncertainty.

    Raises:
        ValueError: `device` is not a device name or is not available on this machine; or the
            package's domain guard files are inconsistent (`package.load_domain_guard`).
        PackageError: the package is missing, unreadable, of an unknown architecture, its weights
            fail their SHA-256 check, or they do not fit the network `model.json` describes.

    Attributes:
        meta: the package's `model.json`, typed (`package.PackageMeta`: `meta.preprocess`,
            `meta.window`, `meta.block("domain")`, …).
        guard: its fitted domain guard, or None.

    Examples:
        >>> Predictor.__name__
        'Predictor'
    """

    def __init__(
        self,
        package: str | Path | None = None,
        device: str = "auto",
        *,
        tta: bool = True,
        mc_samples: int = 8,
        amp: bool = False,
        sliding_window: bool = True,
        lesions_need_core: bool = True,
        window_overlap: float = 0.5,
        sw_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        self.device = pick_device(device)
        deterministic_torch(self.device)
        self.package = Path(package) if package is not None else DEFAULT_PACKAGE
        self.model, self.meta = load_package(self.package, self.device)
        self.guard = load_domain_guard(self.package, self.meta)
        self.seed = seed
        self.model = self.model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        self.tta = tta
        self.mc_samples = mc_samples
        self.amp = amp and self.device.type == "cuda"
        # windows of the training crop size, as the network was trained (see infer/windowed.py)
        self.roi = self.meta.window if sliding_window else None
        self.window_overlap = window_overlap
        self.sw_batch_size = sw_batch_size or default_sw_batch_size(self.device)
        self.class_names: list[str] = list(self.meta.class_names)
        self.lesions_need_core = lesions_need_core
        self.score_names: list[str] = list(self.meta.score_names)

    @property
    def net(self) -> MedFusionNet:
        """The loaded network (in `channels_last_3d` memory order, on `device`)."""
        return self.model

    def _passes(
        self, ct: torch.Tensor, mr: torch.Tensor, has: torch.Tensor, note: str, features: EncoderFeatures
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        flips: list[tuple[int, ...]] = [()] + ([(4,)] if self.tta else [])
        return forward_case(
            self.model,
            ct,
            mr,
            has,
            note,
            self.roi,
            flips,
            amp=self.amp,
            overlap=self.window_overlap,
            sw_batch_size=self.sw_batch_size,
            features=features,
        )

    @torch.inference_mode()
    def predict(self, t: ModelInputs) -> Prediction:
        """Segment and score one prepared case.

        Segmentation runs on the model grid (sliding windows of the training crop size unless
        disabled), averaged over the test-time flips; the diagnosis head reads the whole volume or,
        with windows, one window centred on the predicted lesion (infer/windowed.py). Scores are
        temperature-calibrated; with MC dropout, the dropout masks come from a generator seeded with
        `seed` whose state is restored afterwards. Deterministic for the same input, package and device.

        Args:
            t: `preprocess.prepare.prepare_case` output: `t.ct` float32 (C_ct, z, y, x) CT windows in
                [0, 1], `t.mr` float32 (1, z, y, x) robust z-scored MR (zeros when absent), on the
                model grid `t.grid`; `t.ct_volume` gives the CT grid the outputs are mapped back to.

        Returns:
            The Prediction: probabilities on both grids, the label map on the CT grid, scores and
            their uncertainty, and the encoder features for `assess`.

        Raises:
            RuntimeError: the network cannot take the grid (with the whole volume in one pass, every
                model-grid axis must be divisible by 2 ** (len(network.channels) - 1), 8 for the
                default four levels; sliding windows take the crop size and need no such grid), or
                from torch (e.g. CUDA out of memory).
        """
        dev = self.device
        ct = channels_last(torch.from_numpy(t.ct).float()[None].to(dev))
        mr = channels_last(torch.from_numpy(t.mr).float()[None].to(dev))
        has = torch.tensor([t.has_mr], device=dev)
        self.model.eval()
        recorder = EncoderFeatures(self.model)
        probs, heads = self._passes(ct, mr, has, t.note, recorder)
        off = self.model.note_logits([t.note]).float()
        score = self.model.score_logits
        pg = probs[0].cpu().numpy()
        features: dict[str, float] = {}
        meas = None
        if self.model.cfg.measures:  # measurements of the label map on the model grid, as in training
            f = lesion_features(pg.argmax(0), t.grid.spacing_zyx, self.class_names)
            features = {n: round(float(v), 4) for n, v in zip(MEASURE_FEATURES, f, strict=True)}
            meas = torch.from_numpy(f)[None].to(dev)
        samples = [self.model.calibrated(score(h, off, meas)) for h in heads]
        if self.mc_samples > 0:
            self.model.score_head.train()  # dropout on, for Monte-Carlo sampling of the score head only
            # the same case gives the same uncertainty; every random state it touches is restored
            with mc_dropout_rng(dev, self.seed):
                for _ in range(self.mc_samples):
                    for h in heads:
                        samples.append(self.model.calibrated(score(h, off, meas)))
            self.model.score_head.eval()
        point = (
            self.model.calibrated(torch.stack([score(h, off, meas) for h in heads]).mean(0))[0].cpu().numpy()
        )
        spread = torch.cat(samples).std(0).cpu().numpy()
        on_ct = t.probabilities_on_ct(pg)
        labels = postprocess_labels(
            on_ct.array.argmax(0).astype(np.uint8), self.class_names, self.lesions_need_core
        )
        ct_grid, ct_meta = t.ct_volume.grid, t.ct_volume.meta
        return Prediction(
            LabelMap.on(ct_grid, labels.astype(np.int16), "SEG", ct_meta),
            on_ct,
            {n: float(point[i]) for i, n in enumerate(self.score_names)},
            {n: float(spread[i]) for i, n in enumerate(self.score_names)},
            features,
            Volume.on(t.grid, pg, "PROB"),
            recorder.vector(),
        )

    def assess(self, case: Any, pred: Prediction, mr_used: bool) -> DomainVerdict:
        """The domain verdict for a predicted case (`case`: io.case.Case; `mr_used`: whether its MR
        reached the model). Without a fitted guard in the package, only the rules that need no training
        run (CT in Hounsfield units, MR not a CT)."""
        return assess(self.guard, case_facts(case, mr_used), pred.domain_features)

    def describe(self) -> dict[str, Any]:
        """The package's identity for run records: name, version, architecture, weights' SHA-256
        (values from `model.json`, None where absent) and whether a fitted domain guard was loaded."""
        return {
            "name": self.meta.name,
            "version": self.meta.version,
            "architecture": self.meta.architecture,
            "weights_sha256": self.meta.weights_sha256,
            "domain_guard": bool(self.guard),
        }
