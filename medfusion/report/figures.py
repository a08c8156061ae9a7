"""Report figures (matplotlib, rendered to PNG bytes): score bars, tri-planar views, registration check."""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from nibabel import orientations as nib_orientations  # noqa: E402
from scipy import ndimage  # noqa: E402

from medfusion.io.volume import Grid, LabelMap, Volume  # noqa: E402
from medfusion.report.colours import CLASS_COLOURS  # noqa: E402


def _png(fig: plt.Figure, dpi: int = 130) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def score_bars(
    scores: dict[str, float],
    uncertainty: dict[str, float],
    threshold: float = 0.5,
    band: tuple[float, float] | None = None,
    assessed: bool = True,
) -> bytes:
    """Horizontal bars of the calibrated probabilities (in [0, 1]) with ±1 s.d. error bars and the
    decision threshold dashed: red at or above it, blue below, amber inside the indeterminate `band`
    [low, high) (shaded). With `assessed` False (a case outside the model's training domain) the bars
    are grey, with neither error bars nor a "± s.d." — out of domain the MC-dropout s.d. is no measure
    of doubt (it is 0.00 on saturated scores, benchmarks/RESULTS.md, #25) — and the axis says the scores
    were not assessed. PNG bytes."""
    names = list(scores)
    fig, ax = plt.subplots(figsize=(6.0, 0.6 + 0.55 * len(names)))
    vals = [scores[n] for n in names]
    err = [uncertainty.get(n, 0.0) for n in names] if assessed else None
    colours = [
        "#aab7b8"
        if not assessed
        else "#d68910"
        if band is not None and band[0] <= v < band[1]
        else ("#c0392b" if v >= threshold else "#2e86c1")
        for v in vals
    ]
    if assessed and band is not None and band[0] < band[1]:
        ax.axvspan(band[0], band[1], color="#fdebd0", zorder=0)
    ax.barh(names, vals, xerr=err, color=colours, capsize=4, height=0.5)
    ax.axvline(threshold, color="grey", ls="--", lw=1)
    for y, text in enumerate(bar_labels(vals, err)):
        ax.text(min(vals[y] + 0.03, 0.9), y, text, va="center", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_xlabel(
        "calibrated probability (bar: ±1 s.d. over MC dropout and TTA)"
        if assessed
        else "probability — NOT ASSESSED: input outside the model's training domain"
    )
    ax.invert_yaxis()
    return _png(fig)


def bar_labels(vals: list[float], err: list[float] | None) -> list[str]:
    """The text beside each score bar: "0.43 ± 0.01", or "0.98 (not assessed)" when `err` is None."""
    if err is None:
        return [f"{v:.2f} (not assessed)" for v in vals]
    return [f"{v:.2f} ± {e:.2f}" for v, e in zip(vals, err, strict=True)]


# --- Display orientation ---


@dataclasses.dataclass(frozen=True)
class DisplayGrid:
    """How arrays on one grid are turned into display order: index axes permuted and flipped so
    that i runs to the patient's left, j to posterior and k to superior (LPS), whatever the storage
    order; `spacing` (x, y, z) mm and `origin` (LPS mm of voxel 0) are those of the turned array,
    exact only when the grid is not oblique (an oblique grid is shown along its nearest axes)."""

    ornt: np.ndarray  # nibabel orientation of the (i, j, k) axes, shape (3, 2)
    spacing: tuple[float, float, float]
    origin: np.ndarray
    axes: np.ndarray  # (3, 3): LPS unit vector of each displayed axis (columns i, j, k)

    @classmethod
    def of(cls, grid: Grid | Volume) -> DisplayGrid:
        """How arrays on `grid` (or a volume's grid) are turned for display."""
        ornt = nib_orientations.io_orientation(grid.affine)
        shape_xyz = np.array(grid.size_xyz)
        spacing = tuple(float(grid.spacing[int(np.flatnonzero(ornt[:, 0] == w)[0])]) for w in range(3))
        # the voxel that becomes index 0 along each displayed axis
        corner = np.array([0 if ornt[a, 1] > 0 else shape_xyz[a] - 1 for a in range(3)], dtype=np.float64)
        origin = grid.index_to_world(corner)[0]
        axes = np.zeros((3, 3))
        for a in range(3):
            axes[:, int(ornt[a, 0])] = grid.direction[:, a] * ornt[a, 1]
        return cls(ornt, spacing, origin, axes)  # type: ignore[arg-type]

    def turn(self, array: np.ndarray) -> np.ndarray:
        """`array` (z, y, x) on the grid → (S, P, L)-ordered array (k, j, i as LPS axes)."""
        xyz = np.asarray(array).transpose(2, 1, 0)
        return np.ascontiguousarray(nib_orientations.apply_orientation(xyz, self.ornt).transpose(2, 1, 0))

    def position_mm(self, view: int, index: int) -> float:
        """Patient coordinate (mm) of a displayed slice: z for axial, y for coronal, x for sagittal."""
        axis = (2, 1, 0)[view]
        return float(self.origin[axis] + index * self.spacing[axis] * self.axes[axis, axis])

    def index_of(self, lps: tuple[float, float, float], shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The (k, j, i) index of the turned array of this `shape` nearest to the point `lps` (mm),
        clipped to the array."""
        # displayed axes i, j, k run along LPS x, y, z from `origin`; turned arrays are (k, j, i)
        rel = np.asarray(lps, float) - self.origin
        ijk = [int(round(float(np.dot(rel, self.axes[:, a])) / self.spacing[a])) for a in range(3)]
        k, j, i = (int(np.clip(ijk[a], 0, shape[2 - a] - 1)) for a in (2, 1, 0))
        return k, j, i


def _on_ct(labels: LabelMap, ct: Volume) -> np.ndarray:
    """The label array, once its grid is checked to be the CT's (a label map on another grid would be
    drawn mirrored or shifted over the CT)."""
    if not labels.same_grid(ct, tol=1e-3):
        msg = f"label map grid {labels.shape} at {labels.origin} is not the CT's {ct.shape} at {ct.origin}"
        raise ValueError(msg)
    return labels.array


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    fg = labels > 0
    if fg.any():
        return tuple(int(round(c)) for c in ndimage.center_of_mass(fg))  # type: ignore[return-value]
    return tuple(s // 2 for s in labels.shape)  # type: ignore[return-value]


VIEWS = ("axial", "coronal", "sagittal")
# (left, right, top, bottom) letters of each view in radiological convention
VIEW_LETTERS = (("R", "L", "A", "P"), ("R", "L", "S", "I"), ("A", "P", "S", "I"))


def display_planes(a: np.ndarray, c: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices through `c` of a display-ordered array (see
    `DisplayGrid.turn`), laid out as they are shown: axial and coronal in the radiological
    convention (patient right on image left; anterior, superior up), sagittal anterior left."""
    return [a[c[0]], np.flipud(a[:, c[1], :]), np.flipud(a[:, :, c[2]])]


def _aspects(spacing: tuple[float, float, float]) -> list[float]:
    return [spacing[1] / spacing[0], spacing[2] / spacing[0], spacing[2] / spacing[1]]


def _annotate(ax: plt.Axes, view: int, shape: tuple[int, int], pixel_mm: float, where: str) -> None:
    """Orientation letters on the four edges, the slice position and a scale bar."""
    left, right, top, bottom = VIEW_LETTERS[view]
    style: dict[str, Any] = {"color": "#ffd92f", "fontsize": 6.5, "fontweight": "bold"}
    ax.text(0.01, 0.5, left, transform=ax.transAxes, ha="left", va="center", **style)
    ax.text(0.99, 0.5, right, transform=ax.transAxes, ha="right", va="center", **style)
    ax.text(0.5, 0.99, top, transform=ax.transAxes, ha="center", va="top", **style)
    ax.text(0.5, 0.01, bottom, transform=ax.transAxes, ha="center", va="bottom", **style)
    ax.text(0.02, 0.02, where, transform=ax.transAxes, ha="left", va="bottom", color="white", fontsize=5.5)
    width_mm = shape[1] * pixel_mm
    bar = 50.0 if width_mm >= 150 else (20.0 if width_mm >= 60 else 10.0)
    x1 = shape[1] * 0.96
    y = shape[0] * 0.93
    ax.plot([x1 - bar / pixel_mm, x1], [y, y], color="white", lw=1.5)
    ax.text(x1, y - shape[0] * 0.02, f"{bar:g} mm", color="white", fontsize=5.5, ha="right", va="bottom")


def _legend(fig: plt.Figure, labels: np.ndarray, class_names: list[str], *, fontsize: float) -> bool:
    """The classes present in `labels`, in plain words, under the figure; False when none is."""
    present = set(np.unique(labels).tolist())
    handles = [
        Patch(color=CLASS_COLOURS[k], label=n.replace("_", " "))
        for k, n in enumerate(class_names)
        if k > 0 and k in present
    ]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=fontsize, frameon=False)
    return bool(handles)


def triplanar(ct: Volume, mr: Volume | None, labels: LabelMap, class_names: list[str]) -> bytes:
    """CT, registered MR and the segmentation overlay in three planes through the lesions' centre,
    drawn in display orientation from the CT's geometry (`DisplayGrid`), with orientation letters,
    slice positions and scale bars. `mr` and `labels` lie on the CT's grid; PNG bytes.

    Raises:
        ValueError: `labels` is not on the CT's grid (1e-3 mm tolerance).
    """
    grid = DisplayGrid.of(ct)
    on_ct = _on_ct(labels, ct)
    labels_d = grid.turn(on_ct)
    c = _centre(labels_d)
    aspects = _aspects(grid.spacing)
    rows = [
        (
            "CT (brain window)",
            grid.turn(ct.array.astype(np.float32)),
            {"cmap": "gray", "vmin": -20, "vmax": 100},
        )
    ]
    if mr is not None:
        lo, hi = np.percentile(mr.array, [1, 99.5])
        rows.append(("MR registered to CT", grid.turn(mr.array), {"cmap": "gray", "vmin": lo, "vmax": hi}))
    fig, axes = plt.subplots(len(rows) + 1, 3, figsize=(7.2, 2.5 * (len(rows) + 1)))
    cmap = ListedColormap(CLASS_COLOURS[: max(2, len(class_names))])
    where = [f"{a} {grid.position_mm(v, c[v]):+.1f} mm" for v, a in enumerate(("z", "y", "x"))]
    pixel_mm = [grid.spacing[0], grid.spacing[0], grid.spacing[1]]
    for r, (title, arr, kw) in enumerate(rows):
        for k, sl in enumerate(display_planes(arr, c)):
            axes[r, k].imshow(sl, aspect=aspects[k], **kw)
            _annotate(axes[r, k], k, sl.shape, pixel_mm[k], where[k])
        axes[r, 0].set_ylabel(title, fontsize=8)
    base = rows[-1][1]
    base_kw = rows[-1][2]
    for k, (sl, lab) in enumerate(zip(display_planes(base, c), display_planes(labels_d, c), strict=True)):
        axes[-1, k].imshow(sl, aspect=aspects[k], **base_kw)
        axes[-1, k].imshow(
            np.ma.masked_equal(lab, 0),
            cmap=cmap,
            vmin=0,
            vmax=len(class_names) - 1,
            alpha=0.55,
            aspect=aspects[k],
            interpolation="nearest",
        )
        _annotate(axes[-1, k], k, sl.shape, pixel_mm[k], where[k])
    axes[-1, 0].set_ylabel("segmentation overlay", fontsize=8)
    for ax, t in zip(axes[0], VIEWS, strict=True):
        ax.set_title(t, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    _legend(fig, on_ct, class_names, fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _png(fig)


def key_image(
    ct: Volume,
    labels: LabelMap,
    class_names: list[str],
    *,
    centre_lps: tuple[float, float, float] | None = None,
    title: str = "",
) -> bytes:
    """One row of CT (brain window) with the segmentation overlaid in three planes through
    `centre_lps` (a lesion's centroid, LPS mm; the lesions' centre when None), in display
    orientation with letters, slice positions and scale bars. `labels` lies on the CT's grid; PNG bytes.

    Raises:
        ValueError: `labels` is not on the CT's grid (1e-3 mm tolerance).
    """
    grid = DisplayGrid.of(ct)
    on_ct = _on_ct(labels, ct)
    labels_d = grid.turn(on_ct)
    c = _centre(labels_d) if centre_lps is None else grid.index_of(centre_lps, labels_d.shape)
    ct_d = grid.turn(ct.array.astype(np.float32))
    aspects = _aspects(grid.spacing)
    pixel_mm = [grid.spacing[0], grid.spacing[0], grid.spacing[1]]
    cmap = ListedColormap(CLASS_COLOURS[: max(2, len(class_names))])
    fig, axes = plt.subplots(1, 3, figsize=(7.2, 2.5))
    for k, (sl, lab) in enumerate(zip(display_planes(ct_d, c), display_planes(labels_d, c), strict=True)):
        axes[k].imshow(sl, cmap="gray", vmin=-20, vmax=100, aspect=aspects[k])
        axes[k].imshow(
            np.ma.masked_equal(lab, 0),
            cmap=cmap,
            vmin=0,
            vmax=len(class_names) - 1,
            alpha=0.5,
            aspect=aspects[k],
            interpolation="nearest",
        )
        where = f"{'zyx'[k]} {grid.position_mm(k, c[k]):+.1f} mm"
        _annotate(axes[k], k, sl.shape, pixel_mm[k], where)
        axes[k].set_xticks([])
        axes[k].set_yticks([])
        axes[k].set_title(VIEWS[k], fontsize=8)
    handles = _legend(fig, on_ct, class_names, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    return _png(fig)


def registration_check(
    ct: Volume, mr: Volume | None, labels: LabelMap | None = None, *, used: bool = True
) -> bytes:
    """CT bone/skin edges drawn over the registered MR (on the CT's grid), three planes through the
    lesions' centre (the volume centre when there is no lesion), in display orientation; PNG bytes.
    `used` False (the QC failed and the model did not use the MR) is written across the figure.

    Raises:
        ValueError: `labels` is not on the CT's grid (1e-3 mm tolerance).
    """
    fig, axes = plt.subplots(1, 3, figsize=(7.2, 2.6))
    grid = DisplayGrid.of(ct)
    shape = grid.turn(np.zeros(ct.shape, np.uint8)).shape
    c = _centre(grid.turn(_on_ct(labels, ct))) if labels is not None else tuple(s // 2 for s in shape)
    aspects = _aspects(grid.spacing)
    ct_d = grid.turn(np.clip(ct.array.astype(np.float32), -200, 800))
    edges = np.hypot(*np.gradient(ct_d, axis=(1, 2)))
    if mr is None:
        for ax in axes:
            ax.text(0.5, 0.5, "no MR", ha="center")
    else:
        mr_d = grid.turn(mr.array)
        lo, hi = np.percentile(mr.array, [1, 99.5])
        pixel_mm = [grid.spacing[0], grid.spacing[0], grid.spacing[1]]
        for k, (m, e) in enumerate(zip(display_planes(mr_d, c), display_planes(edges, c), strict=True)):  # type: ignore[arg-type]
            axes[k].imshow(m, cmap="gray", vmin=lo, vmax=hi, aspect=aspects[k])
            axes[k].contour(e, levels=[np.percentile(edges, 97)], colors="#ff7f0e", linewidths=0.6)
            where = f"{'zyx'[k]} {grid.position_mm(k, c[k]):+.1f} mm"
            _annotate(axes[k], k, m.shape, pixel_mm[k], where)
            if not used:
                axes[k].text(
                    0.5,
                    0.5,
                    "NOT USED",
                    transform=axes[k].transAxes,
                    ha="center",
                    va="center",
                    color="#e41a1c",
                    fontsize=14,
                    fontweight="bold",
                    alpha=0.8,
                )
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    title = "registration check: CT edges (orange) over the registered MR"
    fig.suptitle(title + ("" if used else " — QC failed, MR not used by the model"), fontsize=9)
    return _png(fig)
