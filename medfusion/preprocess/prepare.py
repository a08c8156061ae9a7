"""The one entry point that turns a Case into model inputs (`ModelInputs`), for training and inference
alike, with the inverse mapping back to the CT's own grid.

The decision whether the MR reaches the model is made here, from the registration's QC, so that the
training cache and a run cannot disagree on it: an MR whose registration failed its QC is left out
(`ModelInputs.has_mr` False; `mr_reason` says why).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from medfusion.config import PreprocessConfig
from medfusion.io.case import Case
from medfusion.io.errors import InputError
from medfusion.io.volume import Grid, LabelMap, Volume
from medfusion.preprocess.intensity import ct_windows, mr_head_mask, mr_robust_z
from medfusion.preprocess.registration import RegistrationResult, register
from medfusion.preprocess.resample import model_grid

MR_USED = "used"
MR_ABSENT = "no MR volume"
MR_FAILED_QC = "registration failed its QC"


@dataclasses.dataclass
class ModelInputs:
    """Model inputs for one case, which modalities reach the model and why, and the way back.

    Attributes:
        patient_id: the case's id.
        ct: float32 (C_ct, z, y, x) CT windows in [0, 1] on `grid`.
        mr: float32 (1, z, y, x) robust z-scored MR on `grid` (zeros when the case has none). When the
            registration failed its QC the registered MR is kept here for the record, but `has_mr`
            is False and the network ignores it.
        has_mr: whether the MR reaches the model (present and registration QC passed).
        mr_reason: why or why not: "used", "no MR volume" or "registration failed its QC".
        note: the clinical note (may be empty).
        grid: the model grid (`Grid`: `cfg.target_size` voxels of `cfg.target_spacing_mm`).
        ct_volume: the CT in its own geometry: the grid outputs are mapped back to.
        mr_in_ct: the primary MR resampled onto the CT's grid (linear, 0 outside), None without MR.
        registration: the MR→CT registration (matrix, metric, QC), None without MR.
        target: int64 (z, y, x) reference labels on `grid` (nearest), None without labels.
        timings: seconds per step ("register", "resample").
    """

    patient_id: str
    ct: np.ndarray
    mr: np.ndarray
    has_mr: bool
    note: str
    grid: Grid
    ct_volume: Volume
    mr_in_ct: Volume | None
    registration: RegistrationResult | None
    target: np.ndarray | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    mr_reason: str = MR_ABSENT

    @property
    def modalities(self) -> dict[str, str]:
        """Each input modality and whether it reaches the model ("used" or why not)."""
        return {"CT": MR_USED, "MR": self.mr_reason, "note": MR_USED if self.note else "no note"}

    @property
    def mr_shown(self) -> Volume | None:
        """The MR on the CT's grid when the model used it, else None (never show an MR it left out)."""
        return self.mr_in_ct if self.has_mr else None

    def image(self) -> np.ndarray:
        """All channels stacked, (C_ct + 1, z, y, x): CT windows then MR."""
        return np.concatenate([self.ct, self.mr], axis=0)

    def to_ct_grid(self, probs: np.ndarray) -> np.ndarray:
        """(K, z, y, x) class probabilities on the model grid → (K, z', y', x') float32 on the CT's own
        grid (linear; outside the model grid class 0 gets 1, the others 0)."""
        return self.probabilities_on_ct(probs).array

    def probabilities_on_ct(self, probs: np.ndarray) -> Volume:
        """`to_ct_grid` as a (K, z', y', x') `Volume` on the CT's grid (the inverse mapping; the CT's meta)."""
        out = np.empty((probs.shape[0], *self.ct_volume.shape), np.float32)
        for c in range(probs.shape[0]):
            out[c] = (
                Volume.on(self.grid, probs[c].astype(np.float32))
                .resample_to(self.ct_volume.grid, default=1.0 if c == 0 else 0.0)
                .array
            )
        return Volume.on(self.ct_volume.grid, out, "PROB", self.ct_volume.meta)


def prepare_case(
    case: Case, cfg: PreprocessConfig, registration: RegistrationResult | None = None
) -> ModelInputs:
    """Register (unless given), resample and normalise one case; decide whether the MR is used.

    The model grid is `cfg.target_size` (x, y, z) voxels of `cfg.target_spacing_mm`, axis-aligned with
    the CT and centred on it. The CT is resampled linearly (−1024 HU outside it) and split into
    `cfg.ct_windows` channels in [0, 1]; the primary MR is registered onto the CT, resampled (0 outside)
    and robust-z-scored where it exceeds 10 % of its 99th percentile (clipped to ±5, 0 elsewhere);
    reference labels, if any, are resampled nearest-neighbour. An MR whose registration fails its QC
    (`RegistrationResult.passed` False) is left out of the model (`has_mr` False), in training and
    inference alike.

    Args:
        case: the loaded case; `case.ct` is required, the MR, note and labels are optional.
        cfg: the preprocessing (the model package's, for inference).
        registration: a registration already made for this CT/MR pair (e.g. when resuming); None:
            register with `cfg.registration`.

    Returns:
        ModelInputs on the model grid, the CT and the MR on the CT's grid, the registration, and
        seconds spent per step in `timings`.

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
    reason = MR_ABSENT
    if mr is not None:
        if registration is None:
            registration = register(ct, mr, cfg.registration)
        t["register"] = time.perf_counter() - t0
        mr_in_ct = mr.resample_to(ct, registration.matrix, default=0.0)
        on_grid = mr.resample_to(grid, registration.matrix, default=0.0)
        head = mr_head_mask(on_grid.array)
        mr_grid = mr_robust_z(on_grid.array, head, cfg.mr_percentiles)[None]
        reason = MR_USED if registration.passed else MR_FAILED_QC
    t1 = time.perf_counter()
    ct_chan = ct_windows(ct.resample_to(grid, default=-1024.0).array, cfg.ct_windows)
    target = None
    if case.labels is not None:
        if not case.labels.same_grid(ct, tol=1e-3):
            raise InputError(case.labels.meta.get("source", case.folder), "label map is not on the CT's grid")
        target = LabelMap.of(case.labels).resample_to(grid).array.astype(np.int64)
    t["resample"] = time.perf_counter() - t1
    return ModelInputs(
        case.patient_id,
        ct_chan,
        mr_grid,
        reason == MR_USED,
        case.note,
        grid,
        ct,
        mr_in_ct,
        registration,
        target,
        t,
        reason,
    )
