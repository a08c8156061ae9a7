"""The one lesion definition, and the findings measured on each lesion.

A **lesion** is what a radiologist counts: one tumour core with the tissue around it. It is found in
two steps:

1. a **region** (`lesion_regions`) is a 26-connected group of foreground voxels (any class > 0) that
   holds at least one tumour-core voxel; foreground groups without core (stray oedema or
   calcification) are not lesions, as post-processing removes them;
2. a region with several separate cores (two tumours whose oedema touches) is that many lesions
   (`split_by_core`): each voxel of the region goes to its nearest core, in millimetres.

`label_lesions` does both and orders the lesions, the one entry point: the diagnosis's measurement
features (`measure/features.py`), the run's measurements (`run/measure.py`, hence the report's
findings table and the DICOM SR) and evaluation's lesion detection
(`evaluate/segmentation.lesion_detection`) all read its lesions, so that one scores.json counts and
measures lesions one way. Post-processing (`infer/postprocess.py`) uses step 1 alone: it removes
what is no region.

Findings per lesion (`Lesion`), in the patient's own geometry:

- volumes per class (mL) and the lesion's total;
- the longest core diameter (maximum Feret diameter of core + calcification, mm) and, RANO-style
  (Wen et al., J Clin Oncol 2010;28:1963), the bidimensional pair on the patient's axial slice with
  the most core: the longest in-plane diameter and the largest extent perpendicular to it. On a grid
  whose slices are not axial (sagittal or coronal acquisition, gantry tilt) the lesion's box is first
  resampled, nearest-neighbour, onto an LPS-aligned grid (`axial_diameters_mm`);
- the centroid (LPS mm), the side relative to the head's midline (the x of the CT body mask's
  centroid — `preprocess/intensity.ct_body_mask`, the domain guard's: > −500 HU, largest component,
  holes filled — else the grid's centre: "left", "right" or "midline" within 5 mm) and the coarse
  region (anterior/posterior, superior/inferior half of the head, about the same centroid);
- the mean CT density of the core (HU) and, with an MR on the CT's grid, the enhancement ratio: mean
  MR signal in the core over that in a 3 mm shell of non-lesion tissue around the lesion.

Examples:
    >>> import numpy as np
    >>> lab = np.zeros((8, 8, 16), np.uint8); lab[2:6, 2:6, 1:15] = 2
    >>> lab[3:5, 3:5, 3:5] = 1; lab[3:5, 3:5, 11:13] = 1  # two cores in one oedema
    >>> found = label_lesions(lab, ["background", "tumour_core", "oedema"], (1.0, 1.0, 1.0))
    >>> len(found.ids)
    2
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial.distance import pdist

from medfusion.io.volume import Grid, LabelMap, Volume
from medfusion.preprocess.intensity import ct_body_mask

CONNECTIVITY = np.ones((3, 3, 3), bool)  # 26-connectivity
MIDLINE_MM = 5.0
BODY_STEP_MM = 4.0  # the CT is subsampled to about this voxel size for its body mask (a centroid)
SHELL_MM = 3.0
AXIAL_TOLERANCE = 1e-6  # |cos| of the slice axis to LPS z below 1 - this: slices are not axial


def class_roles(class_names: list[str]) -> tuple[int, int | None]:
    """Index of the tumour core (`tumour_core`, else class 1) and of calcification (None if absent) in
    `class_names` (background first)."""
    core = class_names.index("tumour_core") if "tumour_core" in class_names else 1
    calc = class_names.index("calcification") if "calcification" in class_names else None
    return core, calc


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a boolean (z, y, x) mask — the one connectivity medfusion labels
    lesions with.

    Returns:
        (components, n): int32 array of the mask's shape (0 outside, 1..n a component) and n.
    """
    comp, n = ndimage.label(mask, structure=CONNECTIVITY)
    return comp.astype(np.int32, copy=False), int(n)


def lesion_regions(labels: np.ndarray, core: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 of the lesion definition: `components` of the foreground (any class > 0) of an integer
    label map (z, y, x), and the sorted numbers of those holding at least one voxel of class `core`
    (int64, shape (n_regions,)). Post-processing keeps these regions; everything else labels
    lesions with `label_lesions`."""
    comp, _ = components(labels > 0)
    ids = np.unique(comp[labels == core])
    return comp, ids[ids > 0]


def solid_mask(labels: np.ndarray, class_names: list[str]) -> np.ndarray:
    """Boolean (z, y, x): the voxels of the tumour core or of calcification (a lesion's solid part,
    what its core diameter spans)."""
    core_k, calc_k = class_roles(class_names)
    return (labels == core_k) if calc_k is None else ((labels == core_k) | (labels == calc_k))


def split_by_core(
    labels: np.ndarray, class_names: list[str], spacing_zyx: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Step 2 of the lesion definition: `lesion_regions`' regions, each split between its separate
    cores (26-connected solid parts, `solid_mask`, holding core), every voxel of the region going to
    the nearest core in millimetres (Euclidean distance transform with `spacing_zyx`, the array's
    (z, y, x) spacing). A solid part with no core (a calcification alone) goes to its nearest core too.

    Returns:
        (components, lesion_ids): int32 array of the map's shape (0 = background, k = lesion k;
        regions without core keep a number but are not lesions), and the sorted lesion numbers (int64).
    """
    core_k, _ = class_roles(class_names)
    comp, ids = lesion_regions(labels, core_k)
    if len(ids) == 0:
        return comp, ids
    solid = solid_mask(labels, class_names)
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


@dataclasses.dataclass(frozen=True)
class LesionLabels:
    """The lesions of one label map (`label_lesions`).

    Attributes:
        components: int32 (z, y, x): k inside lesion k, 0 elsewhere (background and foreground that
            belongs to no lesion alike).
        ids: int64 (n_lesions,): the lesion numbers, the lesion with the most solid voxels (core +
            calcification) first, ties by number.
        solid: bool (z, y, x): core or calcification voxels (`solid_mask`), inside lesions or not.
        solid_voxels: int64 (components.max() + 1,): solid voxels per lesion number.
    """

    components: np.ndarray
    ids: np.ndarray
    solid: np.ndarray
    solid_voxels: np.ndarray

    def boxes(self) -> list[tuple[slice, ...] | None]:
        """Bounding box (array slices) of every lesion number 1..components.max(); index k - 1."""
        return ndimage.find_objects(self.components)


def label_lesions(labels: np.ndarray, class_names: list[str], spacing_zyx: tuple[float, ...]) -> LesionLabels:
    """THE lesions of an integer label map (z, y, x; class indices of `class_names`) on a grid of
    `spacing_zyx` (mm, array order): `split_by_core`'s lesions, ordered largest solid part first.

    Examples:
        >>> lab = np.zeros((8, 8, 8), np.uint8); lab[2:6, 2:6, 2:6] = 2; lab[3:5, 3:5, 3:5] = 1
        >>> label_lesions(lab, ["background", "tumour_core", "oedema"], (1.0, 1.0, 1.0)).ids.tolist()
        [1]
    """
    comp, ids = split_by_core(labels, class_names, spacing_zyx)
    keep = np.zeros(int(comp.max()) + 1, bool)
    keep[ids] = True
    comp[~keep[comp]] = 0  # regions without core (split_by_core's copy, ours to change)
    solid = solid_mask(labels, class_names)
    solid_voxels = np.bincount(comp[solid], minlength=len(keep)).astype(np.int64)
    order = sorted(ids.tolist(), key=lambda k: (-int(solid_voxels[k]), k))
    return LesionLabels(comp, np.array(order, dtype=np.int64), solid, solid_voxels)


def feret_diameter_mm(mask: np.ndarray, spacing_zyx: tuple[float, ...], max_points: int = 3000) -> float:
    """Largest distance (mm) between two voxel centres of a boolean `mask` (z, y, x) on a grid of
    `spacing_zyx` (mm, array order): the maximum Feret (caliper) diameter. One voxel counts its largest
    spacing, an empty mask 0. Above `max_points` voxels only the mask's surface (voxels with a
    6-neighbour outside) is searched — the extremes lie there — evenly subsampled to `max_points`.

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
    """Longest in-plane diameter of a 2D mask (rows, columns) on a grid of `spacing_yx` (mm per row
    and per column) and its largest extent perpendicular to that diameter, both in mm, voxel centre
    to centre (RANO's product of perpendicular diameters uses this pair; Wen et al. 2010). One voxel
    gives its largest spacing twice; an empty mask (0.0, 0.0). More than 2000 voxels are subsampled
    evenly (the pairwise distances are O(n²) in memory)."""
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


def slices_are_axial(grid: Grid) -> bool:
    """Whether `grid`'s array slices (k, the z axis of the array) are the patient's axial planes: its
    k axis runs along LPS z (head-foot), in either sense. An axial CT, also flipped or turned in
    plane, is; a sagittal or coronal acquisition, or a gantry tilt, is not."""
    return abs(float(grid.direction[2, 2])) >= 1.0 - AXIAL_TOLERANCE


def axial_grid(grid: Grid) -> Grid:
    """An LPS-aligned grid (identity direction) covering `grid`'s voxel centres with one voxel to
    spare on each side; along each LPS axis the spacing of `grid`'s axis closest to it (mm), so that a
    grid that only permutes or flips the LPS axes (a sagittal or coronal series) maps voxel centre to
    voxel centre."""
    nz, ny, nx = grid.shape
    corners = np.array([[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)], float)
    world = grid.index_to_world(corners)
    closest = np.argmax(np.abs(grid.direction), axis=1)  # per LPS axis, the grid axis along it
    spacing = np.asarray(grid.spacing, float)[closest]
    lo, hi = world.min(0) - spacing, world.max(0) + spacing
    size = np.round((hi - lo) / spacing).astype(int) + 1
    return Grid(
        (int(size[2]), int(size[1]), int(size[0])),
        (float(spacing[0]), float(spacing[1]), float(spacing[2])),
        (float(lo[0]), float(lo[1]), float(lo[2])),
    )


def axial_diameters_mm(mask: np.ndarray, grid: Grid) -> tuple[float, float]:
    """RANO-style bidimensional diameters (mm) of a boolean (z, y, x) `mask` on `grid`, measured on the
    patient's axial slice (LPS z constant) that holds the most of it (`bidimensional_mm`; the short
    one at least one in-plane voxel).

    When the grid's slices are axial (`slices_are_axial`) they are read as they are; otherwise the mask
    is resampled nearest-neighbour onto `axial_grid(grid)` first (exact for a sagittal or coronal
    series, within a voxel for an oblique one). Callers pass a lesion's bounding box and its grid,
    which keeps the resampling small.

    Raises:
        ValueError: `mask`'s shape is not `grid.shape`.
    """
    if tuple(mask.shape) != grid.shape:
        msg = f"mask of shape {mask.shape} is not on the grid {grid.shape}"
        raise ValueError(msg)
    spacing_yx = (grid.spacing_zyx[1], grid.spacing_zyx[2])
    if not slices_are_axial(grid):
        target = axial_grid(grid)
        mask = LabelMap.on(grid, mask.astype(np.uint8)).resample_to(target).array > 0
        spacing_yx = (target.spacing_zyx[1], target.spacing_zyx[2])
    if not mask.any():
        return 0.0, 0.0
    z = int(np.argmax(mask.sum(axis=(1, 2))))
    d1, d2 = bidimensional_mm(mask[z], spacing_yx)
    return d1, max(d2, min(spacing_yx))  # a lesion one voxel thick is one voxel wide, not 0 mm


def box_grid(grid: Grid, box: tuple[slice, ...]) -> Grid:
    """The sub-grid of `grid` that the array slices `box` (z, y, x; steps of 1) cut out."""
    start = np.array([box[2].start or 0, box[1].start or 0, box[0].start or 0], float)
    shape = tuple(len(range(*b.indices(n))) for b, n in zip(box, grid.shape, strict=True))
    origin = grid.index_to_world(start)[0]
    return Grid(
        shape,  # type: ignore[arg-type]
        grid.spacing,
        (float(origin[0]), float(origin[1]), float(origin[2])),
        grid.direction,
    )


@dataclasses.dataclass
class Lesion:
    """One lesion's findings (see the module docstring for definitions and sources).

    Attributes:
        number: 1 = the lesion with the most core + calcification, then by decreasing solid volume.
        volumes_ml: mL per foreground class inside the lesion (≥ 0).
        total_ml: the lesion's volume, mL.
        core_diameter_mm: maximum Feret diameter of its core + calcification, mm.
        axial_diameters_mm: (longest, perpendicular) on the patient's axial slice with the most core, mm.
        centroid_lps: the lesion's centre of mass, LPS mm.
        side: "left", "right" or "midline" (within 5 mm of the head's midline).
        region: "superior|inferior anterior|posterior", relative to the head's centre.
        ct_core_hu: mean CT density of the core (HU), None without a CT.
        mr_enhancement_ratio: core over surrounding-tissue MR signal (> 0), None without an MR or shell.
    """

    number: int
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
    """Every lesion of `labels` (`label_lesions`), largest solid part (core + calcification) first,
    with its findings (see the module docstring for definitions and units).

    Args:
        labels: class indices of `class_names` (z, y, x) on their grid, any orientation.
        class_names: the label map's classes ("tumour_core", else class 1, is the core).
        ct: the CT on the same grid (HU), for the core's density and the head's midline.
        mr: an MR on the same grid, for the enhancement ratio.

    Returns:
        One `Lesion` per lesion, numbered from 1; an empty list when there is none.

    Raises:
        ValueError: `ct` or `mr` is not on the grid of `labels` (shape, spacing, origin and
            direction, `Grid.same_as`).
    """
    for name, other in (("ct", ct), ("mr", mr)):
        if other is not None and not other.grid.same_as(labels.grid):
            msg = (
                f"{name} is not on the label map's grid: {_describe(other.grid)} vs "
                f"{_describe(labels.grid)} (resample it to the label map's grid first)"
            )
            raise ValueError(msg)
    arr = labels.array
    core_k, _ = class_roles(class_names)
    spacing_zyx = labels.spacing_zyx
    found = label_lesions(arr, class_names, spacing_zyx)
    if len(found.ids) == 0:
        return []
    comp = found.components
    ml = labels.voxel_volume_ml
    boxes = found.boxes()
    grid = labels.grid
    centre = _head_centre(*_body_grid(ct, labels))  # its x is the head's midline
    midline = float(centre[0])
    out: list[Lesion] = []
    for number, k in enumerate(found.ids.tolist(), start=1):
        box = boxes[k - 1]
        assert box is not None
        inside = comp[box] == k
        sub = arr[box]
        counts = np.bincount(sub[inside].astype(np.int64), minlength=len(class_names))
        volumes = {n: round(float(counts[c]) * ml, 3) for c, n in enumerate(class_names) if c > 0}
        core = inside & found.solid[box]
        d1, d2 = axial_diameters_mm(core, box_grid(grid, box))
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
            lesion.mr_enhancement_ratio = _enhancement(mr, arr, comp, k, core, box, spacing_zyx)
        out.append(lesion)
    return out


def _describe(grid: Grid) -> str:
    """A grid in one line: shape (z, y, x), spacing and origin (mm, x y z), direction's diagonal."""
    return (
        f"shape {grid.shape}, spacing {tuple(round(v, 4) for v in grid.spacing)}, origin "
        f"{tuple(round(v, 3) for v in grid.origin)}, direction diagonal "
        f"{tuple(round(float(v), 3) for v in np.diag(grid.direction))}"
    )


def _body_grid(ct: Volume | None, labels: Volume) -> tuple[np.ndarray | None, np.ndarray, Volume]:
    """The CT's body mask (`preprocess/intensity.ct_body_mask`, the domain guard's) on the CT
    subsampled to about `BODY_STEP_MM` voxels, the subsampling step (z, y, x), and the grid the
    mask's indices refer to (the CT's, else the label map's, with no mask)."""
    if ct is None:
        return None, np.ones(3), labels
    step = np.maximum(1, np.floor(BODY_STEP_MM / np.asarray(ct.spacing_zyx, float))).astype(int)
    return ct_body_mask(ct.array[:: step[0], :: step[1], :: step[2]]), step, ct


def _head_centre(body: np.ndarray | None, step: np.ndarray, grid: Volume) -> np.ndarray:
    """LPS (mm) of the body mask's centroid, else of the grid's centre."""
    if body is not None and body.any():
        k, j, i = np.asarray(ndimage.center_of_mass(body)) * step
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
    labels: np.ndarray,
    comp: np.ndarray,
    k: int,
    core: np.ndarray,
    box: tuple[slice, ...],
    spacing_zyx: tuple[float, ...],
) -> float | None:
    """Mean MR in the core over the mean in a SHELL_MM shell of background voxels (class 0) around
    lesion `k` of `comp`; None without a shell or when its mean is 0."""
    grow = [max(1, int(np.ceil(SHELL_MM / s))) for s in spacing_zyx]
    big = tuple(slice(max(0, b.start - g), b.stop + g) for b, g in zip(box, grow, strict=True))
    lesion = comp[big] == k
    shell = ndimage.binary_dilation(lesion, structure=CONNECTIVITY, iterations=max(grow)) & (labels[big] == 0)
    values = mr.array[big]
    if not shell.any() or not core.any():
        return None
    background = float(np.mean(values[shell]))
    if abs(background) < 1e-6:
        return None
    return round(float(np.mean(mr.array[box][core])) / background, 2)
