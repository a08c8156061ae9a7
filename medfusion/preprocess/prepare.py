"""The one entry point that turns a Case into model inputs, for training and inference alike,
with the inverse mapping back to the CT's own grid."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from medfusion.config import PreprocessConfig
from medfusion.io.case import Case
from medfusion.io.errors import InputError
from medfusion.io.volume import Volume
from medfusion.preprocess.intensity import ct_windows, mr_robust_z
from medfusion.preprocess.registration import RegistrationResult, register
from medfusion.preprocess.resample import model_grid, probabilities_to_grid, resample


@dataclasses.dataclass
class CaseTensors:
    """Model inputs for one case, and what is needed to map outputs back."""

    patient_id: str
    ct: np.ndarray  # (C_ct, z, y, x) on the model grid
    mr: np.ndarray  # (1, z, y, x) on the model grid (zeros when absent)
    has_mr: bool
    note: str
    grid: Volume  # the model grid (geometry; empty-ish array)
    ct_volume: Volume  # the CT in its own geometry
    mr_in_ct: Volume | None  # the primary MR resampled onto the CT grid
    registration: RegistrationResult | None
    target: np.ndarray | None = None  # (z, y, x) integer labels on the model grid
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def image(self) -> np.ndarray:
        """All channels stacked: CT windows then MR."""
        return np.concatenate([self.ct, self.mr], axis=0)

    def to_ct_grid(self, probs: np.ndarray) -> np.ndarray:
        """Class probabilities on the model grid → on the CT's own grid."""
        return probabilities_to_grid(probs, self.grid, self.ct_volume)


def prepare_case(
    case: Case, cfg: PreprocessConfig, registration: RegistrationResult | None = None
) -> CaseTensors:
    """Register (unless given), resample and normalise one case."""
    if case.ct is None:
        raise InputError(case.folder, "no CT volume found; medfusion needs a CT (MR and note are optional)")
    t: dict[str, float] = {}
    ct = case.ct
    grid = model_grid(ct, cfg.target_spacing_mm, cfg.target_size)
    t0 = time.perf_counter()
    mr_in_ct = None
    mr_grid = np.zeros((1, *grid.shape), np.float32)
    mr = case.primary_mr
    if mr is not None:
        if registration is None:
            registration = register(ct, mr, cfg.registration)
        t["register"] = time.perf_counter() - t0
        mr_in_ct = resample(mr, ct, registration.matrix, default=0.0)
        on_grid = resample(mr, grid, registration.matrix, default=0.0)
        head = on_grid.array > 0.1 * np.percentile(on_grid.array, 99)
        mr_grid = mr_robust_z(on_grid.array, head, cfg.mr_percentiles)[None]
    t1 = time.perf_counter()
    ct_on_grid = resample(ct, grid, default=-1024.0)
    ct_chan = ct_windows(ct_on_grid.array, cfg.ct_windows)
    target = None
    if case.labels is not None:
        if not case.labels.same_grid(ct, tol=1e-3):
            raise InputError(case.labels.meta.get("source", case.folder), "label map is not on the CT's grid")
        target = resample(case.labels, grid, label=True).array.astype(np.int64)
    t["resample"] = time.perf_counter() - t1
    return CaseTensors(
        case.patient_id,
        ct_chan,
        mr_grid,
        mr is not None,
        case.note,
        grid,
        ct,
        mr_in_ct,
        registration,
        target,
        t,
    )
