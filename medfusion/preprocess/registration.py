"""Rigid (optionally affine) MR → CT registration with SimpleITK, and its quality check.

Cost is set in millimetres, not voxels: each image is first reduced (block averages, then linear
resampling) to a working grid of `working_spacing_mm` — or its own spacing where that is coarser —
and every metric evaluation, mask and pyramid level works there, so a 512 × 512 CT costs about what
a 128 × 128 one does. The transform found is applied once, at full resolution, by the caller
(`Volume.resample_to`).

Recipe: head masks; moments-centred start; an exhaustive coarse rotation search (so that ±15°
starts converge); then Mattes mutual information over a multi-resolution pyramid, optimised by
regular-step gradient descent with physical-shift scales; last, a polishing pass at the working
resolution on images smoothed by 1 mm with a 16-bin histogram.

QC (`quality_check`): identities (PatientID, StudyInstanceUID, FrameOfReferenceUID where both
images carry them), the MR's field of view inside the CT's, the distance to a better-scoring
transform found by optimising again from it, and consistency with an independent reverse registration.
Each check records the value that decided it and its limit.

Transforms follow ITK: they map a CT (fixed) point in LPS mm to the MR (moving) point.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medfusion.config import RegistrationConfig
from medfusion.io.errors import InputError
from medfusion.io.volume import Volume, matrix_to_sitk, sitk_to_matrix
from medfusion.preprocess.intensity import CT_BODY_HU, mr_head_threshold

# --- Types ---


@dataclasses.dataclass
class RegistrationResult:
    """One MR → CT registration and its quality check, as `register` returns it and qc.json records it.

    Attributes:
        matrix: float (4, 4) homogeneous transform mapping a CT (fixed) point to the MR (moving) point,
            LPS mm (ITK's convention).
        metric: the Mattes mutual information at the end of the last optimisation (negative; lower is a
            better match; NaN for modes "skip" and "file").
        iterations: optimiser iterations over all levels and candidates (0 for "skip"/"file").
        seconds: wall time of the registration and its QC.
        mode: "auto", "skip" or "file" (`RegistrationConfig.mode`).
        qc: `quality_check`'s record {"passed", "reasons", "warnings", "checks"}; {} when no QC ran.
    """

    matrix: np.ndarray  # 4×4, CT point → MR point (LPS mm)
    metric: float
    iterations: int
    seconds: float
    mode: str
    qc: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Whether the QC passed: its "passed" flag; True when no QC ran (`qc` empty)."""
        return bool(self.qc.get("passed", True))

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready record of qc.json's "registration": "matrix_lps" (4 × 4 nested lists), the
        "convention" in words, "metric_mattes_mi", "iterations", "seconds" (rounded to ms), "mode", "qc"."""
        return {
            "matrix_lps": self.matrix.tolist(),
            "convention": "ITK: maps a CT (fixed) point in LPS mm to the corresponding MR (moving) point",
            "metric_mattes_mi": self.metric,
            "iterations": self.iterations,
            "seconds": round(self.seconds, 3),
            "mode": self.mode,
            "qc": self.qc,
        }


# --- Working images and masks ---


def working_image(vol: Volume, spacing_mm: float) -> sitk.Image:
    """`vol` as float32 on a grid of its own orientation and extent with `spacing_mm` along each axis
    (the volume's own spacing where that is coarser; 0: the volume's own grid).

    Block averages by the whole factor first (`BinShrink`: anti-aliased, and no full-resolution float
    copy), then linear resampling for the remainder. Shape (nz, ny, nx) of the reduced grid.
    """
    img = vol.to_sitk()
    native = np.asarray(vol.spacing, float)
    target = native if spacing_mm <= 0 else np.maximum(native, spacing_mm)
    factors = np.maximum(1, np.floor(target / native + 1e-6)).astype(int)
    if np.any(factors > 1):
        img = sitk.BinShrink(img, [int(f) for f in factors])
    img = sitk.Cast(img, sitk.sitkFloat32)
    spacing = np.asarray(img.GetSpacing(), float)
    if np.allclose(spacing, target, rtol=0.02):
        return img
    size = np.maximum(1, np.floor(np.asarray(img.GetSize()) * spacing / target)).astype(int)
    direction = np.asarray(img.GetDirection(), float).reshape(3, 3)
    origin = np.asarray(img.GetOrigin(), float) + direction @ ((target - spacing) / 2)
    return sitk.Resample(
        img,
        [int(n) for n in size],
        sitk.Transform(),
        sitk.sitkLinear,
        origin.tolist(),
        target.tolist(),
        img.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )


def _foreground(img: sitk.Image, modality: str) -> sitk.Image:
    """Head/body mask of a float image: a threshold, the largest component, holes filled (uint8)."""
    if modality == "CT":
        mask = img > CT_BODY_HU
    else:
        mask = img > mr_head_threshold(sitk.GetArrayViewFromImage(img))
    cc = sitk.ConnectedComponent(mask)
    mask = sitk.RelabelComponent(cc, sortByObjectSize=True) == 1
    mask = sitk.BinaryMorphologicalClosing(mask, [2, 2, 2])
    return sitk.BinaryFillhole(mask)


def head_mask(vol: Volume, spacing_mm: float = 0.0) -> sitk.Image:
    """Foreground (head/body) mask on `vol`'s grid (or its working grid of `spacing_mm`), uint8.

    CT: above `preprocess/intensity.CT_BODY_HU` (−500 HU). MR: above `mr_head_threshold` (10 % of the 99th percentile; Otsu would keep
    only the bright tissues of a T1 image and lose the skull and CSF inside the scalp).
    """
    return _foreground(working_image(vol, spacing_mm), vol.modality)


@dataclasses.dataclass
class _Working:
    """One image as the metric sees it: on its working grid, intensities clamped, with its head mask."""

    image: sitk.Image  # float32; CT clamped to soft tissue, MR to its 99.5th percentile
    mask: sitk.Image  # uint8 head/body mask on the same grid


def _prepare(vol: Volume, cfg: RegistrationConfig) -> _Working:
    """CT clamped to [−150, 150] HU (so that the histogram bins resolve grey/white/CSF rather than
    spanning air to bone), MR to [0, its 99.5th percentile]."""
    img = working_image(vol, cfg.working_spacing_mm)
    mask = _foreground(img, vol.modality)
    if vol.modality == "CT":
        lo, hi = -150.0, 150.0
    else:
        lo, hi = 0.0, float(np.percentile(sitk.GetArrayViewFromImage(img), 99.5))
    return _Working(sitk.Clamp(img, sitk.sitkFloat32, lo, hi), mask)


def _method(
    fmask: sitk.Image, sampling: list[float], cfg: RegistrationConfig, bins: int | None = None
) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(bins or cfg.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.REGULAR if cfg.sampling_strategy == "regular" else reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel(sampling, cfg.seed)
    reg.SetMetricFixedMask(fmask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def _metric_mask(fixed: _Working, cfg: RegistrationConfig) -> sitk.Image:
    """The fixed head mask grown by `mask_dilation_mm`, so that the skin–air edge is sampled from both sides."""
    if cfg.mask_dilation_mm <= 0:
        return fixed.mask
    radius = [max(1, int(round(cfg.mask_dilation_mm / sp))) for sp in fixed.mask.GetSpacing()]
    return sitk.BinaryDilate(fixed.mask, radius)


# --- Estimation ---


def _candidates(
    fixed: _Working, moving: _Working, fmask: sitk.Image, cfg: RegistrationConfig
) -> tuple[sitk.Euler3DTransform, list[tuple[float, tuple[float, ...]]]]:
    """Moments-centred start, then an exhaustive search over rotations (5 steps per axis spanning
    ±`rotation_search_deg`) at coarse resolution; returns the start and the ranked rotations."""
    init = sitk.CenteredTransformInitializer(
        sitk.Cast(fixed.mask, sitk.sitkFloat32),
        sitk.Cast(moving.mask, sitk.sitkFloat32),
        sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS,
    )
    tx = sitk.Euler3DTransform(init)
    if cfg.rotation_search_deg <= 0:
        return init, [(0.0, tuple(tx.GetParameters()))]
    reg = _method(fmask, [0.3], cfg)
    step = np.radians(cfg.rotation_search_deg / 2)
    shifts, shift_mm = _shift_search(fixed, moving)
    reg.SetOptimizerAsExhaustive([2, 2, 2, *shifts])
    reg.SetOptimizerScales([step, step, step, shift_mm, shift_mm, shift_mm])
    reg.SetShrinkFactorsPerLevel([cfg.shrink_factors[0]])
    reg.SetSmoothingSigmasPerLevel([3.0])
    reg.SetInitialTransform(tx, inPlace=True)
    seen: list[tuple[float, tuple[float, ...]]] = []
    reg.AddCommand(
        sitk.sitkIterationEvent, lambda: seen.append((reg.GetMetricValue(), tuple(tx.GetParameters())))
    )
    reg.Execute(fixed.image, moving.image)
    return init, sorted(seen)


def _shift_search(fixed: _Working, moving: _Working, step_mm: float = 10.0) -> tuple[list[int], float]:
    """Steps each side (x, y, z) of a translation search, for an MR that covers only part of the head.

    The moments-centred start puts the centroids of the two foregrounds together; when one image is a
    slab (its foreground spans less than 80 % of the other's along an axis) the slab's true place may
    be anywhere along that axis, so the search also tries shifts of `step_mm` spanning the difference."""
    f, m = _mask_points(fixed.mask, 4000, 0), _mask_points(moving.mask, 4000, 0)
    if len(f) == 0 or len(m) == 0:
        return [0, 0, 0], step_mm
    span_f, span_m = np.ptp(f, axis=0), np.ptp(m, axis=0)
    short = np.minimum(span_f, span_m) < 0.8 * np.maximum(span_f, span_m)
    steps = np.where(short, np.minimum(4, np.ceil(np.abs(span_f - span_m) / 2 / step_mm)), 0)
    return [int(n) for n in steps], step_mm


@dataclasses.dataclass(frozen=True)
class _Stage:
    """One optimiser run: its pyramid levels, histogram bins and first step (mm)."""

    shrink: list[int]
    smooth: list[float]
    sampling: list[float]
    bins: int | None = None  # None: cfg.histogram_bins
    learning_rate: float = 4.0


def _pyramid(cfg: RegistrationConfig, levels: slice) -> _Stage:
    return _Stage(cfg.shrink_factors[levels], cfg.smoothing_mm[levels], cfg.sampling[levels])


def _polish(cfg: RegistrationConfig) -> _Stage:
    """The working resolution on smoothed images with a coarser histogram, small first step."""
    return _Stage([1], [cfg.polish_smoothing_mm], cfg.sampling[-1:], cfg.polish_histogram_bins, 1.0)


def _refine(
    fixed: _Working,
    moving: _Working,
    fmask: sitk.Image,
    tx: sitk.Transform,
    cfg: RegistrationConfig,
    stage: _Stage,
    iterations: int,
) -> tuple[float, int]:
    reg = _method(fmask, stage.sampling, cfg, stage.bins)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=stage.learning_rate,
        minStep=1e-4,
        numberOfIterations=iterations,
        relaxationFactor=0.7,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(stage.shrink)
    reg.SetSmoothingSigmasPerLevel(stage.smooth)
    reg.SetInitialTransform(tx, inPlace=True)
    iters = [0]
    reg.AddCommand(sitk.sitkIterationEvent, lambda: iters.__setitem__(0, iters[0] + 1))
    reg.Execute(fixed.image, moving.image)
    return float(reg.GetMetricValue()), iters[0]


def _estimate(
    fixed: _Working, moving: _Working, cfg: RegistrationConfig, quick: bool = False
) -> tuple[np.ndarray, float, int]:
    """The top rotation-search candidates after a short coarse refinement, refined at the working
    resolution, and the best of them (`quick`: coarse levels only, as the independent reverse
    estimate of the QC).

    Candidates that the coarse refinement brought within `_SAME_OPTIMUM_MM` of a better-scoring one
    are dropped; each remaining one is refined to the end and they are ranked by `_evaluator` (one fixed
    sample at the working resolution). Neither the optimiser's last metric value (drawn from each level's
    own random samples) nor a ranking at the coarse positions is enough: on synthetic patients
    SYN00070000 and SYN00070006 (seed 7) the two candidates end in optima 2-5 mm apart whose order
    is only right once both are refined at full resolution (#24, benchmarks/RESULTS.md)."""
    fmask = _metric_mask(fixed, cfg)
    init, ranked = _candidates(fixed, moving, fmask, cfg)
    coarse, fine = _pyramid(cfg, slice(0, len(cfg.shrink_factors) - 1)), _pyramid(cfg, slice(1, None))
    score = _evaluator(fixed, moving, fmask, cfg) if min(cfg.candidates, len(ranked)) > 1 else None
    refined: list[tuple[float, float, sitk.Euler3DTransform]] = []
    total = 0
    for _, params in ranked[: cfg.candidates]:
        tx = sitk.Euler3DTransform(init)
        tx.SetParameters(params)
        metric, it = _refine(fixed, moving, fmask, tx, cfg, coarse, 80)
        total += it
        refined.append((score(sitk_to_matrix(tx)) if score is not None else metric, metric, tx))
    refined.sort(key=lambda r: r[0])
    pts = _mask_points(fixed.mask, 200, cfg.seed)
    kept: list[tuple[float, float, sitk.Euler3DTransform]] = []
    for cand in refined:
        at = _apply(sitk_to_matrix(cand[2]), pts)
        if all(_mean_distance(at, _apply(sitk_to_matrix(k[2]), pts)) > _SAME_OPTIMUM_MM for k in kept):
            kept.append(cand)
    if quick:
        return sitk_to_matrix(kept[0][2]), kept[0][1], total
    finals: list[tuple[float, float, sitk.Transform]] = []
    for _, _, tx in kept:
        metric, it = _refine(fixed, moving, fmask, tx, cfg, fine, cfg.iterations)
        total += it
        if cfg.polish_iterations > 0:
            metric, it = _refine(fixed, moving, fmask, tx, cfg, _polish(cfg), cfg.polish_iterations)
            total += it
        final: sitk.Transform = tx
        if cfg.affine:
            aff = sitk.AffineTransform(3)
            aff.SetMatrix(tx.GetMatrix())
            aff.SetTranslation(tx.GetTranslation())
            aff.SetCenter(tx.GetCenter())
            metric, it = _refine(fixed, moving, fmask, aff, cfg, fine, cfg.iterations)
            total += it
            final = aff
        finals.append(
            (score(sitk_to_matrix(final)) if score is not None and len(kept) > 1 else metric, metric, final)
        )
    _, metric, final = min(finals, key=lambda r: r[0])
    return sitk_to_matrix(final), metric, total


# two coarse-refined candidates closer than this (mean mm over 200 CT head points) are one optimum
_SAME_OPTIMUM_MM = 1.0


def _mean_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.linalg.norm(a - b, axis=1)))


# --- Public API ---


def register(ct: Volume, mr: Volume, cfg: RegistrationConfig | None = None) -> RegistrationResult:
    """Register `mr` onto `ct` as `cfg.mode` says, and attach the QC record.

    Both volumes are reduced once to their working grids (`cfg.working_spacing_mm`); the returned
    4×4 matrix maps CT points to MR points in LPS mm and is applied at full resolution by the caller.
    Raises ValueError for mode 'file' without a file, InputError for an unreadable transform file.
    """
    cfg = cfg or RegistrationConfig()
    t0 = time.perf_counter()
    needs_qc = cfg.mode != "skip" or cfg.consistency_check
    pair = (_prepare(ct, cfg), _prepare(mr, cfg)) if cfg.mode == "auto" or needs_qc else None
    if cfg.mode == "skip":
        res = RegistrationResult(np.eye(4), float("nan"), 0, 0.0, "skip")
    elif cfg.mode == "file":
        if not cfg.transform_file:
            msg = "registration mode 'file' needs transform_file"
            raise ValueError(msg)
        res = RegistrationResult(read_transform(cfg.transform_file), float("nan"), 0, 0.0, "file")
    else:
        assert pair is not None
        matrix, metric, iters = _estimate(*pair, cfg)
        res = RegistrationResult(matrix, metric, iters, time.perf_counter() - t0, "auto")
    if needs_qc:
        res.qc = quality_check(ct, mr, res.matrix, cfg, pair)
    res.seconds = time.perf_counter() - t0
    return res


# --- Quality check ---

IDENTITY_FIELDS = {
    "patient_id": "PatientID",
    "study_uid": "StudyInstanceUID",
    "frame_of_reference_uid": "FrameOfReferenceUID",
}


def compare_identity(ct: Volume, mr: Volume) -> dict[str, str]:
    """Per identity field (`IDENTITY_FIELDS`): "same", "differs", or "not compared" (absent from
    either image's metadata, e.g. NIfTI). The values themselves are not returned (PHI)."""
    out = {}
    for key in IDENTITY_FIELDS:
        a, b = str(ct.meta.get(key) or "").strip(), str(mr.meta.get(key) or "").strip()
        out[key] = "not compared" if not a or not b else ("same" if a == b else "differs")
    return out


def _check(value: Any, limit: Any, rule: str, passed: bool, **extra: Any) -> dict[str, Any]:
    return {"value": value, "limit": limit, "rule": rule, "passed": bool(passed), **extra}


def quality_check(
    ct: Volume,
    mr: Volume,
    matrix: np.ndarray,
    cfg: RegistrationConfig,
    pair: tuple[_Working, _Working] | None = None,
) -> dict[str, Any]:
    """Verdict on a CT → MR transform (4×4, LPS mm). Returns the qc.json record:

    `passed`, `reasons` (one line per failed check), `warnings`, and `checks` — each
    `{"value", "limit", "rule", "passed", ...}`, the value being the one that decided:
    - `identity`: identity fields that differ (`cfg.identity_must_match` must not);
    - `field_of_view`: fraction of the MR's foreground that the transform puts inside the CT's field of
      view (≥ `cfg.min_fov_fraction`);
    - `reoptimisation`: how far (mean mm over CT head points) a better-scoring transform lies, found
      by running the polishing pass again from the transform (≤ `cfg.max_reoptimisation_mm`);
    - `consistency` (when `cfg.consistency_check`): mean round-trip distance (mm) over 200 CT head
      points with an independent reverse registration (≤ `cfg.max_consistency_mm`); a larger one up to
      `cfg.max_consistency_settle_mm` is settled by the forward metric at both estimates, a larger one
      passes only when the reverse metric too prefers the transform (see `_consistency`).
    `pair` (the prepared working images) is reused when the caller already has it.

    Raises:
        RuntimeError: from ITK during an image check, other than for images that do not overlap (that
            is a failed check, not an error).
    """
    fixed, moving = pair or (_prepare(ct, cfg), _prepare(mr, cfg))
    checks: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    identity = compare_identity(ct, mr)
    differ = [k for k, v in identity.items() if v == "differs"]
    bad_id = [k for k in differ if k in cfg.identity_must_match]
    checks["identity"] = _check(
        differ, cfg.identity_must_match, "none of the limit's fields differ", not bad_id, compared=identity
    )
    for k in differ:
        if k not in bad_id:
            warnings.append(f"{IDENTITY_FIELDS[k]} differs between the CT and the MR")
    fov = _fov_fraction(fixed, moving, matrix)
    checks["field_of_view"] = _check(
        round(fov, 3), cfg.min_fov_fraction, "value >= limit", fov >= cfg.min_fov_fraction
    )
    fmask = _metric_mask(fixed, cfg)
    image_checks = {"reoptimisation": (_reoptimisation, cfg.max_reoptimisation_mm)}
    if cfg.consistency_check:
        image_checks["consistency"] = (_consistency, cfg.max_consistency_mm)
    for name, (run, limit) in image_checks.items():
        try:
            checks[name] = run(fixed, moving, fmask, matrix, cfg)
        except RuntimeError as exc:  # ITK: no metric samples where the images overlap
            if "overlap" not in str(exc) and "outside" not in str(exc):
                raise
            checks[name] = _check(None, limit, "value <= limit", False, error="the images do not overlap")
    reasons = [_reason(name, c) for name, c in checks.items() if not c["passed"]]
    return {"passed": not reasons, "reasons": reasons, "warnings": warnings, "checks": checks}


def qc_summary(qc: dict[str, Any]) -> str:
    """One line for a report: the verdict, then each check's deciding value against its limit."""
    if not qc.get("checks"):
        return ""
    parts = []
    for name, c in qc["checks"].items():
        if not isinstance(c, dict):  # a record written before 0.8
            continue
        value = (", ".join(c["value"]) or "none") if isinstance(c["value"], list) else c["value"]
        limit = ", ".join(c["limit"]) if isinstance(c["limit"], list) else c["limit"]
        parts.append(f"{name.replace('_', ' ')} {value} (limit {limit}: {'ok' if c['passed'] else 'FAILED'})")
    verdict = "PASSED" if qc.get("passed") else "FAILED — MR left out of the model"
    return f"{verdict}; " + "; ".join(parts)


def _reason(name: str, c: dict[str, Any]) -> str:
    if c.get("error"):
        return f"{name.replace('_', ' ')}: {c['error']}"
    if name == "identity":
        return "the CT and the MR differ in " + ", ".join(IDENTITY_FIELDS[k] for k in c["value"])
    if name == "field_of_view":
        return f"only {c['value']:.0%} of the MR lies inside the CT's field of view (limit {c['limit']:.0%})"
    if name == "reoptimisation":
        return f"a better-scoring transform lies {c['value']} mm away (limit {c['limit']} mm)"
    return f"an independent reverse registration disagrees by {c['value']} mm (limit {c['limit']} mm)" + (
        {
            "metric": ", and the metric prefers it",
            "both metrics": ", and not both metrics prefer the transform",
        }.get(c.get("decided_by", ""), "")
    )


def _fov_fraction(fixed: _Working, moving: _Working, matrix: np.ndarray, n: int = 4000) -> float:
    """Fraction of MR foreground points that the inverse transform puts inside the CT's grid."""
    pts = _mask_points(moving.mask, n, 0)
    if len(pts) == 0:
        return 0.0
    in_ct = _apply(np.linalg.inv(matrix), pts)
    idx = np.array([fixed.image.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in in_ct])
    size = np.asarray(fixed.image.GetSize(), float)
    inside = np.all((idx >= -0.5) & (idx <= size - 0.5), axis=1)
    return float(inside.mean())


def _evaluator(fixed: _Working, moving: _Working, fmask: sitk.Image, cfg: RegistrationConfig) -> Any:
    """Mattes MI (lower is better) of a CT → MR matrix as the polishing pass sees it (working
    resolution, images smoothed by `polish_smoothing_mm`, `polish_histogram_bins` bins), on one fixed
    random sample of the masked CT, so that every matrix is scored on the same points."""
    sigma = cfg.polish_smoothing_mm
    f, m = fixed.image, moving.image
    if sigma > 0:
        f, m = sitk.SmoothingRecursiveGaussian(f, sigma), sitk.SmoothingRecursiveGaussian(m, sigma)

    def score(matrix: np.ndarray) -> float:
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(cfg.polish_histogram_bins)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.25, cfg.seed)
        reg.SetMetricFixedMask(fmask)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetInitialTransform(matrix_to_sitk(matrix))
        return float(reg.MetricEvaluate(f, m))

    return score


def _reoptimisation(
    fixed: _Working, moving: _Working, fmask: sitk.Image, matrix: np.ndarray, cfg: RegistrationConfig
) -> dict[str, Any]:
    """Is there a better-scoring transform nearby? The polishing pass run again from the transform
    (rigid part), then both scored on the same samples (`_evaluator`). The value is the mean distance
    (mm over 200 CT head points) to the re-optimised transform when it scores better, else 0: a transform
    off by millimetres or degrees (spoiled, stale, a wrong file) is pulled towards the optimum and
    scores better there; an optimiser step that wanders off to a worse score is no evidence."""
    tx = sitk.Euler3DTransform()
    centre = np.mean(_mask_points(fixed.mask, 2000, 0), axis=0)
    tx.SetCenter(centre.tolist())
    rot, trans = matrix[:3, :3], matrix[:3, 3]
    u, _, vt = np.linalg.svd(rot)  # the nearest rotation (an affine transform's rigid part)
    tx.SetMatrix((u @ vt).ravel().tolist())
    tx.SetTranslation((trans + rot @ centre - centre).tolist())
    _refine(fixed, moving, fmask, tx, cfg, _polish(cfg), 100)
    again = sitk_to_matrix(tx)
    score = _evaluator(fixed, moving, fmask, cfg)
    at, there = score(matrix), score(again)
    pts = _mask_points(fixed.mask, 200, cfg.seed)
    moved = float(np.mean(np.linalg.norm(_apply(again, pts) - _apply(matrix, pts), axis=1)))
    value = round(moved, 3) if there < at else 0.0
    return _check(
        value,
        cfg.max_reoptimisation_mm,
        "value <= limit",
        value <= cfg.max_reoptimisation_mm,
        moved_mm=round(moved, 3),
        metric_at_transform=round(at, 5),
        metric_at_reoptimised=round(there, 5),
    )


def _consistency(
    fixed: _Working, moving: _Working, fmask: sitk.Image, matrix: np.ndarray, cfg: RegistrationConfig
) -> dict[str, Any]:
    """MR → CT from its own start (the best rotation-search candidate only); the round trip of 200 CT
    head points through both. A disagreement beyond `max_consistency_mm` is settled by the metrics:
    up to `max_consistency_settle_mm`, by the forward metric at the transform and at the reverse estimate's
    inverse (a reverse run that landed in a worse optimum is no evidence against the forward one); beyond
    it, it passes only when *both* directions' metrics prefer the transform — the reverse metric too, on
    its own fixed image (the MR) — so the reverse run stopped short of an optimum that its own images
    score better (a search failure, not a second optimum); otherwise it fails."""
    # the MR's own head mask, not grown: around a partial-field-of-view MR (a slab of 55 % of the head) the
    # grown ring of air made the reverse metric prefer a position 23-28 mm along the slab's axis over the
    # true one (#24, benchmarks/RESULTS.md)
    rev = cfg.model_copy(update={"candidates": 1, "mask_dilation_mm": 0.0})
    back, _, _ = _estimate(moving, fixed, rev, quick=True)
    pts = _mask_points(fixed.mask, 200, cfg.seed)
    err = np.linalg.norm(_apply(back, _apply(matrix, pts)) - pts, axis=1)
    mean = round(float(err.mean()), 3)
    out = _check(mean, cfg.max_consistency_mm, "value <= limit", mean <= cfg.max_consistency_mm)
    out["max_mm"] = round(float(err.max()), 3)
    out["decided_by"] = "round trip"
    if out["passed"]:
        return out
    score = _evaluator(fixed, moving, fmask, cfg)
    fwd, alt = score(matrix), score(np.linalg.inv(back))
    out["metric_at_transform"] = round(fwd, 5)
    out["metric_at_reverse_estimate"] = round(alt, 5)
    out["settle_limit"] = cfg.max_consistency_settle_mm
    if mean <= cfg.max_consistency_settle_mm:
        out["decided_by"] = "metric"
        out["passed"] = fwd <= alt
        return out
    reverse = _evaluator(moving, fixed, moving.mask, cfg)
    rev_at_transform, rev_at_estimate = reverse(np.linalg.inv(matrix)), reverse(back)
    out["reverse_metric_at_transform"] = round(rev_at_transform, 5)
    out["reverse_metric_at_reverse_estimate"] = round(rev_at_estimate, 5)
    out["decided_by"] = "both metrics"
    out["passed"] = fwd < alt and rev_at_transform < rev_at_estimate
    return out


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:3, :3].T + m[:3, 3]


def _mask_points(mask: sitk.Image, n: int, seed: int) -> np.ndarray:
    """Up to `n` random LPS points (mm) of the voxels inside `mask`, shape (n, 3)."""
    idx = np.argwhere(sitk.GetArrayViewFromImage(mask))
    if len(idx) == 0:
        return np.zeros((0, 3))
    rng = np.random.default_rng(seed)
    pick = idx[rng.choice(len(idx), size=min(n, len(idx)), replace=False)][:, ::-1].astype(float)
    origin = np.asarray(mask.GetOrigin())
    m = np.asarray(mask.GetDirection()).reshape(3, 3) @ np.diag(mask.GetSpacing())
    return pick @ m.T + origin


def target_registration_error(
    estimate: np.ndarray, truth: np.ndarray, ct: Volume, n: int = 20, seed: int = 0
) -> np.ndarray:
    """Distances (mm) between where `estimate` and `truth` send `n` random points inside the CT head,
    shape (n,)."""
    pts = _mask_points(head_mask(ct, 2.0), n, seed)
    return np.linalg.norm(_apply(estimate, pts) - _apply(truth, pts), axis=1)


def read_transform(path: str | Path) -> np.ndarray:
    """A 4×4 LPS matrix from `transform.json` / `truth.json` (key `matrix_lps`), or an ITK .tfm/.txt file.

    Raises:
        InputError: the file cannot be read as a transform, or its matrix is not 4×4.
    """
    path = Path(path)
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if "registration" in data:
                data = data["registration"]
            m = np.asarray(data["matrix_lps"], float)
        else:
            m = sitk_to_matrix(sitk.ReadTransform(str(path)))
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise InputError(path, f"cannot read a transform ({exc})") from exc
    if m.shape != (4, 4):
        raise InputError(path, f"transform matrix has shape {m.shape}, expected 4×4")
    return m
