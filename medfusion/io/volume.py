"""`Volume`: a 3D array that carries its own geometry (LPS), modality and report metadata.

Array layout follows SimpleITK: ``array[k, j, i]`` (slice, row, column), so ``array.shape`` is
``(nz, ny, nx)`` while ``spacing`` and ``origin`` are ``(x, y, z)``. ``direction`` is a 3×3 matrix
whose *columns* are the LPS unit vectors of the i, j, k index axes. ``affine`` maps ``(i, j, k, 1)``
to LPS millimetres.

Examples:
    >>> import numpy as np
    >>> v = Volume(np.zeros((4, 5, 6), np.float32), spacing=(1.0, 1.0, 2.0))
    >>> v.shape, v.affine[2, 2]
    ((4, 5, 6), 2.0)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import SimpleITK as sitk

MAX_VOXELS = 1024**3  # a header that claims more voxels than this is refused before allocation

# --- Types ---


@dataclasses.dataclass
class Volume:
    """A 3D image and its geometry, in LPS millimetres.

    Raises:
        ValueError: the array is not 3D, a spacing is not positive and finite, the origin is not
            finite, or `direction` is not orthonormal (its columns must be unit axes at right angles).
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    modality: str = "OT"
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            msg = f"Volume needs a 3D array, got shape {self.array.shape}"
            raise ValueError(msg)
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if not all(np.isfinite(s) and s > 0 for s in self.spacing):
            msg = f"Volume spacing must be positive and finite, got {self.spacing}"
            raise ValueError(msg)
        if not np.all(np.isfinite(self.origin)):
            msg = f"Volume origin must be finite, got {self.origin}"
            raise ValueError(msg)
        if not np.allclose(self.direction.T @ self.direction, np.eye(3), atol=1e-4):
            msg = (
                f"Volume direction must be orthonormal (columns are unit axes), got {self.direction.tolist()}"
            )
            raise ValueError(msg)

    # --- Geometry ---

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        nz, ny, nx = self.shape
        return (nx, ny, nz)

    @property
    def affine(self) -> np.ndarray:
        """4×4 matrix from voxel index (i, j, k) to LPS mm."""
        a = np.eye(4)
        a[:3, :3] = self.direction @ np.diag(self.spacing)
        a[:3, 3] = self.origin
        return a

    def index_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Map an (N, 3) array of (i, j, k) indices to (N, 3) LPS points."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ (self.direction @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Map an (N, 3) array of LPS points to continuous (i, j, k) indices."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
        m = np.linalg.inv(self.direction @ np.diag(self.spacing))
        return (xyz - np.asarray(self.origin)) @ m.T

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def same_grid(self, other: Volume, tol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def with_array(self, array: np.ndarray, modality: str | None = None) -> Volume:
        """A new Volume on the same grid holding `array`."""
        if array.shape != self.array.shape:
            msg = f"array shape {array.shape} differs from the grid {self.array.shape}"
            raise ValueError(msg)
        return Volume(
            array,
            self.spacing,
            self.origin,
            self.direction.copy(),
            modality or self.modality,
            dict(self.meta),
        )

    def orientation_code(self) -> str:
        """Three-letter LPS code of the i, j, k axes (e.g. 'LPS' for a plain axial series)."""
        letters = (("L", "R"), ("P", "A"), ("S", "I"))
        code = ""
        for c in range(3):
            v = self.direction[:, c]
            ax = int(np.argmax(np.abs(v)))
            code += letters[ax][0] if v[ax] > 0 else letters[ax][1]
        return code

    # --- SimpleITK ---

    def to_sitk(self) -> sitk.Image:
        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(self.direction.flatten()))
        return img

    @classmethod
    def from_sitk(cls, img: sitk.Image, modality: str = "OT", meta: dict[str, Any] | None = None) -> Volume:
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
