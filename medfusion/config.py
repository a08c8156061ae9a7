"""Typed, validated configuration. Unknown keys are errors; YAML files are validated on load."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class RegistrationConfig(StrictModel):
    """How the MR is registered onto the CT (preprocess/registration.py) and how that is checked.

    Distances are millimetres, angles degrees. Fields without a comment below:

    Attributes:
        mode: "auto" estimates the transform; "skip" uses the identity (the images are taken as
            already aligned); "file" reads a 4×4 CT → MR matrix (LPS mm) from `transform_file`.
        transform_file: the transform for mode "file" (required there: `register` raises ValueError).
        affine: after the rigid fit, refine a full affine transform.
        shrink_factors: pyramid levels' shrink factors relative to the working grid, coarse to fine;
            `smoothing_mm` (Gaussian sigma, mm) and `sampling` (fraction in (0, 1] of the fixed mask's
            voxels the metric samples) give one value per level, in the same order.
        iterations: optimiser iterations of the fine pyramid stage (the coarse refinement of each
            rotation candidate runs 80).
        histogram_bins: Mattes mutual-information histogram bins (Mattes et al., IEEE TMI 2003).
        sampling_strategy: the metric's sampling of the fixed image ("random" or "regular").
        rotation_search_deg: half-range of the exhaustive coarse rotation search (0: off).
        consistency_check: also register CT onto MR and compare the round trip (QC).
        max_consistency_mm: largest accepted mean round-trip distance over 200 CT head points, mm.
        seed: seed of the metric's sampling and of the QC's point draws.
    """

    mode: Literal["auto", "skip", "file"] = "auto"
    transform_file: str | None = None
    affine: bool = False
    shrink_factors: list[int] = [4, 2, 1]
    smoothing_mm: list[float] = [2.0, 1.0, 0.0]
    sampling: list[float] = [0.2, 0.1, 0.05]
    iterations: int = 200
    # rotation-search starts refined at the coarse levels (3 until 0.5: the same TRE on 40 test pairs,
    # ≈ 15-30 % slower; benchmarks/RESULTS.md)
    candidates: int = 2
    histogram_bins: int = 32
    sampling_strategy: Literal["random", "regular"] = "random"
    # the metric's fixed mask is the CT head mask grown by this much, so that the skin-air edge is
    # sampled from both sides (0: the head mask itself, the default before 0.3; 8 mm: median TRE 0.74 →
    # 0.62 mm on 10 test pairs at +7 % time, benchmarks/RESULTS.md)
    mask_dilation_mm: float = Field(default=8.0, ge=0.0)
    # a last pass at full resolution on images smoothed by `polish_smoothing_mm`, with a coarser
    # histogram: median TRE 0.62 → 0.48 mm on 10 test pairs (benchmarks/RESULTS.md); 0: off
    polish_iterations: int = Field(default=100, ge=0)
    polish_smoothing_mm: float = Field(default=1.0, ge=0.0)
    polish_histogram_bins: int = Field(default=16, ge=4)
    rotation_search_deg: float = 15.0
    # the images are reduced to this spacing (mm; an image's own spacing where coarser) before any metric
    # evaluation, so that cost follows the head's size, not the scanner's matrix (0: each image's own
    # grid, the behaviour before 0.8). 1.5 mm leaves the standard synthetic pair (1.6-2.5 mm) as it is.
    working_spacing_mm: float = Field(default=1.5, ge=0.0)
    consistency_check: bool = True
    max_consistency_mm: float = 5.0
    # a round trip beyond max_consistency_mm but within this is settled by the forward metric at both
    # estimates; beyond it the registration fails (two far-apart optima: the images do not decide)
    max_consistency_settle_mm: float = 20.0
    # identity fields (patient_id, study_uid, frame_of_reference_uid) that must not differ between CT
    # and MR; the others are reported as warnings when they differ (a CT and an MR are usually two
    # studies with two frames of reference)
    identity_must_match: list[Literal["patient_id", "study_uid", "frame_of_reference_uid"]] = ["patient_id"]
    # the share of the MR's foreground that must lie inside the CT's field of view
    min_fov_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    # QC: registering again from the transform must not move the head's points by more than this (mean mm)
    max_reoptimisation_mm: float = Field(default=2.0, gt=0.0)
    seed: int = 1


# Values that settings stored before a field existed stand for (the field's default has changed since):
# a stored record without the field was made with this value, not with today's default.
LEGACY_REGISTRATION: dict[str, object] = {
    "mask_dilation_mm": 0.0,
    "sampling_strategy": "random",
    "polish_iterations": 0,
    "polish_smoothing_mm": 1.0,
    "polish_histogram_bins": 16,
    "working_spacing_mm": 0.0,
}
# Fields that existed for a while and were removed, with the value that meant what the code does now:
# a stored record holding that value is read without the field; any other value stays a mismatch.
REMOVED_REGISTRATION: dict[str, object] = {"consistency_levels": "coarse", "min_head_dice": 0.85}


def upgrade_registration(stored: dict[str, object]) -> dict[str, object]:
    """Stored registration settings as today's fields: absent new fields take their old values,
    removed fields that held what the code now does are dropped."""
    out = {**LEGACY_REGISTRATION, **stored}
    for key, value in REMOVED_REGISTRATION.items():
        if key in out and out[key] == value:
            del out[key]
    return out


class PreprocessConfig(StrictModel):
    """How a case becomes model inputs (`preprocess.prepare.prepare_case`); stored in a model package.

    Attributes:
        target_spacing_mm: the model grid's spacing in mm, one value or (x, y, z), positive.
        target_size: the model grid's size in voxels (x, y, z); the array is (z, y, x). Without sliding
            windows every axis must be divisible by 2 ** (len(NetConfig.channels) - 1) (8 by default).
        ct_windows: (low, high) HU windows, one CT channel each, clipped and scaled to [0, 1].
        mr_percentiles: (low, high) percentiles whose spread scales the MR's robust z-score.
        registration: MR → CT registration settings.
    """

    # one value (isotropic) or x, y, z; matching the CT's own spacing and size makes the model grid the
    # CT grid, so nothing is interpolated on the way back
    target_spacing_mm: float | list[float] = 2.5
    target_size: list[int] = Field(default=[80, 80, 80], min_length=3, max_length=3)
    ct_windows: list[list[float]] = [[-20.0, 100.0], [-200.0, 1600.0]]
    mr_percentiles: list[float] = [1.0, 99.0]
    registration: RegistrationConfig = RegistrationConfig()


class InferConfig(StrictModel):
    """Inference settings, passed to `infer.predictor.Predictor` (see its arguments).

    Attributes:
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        tta: test-time augmentation with the x-flipped volume.
        mc_samples: Monte-Carlo dropout passes of the score head (0: none), for the uncertainty.
    """

    device: str = "auto"
    tta: bool = True
    mc_samples: int = 8
    # bf16 autocast on a GPU. Off: on an H200 (benchmarks/gpu_infer.py, RESULTS "GPU") it made inference
    # slower (0.69 vs 0.34 s per patient at 4 windows per call) and moved calcification voxels (label
    # maps' Dice with the CPU's down to 0.976, fp32 on the GPU: 1.000)
    amp: bool = False
    # segment with windows of the model's training crop size (False: the whole volume in one pass)
    sliding_window: bool = True
    # fraction by which neighbouring windows overlap. At 0.5 the windows fall evenly over the
    # 128 × 128 × 96 grid (3 per axis, the same count as at 0.25, so the same time) instead of bunching
    # at the far edge; dev cohort: tumour-core Dice +0.020 (benchmarks/RESULTS.md). Training validation
    # has its own setting (TrainConfig.val_window_overlap).
    window_overlap: float = Field(default=0.5, ge=0.0, lt=1.0)
    # windows per network call (None: 8 on a GPU, 2 on the CPU; benchmarks/gpu_infer.py, RESULTS "GPU")
    sw_batch_size: int | None = Field(default=None, ge=1)
    # set lesions (connected foreground) without a tumour-core voxel to background: oedema and
    # calcification islands with no tumour are false positives (infer/postprocess.py); applies to
    # packages whose classes include "tumour_core"
    lesions_need_core: bool = True


class OutputConfig(StrictModel):
    """Optional outputs of a run per patient.

    Attributes:
        dicom_seg: also write the label map as a DICOM SEG (only for a CT read from DICOM).
        report: write the PDF report.
    """

    dicom_seg: bool = True
    report: bool = True
    # probabilities.nii.gz: the class probabilities on the CT grid before the argmax and the clean-up
    # (4-D, classes last, uint8 scaled by 1/255), for ensembling, other thresholds or uncertainty maps
    probabilities: bool = False


class DecisionConfig(StrictModel):
    """How a calibrated probability p in [0, 1] becomes a per-score decision in scores.json.

    "positive" when p ≥ `threshold`, "negative" below, "indeterminate" when p lies in the band
    `indeterminate_band` = [low, high) (low ≤ p < high), and "not assessed" out of the model's domain.
    A band with low == high is empty (every in-domain case positive or negative).

    Attributes:
        threshold: the decision threshold, in (0, 1); scores.json "threshold" and "predicted".
        indeterminate_band: (low, high) with 0 ≤ low ≤ threshold ≤ high ≤ 1.

    Raises:
        ValueError (pydantic ValidationError): a band that is not ordered around the threshold.
    """

    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    indeterminate_band: tuple[float, float] = (0.4, 0.6)

    @model_validator(mode="after")
    def _band_around_threshold(self) -> DecisionConfig:
        low, high = self.indeterminate_band
        if not 0.0 <= low <= self.threshold <= high <= 1.0:
            msg = f"indeterminate_band {list(self.indeterminate_band)} must satisfy 0 ≤ low ≤ threshold ({self.threshold}) ≤ high ≤ 1"
            raise ValueError(msg)
        return self


class PipelineConfig(StrictModel):
    """A pipeline file (`pipelines/*.yaml`): which preprocessing, inference and outputs a run uses.

    Attributes:
        name: the pipeline's name, recorded with the whole config in run.json.
        decision: the threshold and the indeterminate band of the per-score decision.
    """

    name: str = "default"
    # the reverse-registration consistency check is QC, not a model input: on by default at run time
    # whatever the package's training preprocessing said
    registration_consistency_check: bool = True
    # which settings register the MR onto the CT when `preprocess` is not given: "library" — this
    # version's RegistrationConfig defaults (the most accurate measured, benchmarks/RESULTS.md; what
    # `medfusion register` uses); "package" — the ones stored in the model package, i.e. what its
    # training cases were registered with. The package's mode and transform file are kept either way.
    registration: Literal["library", "package"] = "library"
    preprocess: PreprocessConfig | None = None  # None: the model package's own preprocessing
    infer: InferConfig = InferConfig()
    outputs: OutputConfig = OutputConfig()
    decision: DecisionConfig = DecisionConfig()


def load_yaml_model(path: str | Path, model: type[BaseModel]) -> Any:
    """Read and validate a YAML file into `model`; errors name the file and the bad keys.

    Raises:
        ValueError: the file cannot be read or parsed as YAML, or does not validate (unknown keys too).
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        msg = f"{path}: cannot read YAML ({exc})"
        raise ValueError(msg) from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        msg = f"{path}: invalid config ({problems})"
        raise ValueError(msg) from exc
