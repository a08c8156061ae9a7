"""Report figures (matplotlib, rendered to PNG bytes): score bars, tri-planar views, registration check."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from scipy import ndimage  # noqa: E402

from medfusion.io.volume import Volume  # noqa: E402

CLASS_COLOURS = ["#00000000", "#e41a1c", "#ffd92f", "#4daf4a", "#377eb8", "#984ea3"]


def _png(fig: plt.Figure, dpi: int = 130) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def score_bars(scores: dict[str, float], uncertainty: dict[str, float], threshold: float = 0.5) -> bytes:
    names = list(scores)
    fig, ax = plt.subplots(figsize=(6.0, 0.6 + 0.55 * len(names)))
    vals = [scores[n] for n in names]
    err = [uncertainty.get(n, 0.0) for n in names]
    colours = ["#c0392b" if v >= threshold else "#2e86c1" for v in vals]
    ax.barh(names, vals, xerr=err, color=colours, capsize=4, height=0.5)
    ax.axvline(threshold, color="grey", ls="--", lw=1)
    for y, v in enumerate(vals):
        ax.text(min(v + 0.03, 0.9), y, f"{v:.2f} ± {err[y]:.2f}", va="center", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_xlabel("calibrated probability (bar: ±1 s.d. over MC dropout and TTA)")
    ax.invert_yaxis()
    return _png(fig)


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    fg = labels > 0
    if fg.any():
        return tuple(int(round(c)) for c in ndimage.center_of_mass(fg))  # type: ignore[return-value]
    return tuple(s // 2 for s in labels.shape)  # type: ignore[return-value]


def _planes(a: np.ndarray, c: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices through `c` (array is z, y, x; LPS so flip for display)."""
    return [a[c[0]], np.flipud(a[:, c[1], :]), np.flipud(a[:, :, c[2]])]


def triplanar(ct: Volume, mr: Volume | None, labels: np.ndarray, class_names: list[str]) -> bytes:
    c = _centre(labels)
    sp = ct.spacing
    aspects = [sp[1] / sp[0], sp[2] / sp[0], sp[2] / sp[1]]
    rows = [("CT (brain window)", ct.array.astype(np.float32), {"cmap": "gray", "vmin": -20, "vmax": 100})]
    if mr is not None:
        lo, hi = np.percentile(mr.array, [1, 99.5])
        rows.append(("MR registered to CT", mr.array, {"cmap": "gray", "vmin": lo, "vmax": hi}))
    fig, axes = plt.subplots(len(rows) + 1, 3, figsize=(7.2, 2.5 * (len(rows) + 1)))
    cmap = ListedColormap(CLASS_COLOURS[: max(2, len(class_names))])
    for r, (title, arr, kw) in enumerate(rows):
        for k, sl in enumerate(_planes(arr, c)):
            axes[r, k].imshow(sl, aspect=aspects[k], **kw)
        axes[r, 0].set_ylabel(title, fontsize=8)
    base = rows[-1][1]
    base_kw = rows[-1][2]
    for k, (sl, lab) in enumerate(zip(_planes(base, c), _planes(labels, c), strict=True)):
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
    axes[-1, 0].set_ylabel("segmentation overlay", fontsize=8)
    for ax, t in zip(axes[0], ["axial", "coronal", "sagittal"], strict=True):
        ax.set_title(t, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=CLASS_COLOURS[k], label=n) for k, n in enumerate(class_names) if k > 0]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _png(fig)


def registration_check(ct: Volume, mr: Volume | None) -> bytes:
    """CT bone/skin edges drawn over the registered MR, three planes through the volume centre."""
    fig, axes = plt.subplots(1, 3, figsize=(7.2, 2.6))
    c = tuple(s // 2 for s in ct.shape)
    sp = ct.spacing
    aspects = [sp[1] / sp[0], sp[2] / sp[0], sp[2] / sp[1]]
    edges = np.hypot(*np.gradient(np.clip(ct.array.astype(np.float32), -200, 800), axis=(1, 2)))
    if mr is None:
        for ax in axes:
            ax.text(0.5, 0.5, "no MR", ha="center")
    else:
        lo, hi = np.percentile(mr.array, [1, 99.5])
        for k, (m, e) in enumerate(zip(_planes(mr.array, c), _planes(edges, c), strict=True)):  # type: ignore[arg-type]
            axes[k].imshow(m, cmap="gray", vmin=lo, vmax=hi, aspect=aspects[k])
            axes[k].contour(e, levels=[np.percentile(edges, 97)], colors="#ff7f0e", linewidths=0.6)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("registration check: CT edges (orange) over the registered MR", fontsize=9)
    return _png(fig)
