"""The one lesion definition, and the findings measured on each lesion.

A **lesion region** is a 26-connected group of foreground voxels (any class > 0) that holds at
least one tumour-core voxel; foreground groups without core (stray oedema or calcification) are not
lesions, as post-processing removes them. A region with several separate cores (two tumours whose
oedema touches) is reported as that many **lesions**, each voxel going to its nearest core
(`split_by_core`); the diagnosis's measurement term reads regions (`label_lesions`), as it was fitted. Every part of medfusion that counts or measures lesions — the
diagnosis's measurement term (`measure/features.py`), the run's measurements (`run/measure.py`), the
report's findings table and the DICOM SR — labels them here.

Findings per lesion (`Lesion`), in the patient's own geometry:

- volumes per class (mL) and the lesion's total;
- the longest core diameter (maximum Feret diameter of core + calcification, mm) and, RANO-style
  (Wen et al., J Clin Oncol 2010;28:1963), the bidimensional pair on the axial slice with the most
  core: the longest in-plane diameter and the largest extent perpendicular to it;
- the centroid (LPS mm), the side relative to the head's midline (the body mask's centroid: "left",
  "right" or "midline" within 5 mm) and the coarse region (anterior/posterior, superior/inferior
  half of the head);
- the mean CT density of the core (HU) and, with an MR on the CT's grid, the enhancement ratio: mean
  MR signal in the core over that in a 3 mm shell of non-lesion tissue around the lesion.

Examples:
    >>> import numpy as np
    >>> lab = np.zeros((8, 8, 8), np.uint8); lab[2:6, 2:6, 2:6] = 2; lab[3:5, 3:5, 3:5] = 1
    >>> comp, ids = label_lesions(lab, ["background", "tumour_core", "oedema"])
    >>> ids.tolist()
    [1]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial.distance import pdist

from medfusion.io.volume import Volume

CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connectivity
MIDLINE_MM = 5.0
SHELL_MM = 3.0


def class_roles(class_names: list[str]) -> tuple[int, int | None]:
    """Index of the tumour core (`tumour_core`, else class 1) and of calcification (None if absent)."""
    core = class_names.index("tumour_core") if "tumour_core" in class_names else 1
    calc = class_names.index("calcification") if "calcification" in class_names else None
    return core, calc


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a boolean (z, y, x) mask — the one connectivity medfusion counts
    lesions with (post-processing, measurements, the diagnosis's features, evaluation's detection).

    Returns:
        (components, n): int32 array of the mask's shape (0 outside, 1..n a component) and n.
    """
    comp, n = ndimage.label(mask, structure=CONNECTIVITY)
    return comp.astype(np.int32, copy=False), int(n)


def lesion_regions(labels: np.ndarray, core: int) -> tuple[np.ndarray, np.ndarray]:
    """`components` of the foreground (any class > 0) of an integer label map (z, y, x), and the
    sorted numbers of those holding at least one voxel of class `core` (shape (n_lesions,))."""
    comp, _ = components(labels > 0)
    ids = np.unique(comp[labels == core])
    return comp, ids[ids > 0]


def label_lesions(labels: np.ndarray, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Connected foreground components of an integer label map (z, y, x) and which are lesions
    (`lesion_regions` with the core class `class_roles` names).

    Returns:
        (components, lesion_ids): int32 array of the map's shape (0 = background, k = component
        k), and the sorted component numbers that hold core (shape (n_lesions,)).
    """
    return lesion_regions(labels, class_roles(class_names)[0])


def split_by_core(
    labels: np.ndarray, class_names: list[str], spacing_zyx: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Lesions as a radiologist counts them: `label_lesions`' regions, each split between its
    separate cores (26-connected core + calcification holding core), every voxel of the region going
    to the nearest core in millimetres. Two tumours whose oedema touches are two lesions here, one
    region for `label_lesions` (the diagnosis's measurement term was fitted on regions).

    Returns:
        (components, lesion_ids) as `label_lesions`, int32, with split regions renumbered.
    """
    core_k, calc_k = class_roles(class_names)
    comp, ids = label_lesions(labels, class_names)
    if len(ids) == 0:
        return comp, ids
    solid = (labels == core_k) if calc_k is None else ((labels == core_k) | (labels == calc_k))
    out = comp.copy()
    next_id = int(comp.max()) + 1
    boxes = ndimage.find_objects(comp)
    kept = list(ids.tolist())
    for k in ids.tolist():
        box = boxes[k - 1]
        assert box is not None
        inside = comp[box] == k
        parts, n = ndimage.label(inside & solid[box], structure=CONNECTIVITY)
        with_core = [j for j in range(1, n + 1) if np.any((parts == j) & (labels[box] == core_k))]
        if len(with_core) < 2:
            continue
        seeds = np.zeros(parts.shape, np.int32)
        for rank, j in enumerate(with_core, start=1):
            seeds[parts == j] = rank
        _, nearest_idx = ndimage.distance_transform_edt(seeds == 0, sampling=spacing_zyx, return_indices=True)
        nearest = seeds[tuple(nearest_idx)]
        region = out[box]
        for rank in range(2, len(with_core) + 1):
            region[inside & (nearest == rank)] = next_id
            kept.append(next_id)
            next_id += 1
    return out, np.array(sorted(kept), dtype=np.int64)


def feret_diameter_mm(mask: np.ndarray, spacing_zyx: tuple[float, ...], max_points: int = 3000) -> float:
    """Largest distance (mm) between two voxel centres of `mask` (z, y, x) on a grid with this spacing
    (max Feret diameter); one voxel counts its largest spacing, an empty mask 0.

    Examples:
        >>> m = np.zeros((3, 3, 5), bool); m[1, 1, :] = True
        >>> feret_diameter_mm(m, (2.0, 1.0, 1.5))
        6.0
    """
    idx = np.argwhere(mask)
    if len(idx) < 2:
        return float(len(idx) and max(spacing_zyx))
    if len(idx) > max_points:  # the boundary holds the extremes; subsample it deterministically
        idx = np.argwhere(mask & ~ndimage.binary_erosion(mask))
        if len(idx) > max_points:
            idx = idx[np.linspace(0, len(idx) - 1, max_points).astype(int)]
    return float(pdist(idx * np.asarray(spacing_zyx, float)).max())


def bidimensional_mm(mask2d: np.ndarray, spacing_yx: tuple[float, float]) -> tuple[float, float]:
    """Longest in-plane diameter of a 2D mask (rows, columns) and its largest extent perpendicular
    to that diameter, both in mm (RANO's product of perpendicular diameters uses this pair)."""
    idx = np.argwhere(mask2d).astype(np.float64) * np.asarray(spacing_yx, float)
    if len(idx) < 2:
        d = float(len(idx) and max(spacing_yx))
        return d, d
    if len(idx) > 2000:
        idx = idx[np.linspace(0, len(idx) - 1, 2000).astype(int)]
    diff = idx[:, None, :] - idx[None, :, :]
    dist = np.hypot(diff[..., 0], diff[..., 1])
    a, b = np.unravel_index(int(np.argmax(dist)), dist.shape)
    axis = (idx[b] - idx[a]) / max(float(dist[a, b]), 1e-9)
    perp = np.array([-axis[1], axis[0]])
    proj = idx @ perp
    return float(dist[a, b]), float(proj.max() - proj.min())  # voxel centre to centre, as the Feret


@dataclasses.dataclass
class Lesion:
    """One lesion's findings (see the module docstring for definitions and units)."""

    number: int  # 1 = the lesion with the most core, then by decreasing core volume
    volumes_ml: dict[str, float]
    total_ml: float
    core_diameter_mm: float
    axial_diameters_mm: tuple[float, float]
    centroid_lps: tuple[float, float, float]
    side: str
    region: str
    ct_core_hu: float | None = None
    mr_enhancement_ratio: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The lesion as scores.json "measurements.lesions" holds it (tuples as lists)."""
        out = dataclasses.asdict(self)
        out["axial_diameters_mm"] = list(self.axial_diameters_mm)
        out["centroid_lps"] = list(self.centroid_lps)
        return out


def find_lesions(
    labels: Volume,
    class_names: list[str],
    *,
    ct: Volume | None = None,
    mr: Volume | None = None,
) -> list[Lesion]:
    """Every lesion of `labels` (class indices on a grid; `ct` and `mr`, when given, on the same
    grid), largest core first.

    Raises:
        ValueError: `ct` or `mr` is not on the grid of `labels`.
    """
    for name, other in (("ct", ct), ("mr", mr)):
        if other is not None and other.shape != labels.shape:
            msg = f"{name} of shape {other.shape} is not on the label map's grid {labels.shape}"
            raise ValueError(msg)
    arr = labels.array
    core_k, calc_k = class_roles(class_names)
    spacing_zyx = labels.spacing_zyx
    comp, ids = split_by_core(arr, class_names, spacing_zyx)
    if len(ids) == 0:
        return []
    ml = labels.voxel_volume_ml
    solid = (arr == core_k) if calc_k is None else ((arr == core_k) | (arr == calc_k))
    solid_sizes = np.bincount(comp[solid], minlength=int(comp.max()) + 1)
    order = sorted(ids.tolist(), key=lambda k: (-int(solid_sizes[k]), k))
    boxes = ndimage.find_objects(comp)
    midline = _midline_x(ct, labels)
    centre = _head_centre(ct, labels)
    out: list[Lesion] = []
    for number, k in enumerate(order, start=1):
        box = boxes[k - 1]
        assert box is not None
        inside = comp[box] == k
        sub = arr[box]
        counts = np.bincount(sub[inside].astype(np.int64), minlength=len(class_names))
        volumes = {n: round(float(counts[c]) * ml, 3) for c, n in enumerate(class_names) if c > 0}
        core = inside & solid[box]
        per_slice = core.sum(axis=(1, 2))
        z = int(np.argmax(per_slice))
        d1, d2 = bidimensional_mm(core[z], (spacing_zyx[1], spacing_zyx[2]))
        d2 = max(d2, min(spacing_zyx[1:]))  # a lesion one voxel thick is one voxel wide, not 0 mm
        offset = np.array([s.start for s in box], dtype=np.float64)
        cz, cy, cx = ndimage.center_of_mass(inside) + offset
        centroid = labels.index_to_world(np.array([cx, cy, cz]))[0]
        lesion = Lesion(
            number=number,
            volumes_ml=volumes,
            total_ml=round(float(inside.sum()) * ml, 3),
            core_diameter_mm=round(feret_diameter_mm(core, spacing_zyx), 1),
            axial_diameters_mm=(round(d1, 1), round(d2, 1)),
            centroid_lps=(
                round(float(centroid[0]), 1),
                round(float(centroid[1]), 1),
                round(float(centroid[2]), 1),
            ),
            side=_side(float(centroid[0]), midline),
            region=_region(centroid, centre),
        )
        if ct is not None:
            tumour = inside & (sub == core_k)  # the core alone: calcification would raise its density
            lesion.ct_core_hu = round(float(np.mean(ct.array[box][tumour if tumour.any() else core])), 1)
        if mr is not None:
            lesion.mr_enhancement_ratio = _enhancement(mr, comp, k, core, box, spacing_zyx)
        out.append(lesion)
    return out


def _body_mask(ct: Volume | None) -> np.ndarray | None:
    if ct is None:
        return None
    return np.asarray(ct.array[::2, ::2, ::2] > -300)


def _midline_x(ct: Volume | None, labels: Volume) -> float:
    """LPS x (mm) of the head's midline: the body mask's centroid, else the grid's centre."""
    body = _body_mask(ct)
    grid = ct if ct is not None else labels
    if body is not None and body.any():
        k, j, i = (np.asarray(c) * 2 for c in ndimage.center_of_mass(body))
        return float(grid.index_to_world(np.array([i, j, k]))[0][0])
    nz, ny, nx = grid.shape
    return float(grid.index_to_world(np.array([(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2]))[0][0])


def _head_centre(ct: Volume | None, labels: Volume) -> np.ndarray:
    body = _body_mask(ct)
    grid = ct if ct is not None else labels
    if body is not None and body.any():
        k, j, i = (np.asarray(c) * 2 for c in ndimage.center_of_mass(body))
        return grid.index_to_world(np.array([i, j, k]))[0]
    nz, ny, nx = grid.shape
    return grid.index_to_world(np.array([(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2]))[0]


def _side(x_lps: float, midline: float) -> str:
    """LPS +x points to the patient's left."""
    if abs(x_lps - midline) <= MIDLINE_MM:
        return "midline"
    return "left" if x_lps > midline else "right"


def _region(centroid: np.ndarray, centre: np.ndarray) -> str:
    ap = "posterior" if centroid[1] > centre[1] else "anterior"  # LPS +y is posterior
    si = "superior" if centroid[2] > centre[2] else "inferior"
    return f"{si} {ap}"


def _enhancement(
    mr: Volume,
    comp: np.ndarray,
    k: int,
    core: np.ndarray,
    box: tuple[slice, ...],
    spacing_zyx: tuple[float, ...],
) -> float | None:
    """Mean MR in the core over the mean in a SHELL_MM shell of non-lesion voxels around the lesion."""
    grow = [max(1, int(np.ceil(SHELL_MM / s))) for s in spacing_zyx]
    big = tuple(slice(max(0, b.start - g), b.stop + g) for b, g in zip(box, grow, strict=True))
    lesion = comp[big] == k
    shell = ndimage.binary_dilation(lesion, structure=CONNECTIVITY, iterations=max(grow)) & (comp[big] == 0)
    values = mr.array[big]
    if not shell.any() or not core.any():
        return None
    background = float(np.mean(values[shell]))
    if abs(background) < 1e-6:
        return None
    return round(float(np.mean(mr.array[box][core])) / background, 2)
