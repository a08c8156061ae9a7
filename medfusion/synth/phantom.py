"""A continuous head phantom: tissue labels evaluated at any LPS point, so CT and MR can be rendered
on their own grids (and the MR through a known rigid misalignment) with no resampling error.

Examples:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> head = HeadPhantom.random(rng, n_lesions=1)
    >>> t = head.tissue(np.array([[0.0, 0.0, 0.0]]))
    >>> int(t[0]) in (Tissue.WHITE, Tissue.VENTRICLE, Tissue.GREY, Tissue.CORE, Tissue.OEDEMA, Tissue.NECROSIS)
    True
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from medfusion.labels import Label


class Tissue(enum.IntEnum):
    """Tissue classes of a synthetic head (uint8 codes); each renders to its own CT HU and MR signal.
    The lesion tissues map to label codes through `LABEL_OF_TISSUE`."""

    AIR = 0
    FAT = 1
    BONE_CORTEX = 2
    BONE_DIPLOE = 3
    CSF = 4
    GREY = 5
    WHITE = 6
    VENTRICLE = 7
    SINUS = 8
    CORE = 9
    NECROSIS = 10
    OEDEMA = 11
    CALCIFICATION = 12
    # real-anatomy heads (mni.py) only
    SOFT = 13  # muscle, skin, mucosa
    GLOBE = 14
    SKULL_BASE = 15  # dense petrous / sphenoid / clival bone
    FALX = 16
    VENOUS = 17  # dural venous sinus blood
    CALC_NORMAL = 18  # physiological calcification (pineal, choroid plexus, falx): not a lesion


# the label-map code of each lesion tissue; every other tissue is background
LABEL_OF_TISSUE = {
    Tissue.CORE: Label.TUMOUR_CORE,
    Tissue.NECROSIS: Label.TUMOUR_CORE,
    Tissue.OEDEMA: Label.OEDEMA,
    Tissue.CALCIFICATION: Label.CALCIFICATION,
}


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@dataclasses.dataclass
class Blob:
    """An irregular ellipsoid: radius modulated smoothly by direction."""

    centre: np.ndarray
    radius: float
    lobes: np.ndarray  # (m, 3) unit directions
    amps: np.ndarray  # (m,) relative amplitudes

    @classmethod
    def random(
        cls, rng: np.random.Generator, centre: np.ndarray, radius: float, irregularity: float = 0.18
    ) -> Blob:
        """A blob at `centre` (LPS mm) of mean `radius` (mm) whose radius varies with direction by up to
        ± `irregularity` (relative) along five random directions."""
        m = 5
        return cls(
            np.asarray(centre, float),
            float(radius),
            _unit(rng, m),
            rng.uniform(-irregularity, irregularity, m),
        )

    def rel(self, p: np.ndarray) -> np.ndarray:
        """Distance to the centre over the direction-dependent radius at the (N, 3) LPS points `p` (mm):
        float (N,), < 1 inside the blob."""
        d = p - self.centre
        r = np.linalg.norm(d, axis=1) + 1e-9
        u = d / r[:, None]
        mod = 1.0 + np.sum(self.amps[None, :] * (u @ self.lobes.T) ** 2, axis=1) - 0.5 * np.sum(self.amps)
        return r / (self.radius * mod)


@dataclasses.dataclass
class Lesion:
    """A tumour: an enhancing core (necrotic inside when `necrosis`), the oedema around it and any
    calcifications within."""

    core: Blob
    oedema: Blob
    necrosis: bool
    calcifications: list[Blob]

    @property
    def diameter_mm(self) -> float:
        """The core's nominal diameter, mm (twice its mean radius)."""
        return 2.0 * self.core.radius

    @property
    def oedema_ratio(self) -> float:
        """Oedema radius over core radius (> 1)."""
        return self.oedema.radius / self.core.radius


@dataclasses.dataclass
class HeadPhantom:
    """Head of semi-axes `axes` (mm, LPS x/y/z) centred on the origin."""

    axes: np.ndarray
    shape_lobes: np.ndarray
    shape_amps: np.ndarray
    scalp_mm: float
    skull_mm: float
    gyri_phase: np.ndarray
    ventricle_scale: float
    sinus: bool
    lesions: list[Lesion]

    @classmethod
    def random(cls, rng: np.random.Generator, n_lesions: int) -> HeadPhantom:
        """A random head (semi-axes 70 × 88 × 76 mm ± 8 %, scalp 4-6.5 mm, skull 6-9 mm) with
        `n_lesions` lesions drawn inside the brain."""
        axes = np.array([70.0, 88.0, 76.0]) * rng.uniform(0.92, 1.08, 3)
        head = cls(
            axes=axes,
            shape_lobes=_unit(rng, 6),
            shape_amps=rng.uniform(-0.05, 0.05, 6),
            scalp_mm=float(rng.uniform(4.0, 6.5)),
            skull_mm=float(rng.uniform(6.0, 9.0)),
            gyri_phase=rng.uniform(0, 2 * np.pi, 3),
            ventricle_scale=float(rng.uniform(0.8, 1.3)),
            sinus=bool(rng.random() < 0.6),
            lesions=[],
        )
        for _ in range(n_lesions):
            head.lesions.append(head._random_lesion(rng))
        return head

    def _random_lesion(self, rng: np.random.Generator) -> Lesion:
        diameter = float(rng.uniform(5.0, 25.0))
        r = diameter / 2
        for _ in range(200):
            c = rng.uniform(-1, 1, 3) * self.axes * 0.55
            c[2] = abs(c[2]) * 0.8 + 5.0  # supratentorial
            if self._depth(c[None])[0] > 22 + r * 2.2 and abs(c[0]) > 12:
                break
        core = Blob.random(rng, c, r, 0.2)
        oedema = Blob.random(rng, c, r * float(rng.uniform(1.4, 2.4)), 0.25)
        necrosis = bool(diameter > 12 and rng.random() < 0.6)
        calcs: list[Blob] = []
        if rng.random() < 0.35:
            for _ in range(int(rng.integers(1, 4))):
                off = _unit(rng, 1)[0] * r * rng.uniform(0.2, 0.8)
                calcs.append(Blob.random(rng, c + off, float(rng.uniform(1.8, 3.2)), 0.1))
        return Lesion(core, oedema, necrosis, calcs)

    # --- Geometry ---

    def _rel_radius(self, p: np.ndarray) -> np.ndarray:
        r = np.linalg.norm(p / self.axes, axis=1) + 1e-9
        u = p / (np.linalg.norm(p, axis=1, keepdims=True) + 1e-9)
        mod = 1.0 + np.sum(self.shape_amps[None, :] * (u @ self.shape_lobes.T), axis=1)
        return r / mod

    def _depth(self, p: np.ndarray) -> np.ndarray:
        """Approximate depth below the scalp surface in mm (negative outside)."""
        return (1.0 - self._rel_radius(p)) * float(np.mean(self.axes))

    def head_mask(self, p: np.ndarray) -> np.ndarray:
        """Whether each of the (N, 3) LPS points (mm) lies inside the scalp surface: bool (N,)."""
        return self._depth(p) >= 0

    def tissue(self, p: np.ndarray) -> np.ndarray:
        """Tissue class at each of the (N, 3) LPS points."""
        p = np.asarray(p, dtype=np.float64)
        depth = self._depth(p)
        t = np.full(len(p), Tissue.AIR, dtype=np.uint8)
        inner = self.scalp_mm + self.skull_mm
        t[depth >= 0] = Tissue.FAT
        bone = (depth >= self.scalp_mm) & (depth < inner)
        shell = bone & ((depth < self.scalp_mm + 2.0) | (depth >= inner - 1.8))
        t[bone] = Tissue.BONE_DIPLOE
        t[shell] = Tissue.BONE_CORTEX
        t[(depth >= inner) & (depth < inner + 2.0)] = Tissue.CSF
        # cortex thickness varies with position, a rough stand-in for gyri
        g = self.gyri_phase
        wave = np.sin(p[:, 0] / 7 + g[0]) * np.sin(p[:, 1] / 8 + g[1]) * np.sin(p[:, 2] / 6 + g[2])
        brain = depth >= inner + 2.0
        cortex = brain & (depth < inner + 6.0 + 2.5 * wave)
        t[brain] = Tissue.WHITE
        t[cortex] = Tissue.GREY
        vs = self.ventricle_scale
        for sx in (-1.0, 1.0):
            q = (p - np.array([sx * 9.0 * vs, -5.0, 12.0])) / (np.array([6.0, 26.0, 9.0]) * vs)
            t[brain & (np.sum(q**2, axis=1) < 1)] = Tissue.VENTRICLE
        if self.sinus:
            q = (p - np.array([0.0, -self.axes[1] + self.scalp_mm + 6.0, -self.axes[2] * 0.35])) / np.array(
                [14.0, 5.0, 8.0]
            )
            t[(np.sum(q**2, axis=1) < 1) & (depth > 0)] = Tissue.SINUS
        for les in self.lesions:
            # only points near the lesion are tested: the blobs never reach beyond 1.6 radii
            near = np.flatnonzero(np.all(np.abs(p - les.oedema.centre) < les.oedema.radius * 1.6, axis=1))
            q, tq, in_brain = p[near], t[near], brain[near]
            tq[in_brain & (les.oedema.rel(q) < 1)] = Tissue.OEDEMA
            rc = les.core.rel(q)
            tq[in_brain & (rc < 1)] = Tissue.CORE
            if les.necrosis:
                tq[in_brain & (rc < 0.5)] = Tissue.NECROSIS
            for c in les.calcifications:
                tq[in_brain & (c.rel(q) < 1)] = Tissue.CALCIFICATION
            t[near] = tq
        return t

    def core_rim(self, p: np.ndarray) -> np.ndarray:
        """bool (N,): True at the (N, 3) LPS points `p` (mm) in the outer third of a tumour core (where
        contrast enhances); `lesion_rim` of this head's lesions."""
        return lesion_rim(self.lesions, p)


def lesion_rim(lesions: list[Lesion], p: np.ndarray) -> np.ndarray:
    """(N,) bool: True at the (N, 3) points in the outer third of a tumour core of `lesions`."""
    out = np.zeros(len(p), bool)
    for les in lesions:
        near = np.flatnonzero(np.all(np.abs(p - les.core.centre) < les.core.radius * 1.6, axis=1))
        rc = les.core.rel(p[near])
        out[near] |= (rc > 0.66) & (rc < 1)
    return out


def labels_from_tissue(t: np.ndarray) -> np.ndarray:
    """The label map (uint8 `medfusion.labels.Label` codes, same shape) of a tissue array."""
    out = np.zeros(t.shape, np.uint8)
    for tissue, label in LABEL_OF_TISSUE.items():
        out[t == tissue] = label
    return out
