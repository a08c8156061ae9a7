"""Segmentation metrics, each with its definition, units and its value for empty masks.

Surfaces are the mask voxels that have a face-neighbour outside the mask (mask XOR its erosion with
the 6-connected structuring element), as in MONAI's `get_mask_edges`. Distances are Euclidean in mm
between surface voxel centres, found with a k-d tree (`scipy.spatial.cKDTree`) over the surface
points in mm — the same values a Euclidean distance transform with the voxel spacing gives (MONAI's
route), without transforming the whole volume.

Empty masks (Metrics Reloaded, Maier-Hein et al. 2024, recommends reporting them explicitly):

| metric | both empty | one empty |
| --- | --- | --- |
| Dice, IoU, NSD | 1.0 | 0.0 |
| HD95, ASSD (mm) | 0.0 | the diagonal of the image in mm (worst possible), flagged |

Every empty case is counted in the summary (`n_ref_empty`, `n_pred_empty`, `n_both_empty`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from medfusion.io.volume import Volume
from medfusion.measure.lesions import CONNECTIVITY, label_lesions

_CROSS = ndimage.generate_binary_structure(3, 1)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """2|P∩R| / (|P|+|R|); 1.0 when both are empty."""
    den = int(pred.sum()) + int(ref.sum())
    return 1.0 if den == 0 else float(2 * np.logical_and(pred, ref).sum() / den)


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """|P∩R| / |P∪R|; 1.0 when both are empty."""
    union = int(np.logical_or(pred, ref).sum())
    return 1.0 if union == 0 else float(np.logical_and(pred, ref).sum() / union)


def _edges(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances (mm): from each pred surface voxel to the nearest ref surface voxel, and the reverse.

    `spacing` is per array axis (z, y, x order of the array). Both masks must be non-empty. The
    nearest-neighbour query runs on a k-d tree of surface voxel centres in mm, which gives exactly
    the distances a Euclidean distance transform of the other surface would, at a fraction of the cost.
    """
    both = pred | ref
    idx = np.argwhere(both)
    lo = np.maximum(idx.min(0) - 1, 0)
    hi = np.minimum(idx.max(0) + 2, both.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    sp = np.asarray(spacing, float)
    pts_p = np.argwhere(_edges(pred[sl])) * sp
    pts_r = np.argwhere(_edges(ref[sl])) * sp
    d_pr, _ = cKDTree(pts_r).query(pts_p, workers=-1)
    d_rp, _ = cKDTree(pts_p).query(pts_r, workers=-1)
    return np.asarray(d_pr), np.asarray(d_rp)


def _diagonal(shape: tuple[int, ...], spacing: tuple[float, float, float]) -> float:
    return float(np.linalg.norm(np.asarray(shape) * np.asarray(spacing)))


def surface_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float], tolerance_mm: float = 2.0
) -> dict[str, Any]:
    """HD95 = max of the two directed 95th percentiles (MONAI's definition); ASSD = mean of the
    pooled directed distances; NSD = share of both surfaces within `tolerance_mm` of the other."""
    pe, re_ = bool(pred.any()), bool(ref.any())
    if not pe and not re_:
        return {"hd95_mm": 0.0, "assd_mm": 0.0, "nsd": 1.0, "empty": "both"}
    if not pe or not re_:
        worst = _diagonal(pred.shape, spacing)
        return {"hd95_mm": worst, "assd_mm": worst, "nsd": 0.0, "empty": "pred" if not pe else "ref"}
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    hd95 = max(float(np.percentile(d_pr, 95)), float(np.percentile(d_rp, 95)))
    assd = float((d_pr.sum() + d_rp.sum()) / (len(d_pr) + len(d_rp)))
    nsd = float(((d_pr <= tolerance_mm).sum() + (d_rp <= tolerance_mm).sum()) / (len(d_pr) + len(d_rp)))
    return {"hd95_mm": hd95, "assd_mm": assd, "nsd": nsd, "empty": ""}


def lesion_detection(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    class_names: list[str],
    spacing_zyx: tuple[float, float, float],
) -> dict[str, dict[str, int]]:
    """Lesion-wise detection per foreground class, on the lesions medfusion reports
    (`measure.lesions.label_lesions`: 26-connected foreground holding core, one lesion per core).

    For class k, a lesion "of class k" is a lesion holding class-k voxels. A reference lesion of class
    k is detected (`lesions_tp`) when a predicted lesion's class-k voxel overlaps its class-k voxels,
    missed (`lesions_fn`) otherwise; a predicted lesion of class k whose class-k voxels overlap no
    reference lesion's class-k voxel is a false positive (`lesions_fp`). `lesions_fp_isolated` counts
    apart the FP lying more than one voxel (26-neighbourhood) from every reference lesion: the rest
    are a real lesion's edge given another class (e.g. an oedema rim where the reference has core),
    boundary errors rather than false detections, which BraTS 2023's lesion-wise matching absorbs by
    dilating the reference before matching. Foreground that belongs to no lesion (no core; what
    post-processing removes) is no lesion on either side and is counted nowhere here; the class's
    Dice and volumes see it.

    Args:
        pred_labels, ref_labels: (z, y, x) class indices of `class_names`, the same shape.
        class_names: classes, background first.
        spacing_zyx: the grid's spacing in array order, mm (splitting a region between its cores
            goes by distance in mm).

    Returns:
        {class name: {"lesions_tp", "lesions_fn", "lesions_fp", "lesions_fp_isolated"}} for every
        class but the first, counts ≥ 0.
    """
    pl = label_lesions(pred_labels, class_names, spacing_zyx).components
    rl = label_lesions(ref_labels, class_names, spacing_zyx).components
    near = ndimage.binary_dilation(rl > 0, structure=CONNECTIVITY)
    out: dict[str, dict[str, int]] = {}
    for k, name in enumerate(class_names):
        if k == 0:
            continue
        pk = (pred_labels == k) & (pl > 0)
        rk = (ref_labels == k) & (rl > 0)
        both = pk & rk
        pred_ids = set(np.unique(pl[pk]).tolist())
        matched = set(np.unique(pl[both]).tolist())
        touching = set(np.unique(pl[pk & near]).tolist())
        n_ref = len(np.unique(rl[rk]))
        tp = len(np.unique(rl[both]))
        out[name] = {
            "lesions_tp": tp,
            "lesions_fn": n_ref - tp,
            "lesions_fp": len(pred_ids - matched),
            "lesions_fp_isolated": len(pred_ids - matched - touching),
        }
    return out


def label_map_metrics(
    pred: Volume, ref: Volume, class_names: list[str], *, tolerance_mm: float = 2.0
) -> list[dict[str, Any]]:
    """`case_metrics` of a predicted and a reference label map that carry their geometry.

    Raises:
        ValueError: the reference is not on the prediction's grid (1e-3 mm tolerance): resample it
            first (`LabelMap.resample_to`), as `medfusion evaluate` does with a note.
    """
    if not pred.same_grid(ref, tol=1e-3):
        msg = f"reference grid {ref.shape} at {ref.origin} is not the prediction's {pred.shape} at {pred.origin}"
        raise ValueError(msg)
    return case_metrics(pred.array, ref.array, pred.spacing, class_names, tolerance_mm)


def case_metrics(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    class_names: list[str],
    tolerance_mm: float = 2.0,
) -> list[dict[str, Any]]:
    """One row per foreground class: Dice, IoU, surface metrics (mm), volumes (mL) and lesion detection.

    Arrays are (z, y, x) integer class indices; spacing is (x, y, z) mm like `Volume.spacing`
    (`label_map_metrics` takes the label maps with their geometry instead).

    Raises:
        ValueError: the two arrays differ in shape.
    """
    if pred_labels.shape != ref_labels.shape:
        msg = f"prediction {pred_labels.shape} and reference {ref_labels.shape} differ in shape"
        raise ValueError(msg)
    spacing = (spacing_xyz[2], spacing_xyz[1], spacing_xyz[0])
    vml = float(np.prod(spacing_xyz)) / 1000.0
    detection = lesion_detection(pred_labels, ref_labels, class_names, spacing)
    rows = []
    for k, name in enumerate(class_names):
        if k == 0:
            continue
        p, r = pred_labels == k, ref_labels == k
        vp, vr = float(p.sum()) * vml, float(r.sum()) * vml
        row: dict[str, Any] = {"class": name, "dice": dice(p, r), "iou": iou(p, r)}
        row.update(surface_metrics(p, r, spacing, tolerance_mm))
        row.update(
            {
                "volume_pred_ml": vp,
                "volume_ref_ml": vr,
                "volume_abs_error_ml": abs(vp - vr),
                "volume_rel_error": (vp - vr) / vr if vr > 0 else None,
            }
        )
        row.update(detection[name])
        rows.append(row)
    return rows
