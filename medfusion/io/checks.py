"""Plausibility checks on loaded voxel values: faults that reading cannot see in the header.

A CT in Hounsfield units shows air near −1000 HU and nothing much beyond ±4000 HU (bone and metal
reach ≈ 3000 HU; Kalender, *Computed Tomography*, 3rd ed., 2011). A missing or wrong
RescaleIntercept, or signed data read as unsigned, moves the whole histogram; these checks warn,
they never change values.

Examples:
    >>> import numpy as np
    >>> from medfusion.io.volume import Volume
    >>> value_warnings(Volume(np.full((4, 4, 4), -1000, np.int16), modality="CT"))
    []
"""

from __future__ import annotations

import numpy as np

from medfusion.io.volume import Volume

AIR_HU = (-1100.0, -850.0)  # where air (and lung-free outside-of-body) lies on a calibrated CT
AIR_MIN_FRACTION = 0.002  # a head or body CT has at least this share of air voxels in its field of view
MAX_PLAUSIBLE_HU = 20000.0  # above this no rescaled CT value is physical (signed/unsigned confusion)


def value_warnings(volume: Volume) -> list[str]:
    """One-line warnings when `volume`'s values are implausible for its modality (CT only today).

    Returns [] for a plausible volume. Reads a strided sample (every 2nd slice, 4th row and
    column), so the cost does not grow with the scan's matrix.
    """
    if volume.modality != "CT" or volume.array.size == 0:
        return []
    sample = np.asarray(volume.array[::2, ::4, ::4], dtype=np.float32)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return []
    lo, hi = float(sample.min()), float(sample.max())
    air = float(np.mean((sample >= AIR_HU[0]) & (sample <= AIR_HU[1])))
    out: list[str] = []
    if hi > MAX_PLAUSIBLE_HU or lo < -MAX_PLAUSIBLE_HU:
        out.append(
            f"CT values reach {lo:.0f} … {hi:.0f} HU, beyond any tissue: signed data read as unsigned, "
            "or a wrong RescaleSlope/RescaleIntercept?"
        )
    elif air < AIR_MIN_FRACTION:
        p1 = float(np.percentile(sample, 1))
        out.append(
            f"no air near −1000 HU in this CT (1st percentile {p1:.0f} HU): a missing or wrong "
            "RescaleIntercept, or a field of view inside the body?"
        )
    else:
        out.extend(_slice_warnings(volume))
    return out


def _slice_warnings(volume: Volume) -> list[str]:
    """Slices without air, or with values far beyond the others', in a CT whose other slices are
    plausible: a rescale (or sign) that differs from slice to slice."""
    planes = np.asarray(volume.array[:, ::4, ::4], dtype=np.float32)
    air = np.mean((planes >= AIR_HU[0]) & (planes <= AIR_HU[1]), axis=(1, 2))
    high = planes.reshape(len(planes), -1).max(axis=1)
    odd = np.flatnonzero((air == 0) & (np.median(air) > 0.02) | (np.abs(high) > MAX_PLAUSIBLE_HU))
    if not len(odd):
        return []
    shown = ", ".join(str(int(k)) for k in odd[:6]) + ("…" if len(odd) > 6 else "")
    return [
        f"{len(odd)} of {len(planes)} CT slices (index {shown}) have no air near −1000 HU or values beyond "
        "±20000 HU, unlike the others: RescaleIntercept or PixelRepresentation differing between slices?"
    ]
