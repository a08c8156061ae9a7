"""The types that carry geometry, in LPS millimetres: `Grid` (a sampling grid, no voxels), `Volume`
(an array on a grid, with modality and report metadata) and `LabelMap` (a `Volume` of class indices,
always resampled nearest-neighbour). `Volume.resample_to` is medfusion's one resampling entry point.

Array layout follows SimpleITK: ``array[k, j, i]`` (slice, row, column), so ``array.shape`` is
``(nz, ny, nx)`` while ``spacing`` and ``origin`` are ``(x, y, z)``. ``direction`` is a 3×3 matrix
whose *columns* are the LPS unit vectors of the i, j, k index axes. ``affine`` maps ``(i, j, k, 1)``
to LPS millimetres. A `Volume` may hold channels first, ``(C, nz, ny, nx)`` (class probabilities):
its grid is that of the last three axes. Geometry stays LPS everywhere inside medfusion; NIfTI's
RAS is converted in `io/nifti.py` only. After highdicom's `VolumeGeometry`/`Volume` and TorchIO's
`ScalarImage`/`LabelMap`.

Examples:
    >>> import numpy as np
    >>> v = Volume(np.zeros((4, 5, 6), np.float32), spacing=(1.0, 1.0, 2.0))
    >>> v.shape, float(v.affine[2, 2])
    ((4, 5, 6), 2.0)
    >>> g = Grid((2, 3, 3), spacing=(2.0, 2.0, 2.0))
    >>> v.resample_to(g).shape
    (2, 3, 3)
    >>> LabelMap(np.ones((4, 5, 6), np.uint8)).resample_to(g).array.dtype
    dtype('uint8')
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11 on

MAX_VOXELS = 1024**3  # a header that claims more voxels than this is refused before allocation


# --- Types ---


def _checked_geometry(
    spacing: Any, origin: Any, direction: Any
) -> tuple[tuple[float, float, float], tuple[float, float, float], np.ndarray]:
    """Spacing, origin and direction as validated values (see `Grid`'s Raises)."""
    sp = tuple(float(v) for v in np.asarray(spacing, dtype=np.float64).ravel())
    org = tuple(float(v) for v in np.asarray(origin, dtype=np.float64).ravel())
    d = np.array(direction, dtype=np.float64).reshape(3, 3)  # a copy: a Grid freezes its own
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        msg = f"Volume spacing must be three values, each positive and finite, got {sp}"
        raise ValueError(msg)
    if len(org) != 3 or not np.all(np.isfinite(org)):
        msg = f"Volume origin must be three finite values, got {org}"
        raise ValueError(msg)
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
        msg = f"Volume direction must be orthonormal (columns are unit axes), got {d.tolist()}"
        raise ValueError(msg)
    return sp, org, d  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True, eq=False)
class Grid:
    """A 3D sampling grid in LPS millimetres, without voxels (highdicom's `VolumeGeometry`).

    Attributes:
        shape: voxels along (z, y, x) — array order, each ≥ 1.
        spacing: voxel size along the i, j, k axes (x, y, z), mm, positive and finite.
        origin: LPS position (mm) of voxel (0, 0, 0)'s centre.
        direction: 3×3, columns the LPS unit vectors of the i, j, k axes; orthonormal.

    Raises:
        ValueError: `shape` is not three positive integers, a spacing is not positive and finite, the
            origin is not finite, or `direction` is not orthonormal (tolerance 1e-4).

    Examples:
        >>> Grid((10, 20, 30), spacing=(0.5, 0.5, 2.0)).size_xyz
        (30, 20, 10)
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            msg = f"Grid shape must be three positive voxel counts (z, y, x), got {self.shape}"
            raise ValueError(msg)
        sp, org, d = _checked_geometry(self.spacing, self.origin, self.direction)
        d.setflags(write=False)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", sp)
        object.__setattr__(self, "origin", org)
        object.__setattr__(self, "direction", d)

    # --- Geometry ---

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        """Voxel counts along i, j, k (x, y, z): `shape` reversed, as SimpleITK's `GetSize`."""
        nz, ny, nx = self.shape
        return (nx, ny, nz)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """`spacing` in array order (z, y, x), mm: what array-based measurements take."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def affine(self) -> np.ndarray:
        """4×4 matrix from voxel index (i, j, k, 1) to LPS mm."""
        a = np.eye(4)
        a[:3, :3] = self.direction @ np.diag(self.spacing)
        a[:3, 3] = self.origin
        return a

    def index_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Map an (N, 3) array of (i, j, k) indices to (N, 3) LPS points (mm)."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ (self.direction @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Map an (N, 3) array of LPS points (mm) to continuous (i, j, k) indices."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
        m = np.linalg.inv(self.direction @ np.diag(self.spacing))
        return (xyz - np.asarray(self.origin)) @ m.T

    @property
    def voxel_volume_ml(self) -> float:
        """One voxel's volume in mL (mm³ / 1000)."""
        return float(np.prod(self.spacing)) / 1000.0

    def same_as(self, other: Grid, tol: float = 1e-4) -> bool:
        """Whether `other` has this shape and, within `tol` (mm; unitless for direction), this geometry."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def corners(self) -> np.ndarray:
        """The LPS positions (mm) of the 8 corner voxels' centres, shape (8, 3)."""
        last = np.asarray(self.size_xyz, float) - 1.0
        ijk = np.array([[i, j, k] for i in (0.0, last[0]) for j in (0.0, last[1]) for k in (0.0, last[2])])
        return self.index_to_world(ijk)

    def overlaps(self, other: Grid) -> bool:
        """Whether `other`'s voxel-centre box meets this grid's box (each box: its voxel centres, out
        to half a voxel beyond them). All 8 corners of `other` are mapped into this grid's index space,
        so a rotated or flipped grid is judged by its whole extent, not by two opposite corners.
        Conservative: two boxes whose hulls meet only diagonally count as overlapping."""
        ijk = self.world_to_index(other.corners())
        lo, hi = ijk.min(0), ijk.max(0)
        size = np.asarray(self.size_xyz, float)
        return bool(np.all(hi >= -0.5) and np.all(lo <= size - 0.5))

    def orientation_code(self) -> str:
        """Three-letter LPS code of the i, j, k axes (e.g. 'LPS' for a plain axial series)."""
        letters = (("L", "R"), ("P", "A"), ("S", "I"))
        code = ""
        for c in range(3):
            v = self.direction[:, c]
            ax = int(np.argmax(np.abs(v)))
            code += letters[ax][0] if v[ax] > 0 else letters[ax][1]
        return code

    def centred_grid(self, spacing_mm: float | list[float], size_xyz: list[int] | tuple[int, ...]) -> Grid:
        """A grid of `size_xyz` (x, y, z) voxels of `spacing_mm` (one value or x, y, z; mm), with this
        grid's direction and centred on this grid's centre.

        Raises:
            ValueError: a spacing that is not positive, or a size that is not three positive counts.
        """
        size = np.asarray(size_xyz, dtype=int)
        spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
        if np.any(spacing <= 0):
            msg = f"target spacing must be positive, got {spacing_mm}"
            raise ValueError(msg)
        centre = self.index_to_world(((np.asarray(self.size_xyz, float) - 1) / 2.0)[None])[0]
        half = self.direction @ (spacing * (size - 1) / 2.0)
        return Grid(
            (int(size[2]), int(size[1]), int(size[0])),
            (float(spacing[0]), float(spacing[1]), float(spacing[2])),
            tuple(float(v) for v in centre - half),  # type: ignore[arg-type]
            self.direction,
        )

    # --- SimpleITK ---

    def resampler(self, interpolator: int, default: float, pixel_id: int) -> sitk.ResampleImageFilter:
        """A SimpleITK resampler whose output is this grid (no reference image allocated)."""
        f = sitk.ResampleImageFilter()
        f.SetSize([int(n) for n in self.size_xyz])
        f.SetOutputSpacing(self.spacing)
        f.SetOutputOrigin(self.origin)
        f.SetOutputDirection(tuple(float(v) for v in self.direction.ravel()))
        f.SetInterpolator(interpolator)
        f.SetDefaultPixelValue(float(default))
        f.SetOutputPixelType(pixel_id)
        return f

    @classmethod
    def of_sitk(cls, img: sitk.Image) -> Grid:
        """The grid of a 3D SimpleITK image.

        Raises:
            ValueError: the image is not 3D, or its geometry is invalid (see the class).
        """
        if img.GetDimension() != 3:
            msg = f"expected a 3D SimpleITK image, got {img.GetDimension()}D"
            raise ValueError(msg)
        return cls(
            tuple(int(n) for n in reversed(img.GetSize())),  # type: ignore[arg-type]
            img.GetSpacing(),
            img.GetOrigin(),
            np.array(img.GetDirection()).reshape(3, 3),
        )


# --- Transforms ---


def matrix_to_sitk(matrix: np.ndarray | None = None) -> sitk.AffineTransform:
    """A 4×4 LPS matrix as a SimpleITK affine transform: medfusion's one matrix → ITK conversion.

    Args:
        matrix: 4×4 (only the top three rows are read), in ITK's convention: it maps a point of the
            output (fixed) grid, LPS mm, to the input (moving) image's point. None: identity.

    Returns:
        A 3D `sitk.AffineTransform` with the matrix's linear part and translation (mm).
    """
    tx = sitk.AffineTransform(3)
    if matrix is not None:
        m = np.asarray(matrix, float)
        tx.SetMatrix(m[:3, :3].ravel().tolist())
        tx.SetTranslation(m[:3, 3].tolist())
    return tx


def sitk_to_matrix(tx: sitk.Transform) -> np.ndarray:
    """The 4×4 LPS matrix of a linear SimpleITK transform (or a composite of linear ones), the inverse
    of `matrix_to_sitk`: probed at the origin and 100 mm along each axis, so any linear transform type
    (Euler, Similarity, Affine, composites) reads the same way.

    Returns:
        4×4 float64, last row (0, 0, 0, 1); mm for the translation.
    """
    pts = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]) * 100.0
    out = np.array([tx.TransformPoint(tuple(p)) for p in pts])
    m = np.eye(4)
    m[:3, 3] = out[0]
    m[:3, :3] = ((out[1:] - out[0]) / 100.0).T
    return m


@dataclasses.dataclass
class Volume:
    """An image on a `Grid`: a 3D array (z, y, x), or channels first (C, z, y, x), in LPS millimetres.

    Construct it from an array and geometry, `Volume(array, spacing, origin, direction, modality)`,
    or on a grid, `Volume.on(grid, array)`; its geometry is `grid`. Images resample linearly
    (`resample_to`); a `LabelMap` resamples nearest-neighbour.

    Attributes:
        array: the voxels, (z, y, x) or (C, z, y, x).
        spacing, origin, direction: the grid's geometry (see `Grid`).
        modality: DICOM-style modality ("CT", "MR", "SEG", "OT", …).
        meta: report metadata (series UID and description, source file, format, …).
        warnings: what the loader corrected or doubts, one line each.

    Raises:
        ValueError: the array is not 3D or 4D, a spacing is not positive and finite, the origin is
            not finite, or `direction` is not orthonormal (its columns must be unit axes at right
            angles).
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    modality: str = "OT"
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.array.ndim not in (3, 4):
            msg = f"Volume needs a 3D array (z, y, x) or channels first (C, z, y, x), got shape {self.array.shape}"
            raise ValueError(msg)
        self.spacing, self.origin, self.direction = _checked_geometry(
            self.spacing, self.origin, self.direction
        )

    @classmethod
    def on(
        cls,
        grid: Grid,
        array: np.ndarray,
        modality: str = "OT",
        meta: dict[str, Any] | None = None,
    ) -> Self:
        """`array` ((z, y, x) or (C, z, y, x)) placed on `grid`, whose shape it must have.

        Raises:
            ValueError: the array's last three axes differ from `grid.shape`.
        """
        if tuple(array.shape[-3:]) != grid.shape:
            msg = f"array shape {array.shape} differs from the grid {grid.shape}"
            raise ValueError(msg)
        return cls(array, grid.spacing, grid.origin, grid.direction.copy(), modality, dict(meta or {}))

    # --- Geometry ---

    @property
    def grid(self) -> Grid:
        """The sampling grid (no voxels)."""
        return Grid(self.shape, self.spacing, self.origin, self.direction)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxels along (z, y, x) (the last three axes when the volume has channels)."""
        return tuple(int(n) for n in self.array.shape[-3:])  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        """Channels of a (C, z, y, x) volume; 1 for a plain 3D one."""
        return int(self.array.shape[0]) if self.array.ndim == 4 else 1

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        """Voxel counts along i, j, k (x, y, z)."""
        return self.grid.size_xyz

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """`spacing` in array order (z, y, x), mm."""
        return self.grid.spacing_zyx

    @property
    def affine(self) -> np.ndarray:
        """4×4 matrix from voxel index (i, j, k, 1) to LPS mm."""
        return self.grid.affine

    def index_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Map an (N, 3) array of (i, j, k) indices to (N, 3) LPS points (mm)."""
        return self.grid.index_to_world(ijk)

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Map an (N, 3) array of LPS points (mm) to continuous (i, j, k) indices."""
        return self.grid.world_to_index(xyz)

    @property
    def voxel_volume_ml(self) -> float:
        """One voxel's volume in mL."""
        return self.grid.voxel_volume_ml

    def same_grid(self, other: Volume | Grid, tol: float = 1e-4) -> bool:
        """Whether `other` (a volume or a grid) has this volume's grid, within `tol` mm."""
        return self.grid.same_as(other if isinstance(other, Grid) else other.grid, tol)

    def with_array(self, array: np.ndarray, modality: str | None = None) -> Self:
        """A new volume of this type on the same grid holding `array` (same shape), keeping the meta
        and the loader's warnings (copies of both).

        Raises:
            ValueError: `array`'s shape differs from this volume's array.
        """
        if array.shape != self.array.shape:
            msg = f"array shape {array.shape} differs from the grid {self.array.shape}"
            raise ValueError(msg)
        return type(self)(
            array,
            self.spacing,
            self.origin,
            self.direction.copy(),
            modality or self.modality,
            dict(self.meta),
            list(self.warnings),
        )

    def orientation_code(self) -> str:
        """Three-letter LPS code of the i, j, k axes (e.g. 'LPS' for a plain axial series)."""
        return self.grid.orientation_code()

    # --- Resampling ---

    def resample_to(
        self, grid: Grid | Volume, transform: np.ndarray | None = None, *, default: float | None = None
    ) -> Volume:
        """This image sampled on `grid` (SimpleITK, linear, float32): the one resampling entry point.

        Args:
            grid: the output grid (a `Volume` stands for its grid).
            transform: 4×4 LPS matrix in ITK's convention, mapping a point of `grid` to this image's
                point (a registration's `matrix`); None: identity.
            default: value outside this image; None: the image's minimum.

        Returns:
            A `Volume` (same modality, meta and warnings) on `grid`; channels are resampled one by
            one. A `LabelMap` overrides this to resample nearest-neighbour.
        """
        target = grid if isinstance(grid, Grid) else grid.grid
        fill = float(default) if default is not None else float(np.min(self.array))
        f = target.resampler(sitk.sitkLinear, fill, sitk.sitkFloat32)
        f.SetTransform(matrix_to_sitk(transform))
        return self._resampled(target, f, lambda img: sitk.Cast(img, sitk.sitkFloat32))

    def _resampled(self, target: Grid, f: sitk.ResampleImageFilter, cast: Any) -> Volume:
        """Run `f` over each channel (a plain 3D volume is one channel) and place the result on `target`."""
        grid = self.grid
        planes = self.array if self.array.ndim == 4 else self.array[None]
        out = [sitk.GetArrayFromImage(f.Execute(cast(Volume.on(grid, p).to_sitk()))) for p in planes]
        arr = np.stack(out) if self.array.ndim == 4 else out[0]
        res = type(self).on(target, arr, self.modality, self.meta)
        res.warnings = list(self.warnings)  # what the loader corrected still holds after resampling
        return res

    # --- SimpleITK ---

    def to_sitk(self) -> sitk.Image:
        """The 3D image as SimpleITK's (array copied; geometry set).

        Raises:
            ValueError: the volume has channels (resample or write them one by one).
        """
        if self.array.ndim != 3:
            msg = f"a {self.array.shape} volume with channels has no single SimpleITK image"
            raise ValueError(msg)
        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(self.direction.flatten()))
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image, modality: str = "OT", meta: dict[str, Any] | None = None) -> Volume:
        """A volume from a 3D SimpleITK image (array copied).

        Raises:
            ValueError: the image is not 3D, or its geometry is invalid.
        """
        if img.GetDimension() != 3:
            msg = f"expected a 3D SimpleITK image, got {img.GetDimension()}D"
            raise ValueError(msg)
        return cls(
            sitk.GetArrayFromImage(img),
            img.GetSpacing(),
            img.GetOrigin(),
            np.array(img.GetDirection()).reshape(3, 3),
            modality,
            dict(meta or {}),
        )

    def summary(self) -> dict[str, Any]:
        """The JSON-ready description `qc.json` records per input volume."""
        return {
            "modality": self.modality,
            "size": list(self.size_xyz),
            "spacing_mm": [round(s, 4) for s in self.spacing],
            "orientation": self.orientation_code(),
            "series_description": self.meta.get("series_description", ""),
            "series_uid": self.meta.get("series_uid", ""),
            "source": self.meta.get("source", ""),
            "warnings": list(self.warnings),
        }


@dataclasses.dataclass
class LabelMap(Volume):
    """Class indices (z, y, x; an integer array) on a grid; always resampled nearest-neighbour, keeping
    the pixel type (TorchIO's `LabelMap`), so no caller can interpolate labels by mistake.

    Examples:
        >>> lab = LabelMap(np.array([[[0, 1], [2, 3]]], np.uint8))
        >>> lab.resample_to(Grid((1, 2, 2), spacing=(1.0, 1.0, 1.0))).array.tolist()
        [[[0, 1], [2, 3]]]
    """

    modality: str = "SEG"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.array.ndim != 3:
            msg = f"LabelMap needs a 3D array of class indices, got shape {self.array.shape}"
            raise ValueError(msg)

    @classmethod
    def of(cls, vol: Volume) -> LabelMap:
        """`vol` read as a label map (same array, geometry, modality and meta); a LabelMap as is."""
        if isinstance(vol, LabelMap):
            return vol
        return cls(
            vol.array,
            vol.spacing,
            vol.origin,
            vol.direction,
            vol.modality,
            dict(vol.meta),
            list(vol.warnings),
        )

    def resample_to(
        self, grid: Grid | Volume, transform: np.ndarray | None = None, *, default: float | None = None
    ) -> LabelMap:
        """These labels on `grid`, nearest-neighbour, same integer type; `default` (0 if None) outside.
        `transform` as in `Volume.resample_to`; meta and warnings kept."""
        target = grid if isinstance(grid, Grid) else grid.grid
        src = self.to_sitk()
        f = target.resampler(sitk.sitkNearestNeighbor, float(default or 0), src.GetPixelID())
        f.SetTransform(matrix_to_sitk(transform))
        res = LabelMap.on(target, sitk.GetArrayFromImage(f.Execute(src)), self.modality, self.meta)
        res.warnings = list(self.warnings)
        return res
