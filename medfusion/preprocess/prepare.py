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
    """Register (unless given), resample and normalise one case.

    The model grid is `cfg.target_size` (x, y, z) voxels of `cfg.target_spacing_mm`, axis-aligned with
    the CT and centred on it. The CT is resampled linearly (−1024 HU outside it) and split into
    `cfg.ct_windows` channels in [0, 1]; the primary MR is registered onto the CT, resampled (0 outside)
    and robust-z-scored where it exceeds 10 % of its 99th percentile (clipped to ±5, 0 elsewhere);
    reference labels, if any, are resampled nearest-neighbour.

    Args:
        case: the loaded case; `case.ct` is required, the MR, note and labels are optional.
        cfg: the preprocessing (the model package's, for inference).
        registration: a registration already made for this CT/MR pair (e.g. when resuming); None:
            register with `cfg.registration`.

    Returns:
        CaseTensors: `ct` float32 (len(cfg.ct_windows), z, y, x), `mr` float32 (1, z, y, x) (zeros
        without an MR), `target` int64 (z, y, x) or None, on the model grid; the CT and the MR on the
        CT's grid; the registration; seconds spent per step in `timings`.

    Raises:
        InputError: the case has no CT; a label map not on the CT's grid (1e-3 tolerance); or an
            unreadable transform file (registration mode "file").
        ValueError: a non-positive target spacing, or registration mode "file" without a file.
    """
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
