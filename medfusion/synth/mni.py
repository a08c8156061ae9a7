"""Synthetic heads on real anatomy: nilearn's MNI152 2009 template, deformed per patient, with a head
grown around the brain and rendered with randomised contrast in the spirit of SynthSeg (Billot et al.,
"SynthSeg: segmentation of brain MRI scans of any contrast and resolution without retraining",
Medical Image Analysis 86:102789, 2023).

The template (a brain-extracted T1 and grey/white-matter probability maps at 1 mm, shipped inside
nilearn's wheel, never downloaded) is resampled once per process onto a 1.5 mm LPS *atlas* grid. The
brain mask is T1 > 0.2 × max (nilearn's own rule), closed and hole-filled; CSF is the brain minus grey
and white matter. Outside the brain the atlas holds the signed distance to the brain surface (mm), from
which the CSF layer, the skull (cortical tables and diploë) and the scalp are grown per patient with
smoothly varying thickness; the face (orbits, paranasal sinuses), the skull base (petrous ridges,
clivus, mastoid cells) and the neck are placed at fixed MNI landmarks and vary per patient in size and
presence.

A patient (`MniHead`) is a point function like the phantom: `tissue(p)` gives the `Tissue` at (N, 3)
points `p` in the patient frame (LPS mm about the head centre), so each image is sampled on its own
grid, the CT and its label map from the same points. The patient frame maps into the atlas through a
random rotation, anisotropic scaling and a smooth non-linear displacement (a coarse random grid,
upsampled by cubic-spline interpolation with `scipy.ndimage.map_coordinates`).

Examples:
    >>> import numpy as np
    >>> from medfusion.synth.phantom import HeadPhantom, Tissue
    >>> head = MniHead.from_phantom(HeadPhantom.random(np.random.default_rng(0), 1), np.random.default_rng(1))
    >>> int(head.tissue(np.zeros((1, 3)))[0]) in {int(t) for t in Tissue}
    True
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from medfusion.io.volume import Volume
from medfusion.synth.phantom import Blob, HeadPhantom, Lesion, Tissue, lesion_rim
from medfusion.synth.render import grid_points, slabs

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
MISSING_MSG = "--anatomy mni needs nilearn's MNI152 template: pip install 'medfusion[mni]' (or nilearn>=0.10)"

ATLAS_SPACING = 1.5  # mm
ATLAS_LO = np.array([-96.0, -100.0, -120.0])  # LPS mm of voxel (0, 0, 0)
ATLAS_HI = np.array([96.0, 132.0, 106.0])
_TEMPLATE_BOTTOM_Z = -69.0  # below this the template's brainstem is cut; it is continued as a cord


def _lps(x: float, y: float, z: float) -> np.ndarray:
    """An MNI coordinate as printed in atlases (RAS mm) in medfusion's LPS."""
    return np.array([-x, -y, z])


# Landmarks (MNI RAS mm, approximate) of the structures grown around the brain; each is an
# ellipsoid (centre, semi-axes) in the atlas frame, varied per patient.
FACE_SINUSES = {
    "frontal": (_lps(0, 68, 8), np.array([14.0, 6.0, 11.0])),
    "ethmoid": (_lps(0, 42, -30), np.array([11.0, 18.0, 10.0])),
    "sphenoid": (_lps(0, 14, -38), np.array([13.0, 11.0, 10.0])),
    "maxillary_r": (_lps(30, 38, -62), np.array([13.0, 17.0, 17.0])),
    "maxillary_l": (_lps(-30, 38, -62), np.array([13.0, 17.0, 17.0])),
    "mastoid_r": (_lps(52, -34, -48), np.array([8.0, 10.0, 10.0])),
    "mastoid_l": (_lps(-52, -34, -48), np.array([8.0, 10.0, 10.0])),
}
GLOBES = (_lps(33, 56, -40), _lps(-33, 56, -40))
GLOBE_RADIUS = 12.0
SKULL_BASE = {
    "petrous_r": (_lps(38, -24, -38), np.array([18.0, 9.0, 7.0]), 35.0),  # yaw (deg) along the ridge
    "petrous_l": (_lps(-38, -24, -38), np.array([18.0, 9.0, 7.0]), -35.0),
    "clivus": (_lps(0, -12, -46), np.array([10.0, 7.0, 20.0]), 0.0),
    "sphenoid_body": (_lps(0, 12, -38), np.array([18.0, 15.0, 13.0]), 0.0),
}
PINEAL = _lps(0, -27, 3)
CHOROID_GLOMUS = (_lps(27, -40, 16), _lps(-27, -40, 16))
FACE_ENVELOPE = (_lps(0, 40, -60), np.array([62.0, 62.0, 58.0]))
NECK = (_lps(0, -18, -100), np.array([52.0, 58.0]))  # centre of the axis, semi-axes x/y (mm)


# --- Template ---


def template_dir() -> Path:
    """nilearn's bundled data folder holding the MNI152 2009 files.

    Found without importing nilearn (whose import pulls pandas and scikit-learn in), so that a
    forked generator process stays light.

    Raises:
        ImportError: nilearn is not installed (one line saying how to install it).
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise ImportError(MISSING_MSG)
    data = Path(spec.origin).parent / "datasets" / "data"
    missing = [f for f in TEMPLATE_FILES.values() if not (data / f).is_file()]
    if missing:
        msg = f"{MISSING_MSG}; {data} lacks {missing[0]}"
        raise ImportError(msg)
    return data


@dataclasses.dataclass(frozen=True)
class Atlas:
    """The template's fields on the atlas grid: arrays of shape (nz, ny, nx), float32.

    `sd` is the signed distance to the brain surface in mm (> 0 outside the brain), `gm`/`wm`/`csf`
    the tissue probabilities in [0, 1] (0 outside the brain), `centre` the head centre (LPS mm, the
    centroid of the cranium with a 14 mm shell), `pineal`/`choroid` the midline and atrial CSF points
    nearest the landmarks."""

    sd: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    centre: np.ndarray
    pineal: np.ndarray
    choroid: tuple[np.ndarray, np.ndarray]

    def index(self, a: np.ndarray) -> np.ndarray:
        """(3, N) continuous (k, j, i) indices of (N, 3) atlas points, for `map_coordinates`."""
        return ((a - ATLAS_LO) / ATLAS_SPACING)[:, ::-1].T

    def sample(self, name: str, idx: np.ndarray) -> np.ndarray:
        """The field `name` ("sd", "gm", "wm" or "csf") trilinearly interpolated (`map_coordinates`,
        order 1) at the (3, N) continuous indices `idx` from `index`: float32 (N,). Outside the atlas
        grid "sd" reads 200 mm (far outside the brain) and the tissue probabilities 0.

        Raises:
            AttributeError: `name` is not a field of the atlas.
        """
        field = getattr(self, name)
        cval = 200.0 if name == "sd" else 0.0
        return ndimage.map_coordinates(field, idx, order=1, mode="constant", cval=cval).astype(np.float32)


def _atlas_points() -> tuple[np.ndarray, tuple[int, int, int]]:
    n = np.round((ATLAS_HI - ATLAS_LO) / ATLAS_SPACING).astype(int) + 1
    k, j, i = np.meshgrid(np.arange(n[2]), np.arange(n[1]), np.arange(n[0]), indexing="ij")
    pts = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1) * ATLAS_SPACING + ATLAS_LO
    return pts, (int(n[2]), int(n[1]), int(n[0]))


@functools.lru_cache(maxsize=1)
def atlas() -> Atlas:
    """The atlas, built once per process (≈ 2–4 s: resampling and two distance transforms)."""
    from medfusion.io.nifti import read_nifti

    data = template_dir()
    pts, shape = _atlas_points()
    # the template's bottom is a cut through the brainstem: continue its last slices downward as a cord
    pts_t = pts.copy()
    pts_t[:, 2] = np.maximum(pts_t[:, 2], _TEMPLATE_BOTTOM_Z)
    out: dict[str, np.ndarray] = {}
    for name, fname in TEMPLATE_FILES.items():
        vol = read_nifti(data / fname)
        idx = vol.world_to_index(pts_t)[:, ::-1].T
        arr = vol.array.astype(np.float32)
        out[name] = ndimage.map_coordinates(arr, idx, order=1, mode="constant", cval=0.0).reshape(shape)
    t1 = out["t1"]
    brain = t1 > 0.2 * float(t1.max())
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(brain, iterations=2))
    sd = ndimage.distance_transform_edt(~brain) - ndimage.distance_transform_edt(brain)
    sd = (sd * ATLAS_SPACING).astype(np.float32)
    gm = np.where(brain, out["gm"] / max(float(out["gm"].max()), 1e-6), 0.0).astype(np.float32)
    wm = np.where(brain, out["wm"] / max(float(out["wm"].max()), 1e-6), 0.0).astype(np.float32)
    csf = np.where(brain, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)
    cranium = (sd < 14.0) & (pts[:, 2].reshape(shape) > -60.0)
    centre = pts.reshape(*shape, 3)[cranium].mean(axis=0)

    def nearest_csf(target: np.ndarray, radius: float) -> np.ndarray:
        near = np.linalg.norm(pts - target, axis=1) < radius
        cand = near & (csf.ravel() > 0.5)
        if not cand.any():
            return target
        p = pts[cand]
        return p[np.argmin(np.linalg.norm(p - target, axis=1))]

    return Atlas(
        sd=sd,
        gm=gm,
        wm=wm,
        csf=csf,
        centre=centre,
        pineal=nearest_csf(PINEAL, 8.0) * np.array([0.0, 1, 1]),  # on the midline
        choroid=(nearest_csf(CHOROID_GLOMUS[0], 10.0), nearest_csf(CHOROID_GLOMUS[1], 10.0)),
    )


# --- Random fields ---


def _coarse_field(rng: np.random.Generator, n: int, channels: int = 1) -> np.ndarray:
    """Standard-normal values on an n³ control grid spanning ±`_FIELD_HALF` mm (channels first)."""
    return rng.normal(size=(channels, n, n, n)).astype(np.float32)


_FIELD_HALF = 130.0  # mm: control grids span the whole head in either frame


_LATTICE = 27  # points per axis of the dense lattice a control grid is upsampled to (10 mm apart)


def _lattice(field: np.ndarray) -> np.ndarray:
    """A control-grid field upsampled by cubic-spline interpolation to a `_LATTICE`³ lattice over the
    same span, so that points are then evaluated by cheap trilinear lookups (the field varies over
    tens of mm; the linear lookup's error is far below a voxel)."""
    n = field.shape[1]
    return np.stack(
        [ndimage.zoom(f, (_LATTICE - 1) / (n - 1), order=3, mode="nearest", grid_mode=False) for f in field]
    )


def _eval_field(lattice: np.ndarray, q: np.ndarray) -> np.ndarray:
    """A `_lattice` field at (N, 3) points `q` (mm about the frame's centre): (channels, N)."""
    idx = ((q + _FIELD_HALF) / (2 * _FIELD_HALF) * (_LATTICE - 1)).T[::-1]
    return np.stack(
        [ndimage.map_coordinates(f, idx, order=1, mode="nearest", prefilter=False) for f in lattice]
    )


def _ellipsoid(a: np.ndarray, centre: np.ndarray, axes: np.ndarray, yaw_deg: float = 0.0) -> np.ndarray:
    """Normalised ellipsoid radius of each (N, 3) point (< 1 inside); `yaw_deg` turns it about z."""
    d = a - centre
    reach = float(np.max(axes)) * 1.2
    out = np.full(len(a), np.inf)
    near = np.flatnonzero(np.all(np.abs(d) < reach, axis=1))
    d = d[near]
    if yaw_deg:
        c, s = np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))
        d = d @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    out[near] = np.sqrt(np.sum((d / axes) ** 2, axis=1))
    return out


# --- One patient ---


@dataclasses.dataclass
class MniHead:
    """One real-anatomy patient: the atlas seen through a random deformation, with its lesions.

    Attributes:
        rotation: (3, 3) head orientation (patient frame ← atlas frame), up to ±10° pitch, ±5° roll/yaw.
        scale: (3,) per-axis scaling of the atlas, each U(0.90, 1.10).
        displacement: (3, 6, 6, 6) control-grid displacement (mm) added to atlas points, σ = 2.5 mm.
        label_noise: (3, 9, 9, 9) smooth perturbations of the GM/WM/CSF probabilities (σ = 0.12).
        thickness: (3, 7, 7, 7) control-grid fields modulating CSF, skull and scalp thickness.
        csf_mm, skull_mm, scalp_mm: mean thicknesses (mm), U(1, 3.5), U(5, 8), U(3, 7).
        sinus_scale: per face sinus, a size factor (0 = absent / not pneumatised).
        sinus_opaque: per face sinus, filled with fluid/mucosa instead of air.
        pineal_calc_mm, choroid_calc_mm: radii (mm) of the calcified pineal and choroid glomera (0: none).
        falx_calc: falx calcification present; dense_venous: hyperdense dural venous sinuses.
        lesions: the phantom's lesions, moved into white matter (patient frame, mm).
    """

    rotation: np.ndarray
    scale: np.ndarray
    displacement: np.ndarray
    label_noise: np.ndarray
    thickness: np.ndarray
    csf_mm: float
    skull_mm: float
    scalp_mm: float
    sinus_scale: dict[str, float]
    sinus_opaque: dict[str, bool]
    pineal_calc_mm: float
    choroid_calc_mm: tuple[float, float]
    falx_calc: bool
    falx_calc_field: np.ndarray
    dense_venous: bool
    lesions: list[Lesion]
    _lattices: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def _field(self, name: str) -> np.ndarray:
        if name not in self._lattices:
            self._lattices[name] = _lattice(getattr(self, name))
        return self._lattices[name]

    @classmethod
    def from_phantom(cls, phantom: HeadPhantom, rng: np.random.Generator) -> MniHead:
        """The MNI patient carrying `phantom`'s lesions (same sizes, necrosis, oedema ratio,
        calcifications: the diagnosis model and its oracle are unchanged), moved to white matter."""
        angles = np.radians(rng.uniform([-10, -5, -5], [10, 5, 5]))
        head = cls(
            rotation=_rotation(angles),
            scale=rng.uniform(0.90, 1.10, 3),
            displacement=2.5 * _coarse_field(rng, 6, 3),
            label_noise=0.12 * _coarse_field(rng, 9, 3),
            thickness=_coarse_field(rng, 7, 3),
            csf_mm=float(rng.uniform(1.0, 3.5)),
            skull_mm=float(rng.uniform(5.0, 8.0)),
            scalp_mm=float(rng.uniform(3.0, 7.0)),
            sinus_scale={
                name: float(rng.uniform(0.6, 1.25)) if rng.random() < presence else 0.0
                for name, presence in (
                    ("frontal", 0.85),
                    ("ethmoid", 1.0),
                    ("sphenoid", 0.95),
                    ("maxillary_r", 1.0),
                    ("maxillary_l", 1.0),
                    ("mastoid_r", 0.85),
                    ("mastoid_l", 0.85),
                )
            },
            sinus_opaque={name: bool(rng.random() < 0.08) for name in FACE_SINUSES},
            # prevalences on adult head CT: pineal ≈ 60 %, choroid plexus ≈ 50–70 %, falx ≈ 10–30 %
            pineal_calc_mm=float(rng.uniform(1.5, 3.5)) if rng.random() < 0.6 else 0.0,
            choroid_calc_mm=(
                (float(rng.uniform(1.5, 4.0)), float(rng.uniform(1.5, 4.0)))
                if rng.random() < 0.55
                else (0.0, 0.0)
            ),
            falx_calc=bool(rng.random() < 0.25),
            falx_calc_field=_coarse_field(rng, 12),
            dense_venous=bool(rng.random() < 0.3),
            lesions=[],
        )
        head.lesions = [head._moved(les, rng) for les in phantom.lesions]
        return head

    # --- Geometry ---

    def to_atlas(self, p: np.ndarray) -> np.ndarray:
        """(N, 3) patient-frame points (mm about the head centre) → atlas points (MNI LPS mm)."""
        q = (p @ self.rotation) / self.scale  # R^T p, then unscaled
        return q + _eval_field(self._field("displacement"), p).T + atlas().centre

    def _moved(self, les: Lesion, rng: np.random.Generator) -> Lesion:
        """`les` moved to a supratentorial white-matter point deep enough for its core, off the midline."""
        at = atlas()
        r = les.core.radius
        best, best_depth = np.zeros(3), -np.inf
        for _ in range(20):
            cand = rng.uniform(-1, 1, (512, 3)) * np.array([60.0, 80.0, 55.0])
            a = self.to_atlas(cand)
            idx = at.index(a)
            wm, sd = at.sample("wm", idx), at.sample("sd", idx)
            ok = (wm > 0.75) & (-sd > 6.0 + 0.8 * r) & (a[:, 2] > 0.0) & (np.abs(a[:, 0]) > 12.0)
            ok &= np.all(
                [
                    np.linalg.norm(cand - other.core.centre, axis=1) > 1.2 * (r + other.core.radius)
                    for other in self.lesions
                ]
                or [np.ones(len(cand), bool)],
                axis=0,
            )
            if ok.any():
                best = cand[int(np.argmax(ok))]
                break
            i = int(np.argmax(np.where((wm > 0.5) & (a[:, 2] > 0.0), -sd, -np.inf)))
            if -sd[i] > best_depth:
                best, best_depth = cand[i], float(-sd[i])
        shift = best - les.core.centre
        return Lesion(
            _shifted(les.core, shift),
            _shifted(les.oedema, shift),
            les.necrosis,
            [_shifted(c, shift) for c in les.calcifications],
        )

    def sample(self, p: np.ndarray, voxel_mm: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tissue at (N, 3) patient-frame points, with the skull's partial volume.

        Returns:
            tissue: (N,) uint8 `Tissue` codes.
            bone_fraction: (N,) float32 in [0, 1], the fraction of a voxel of size `voxel_mm` that the
                cranial vault's bone fills (a box profile across the bone's surfaces).
            other: (N,) uint8, the tissue filling the rest of such a voxel (CSF inside, scalp outside).
        """
        at = atlas()
        p = np.asarray(p, np.float64)
        a = self.to_atlas(p)
        idx = at.index(a)
        sd = at.sample("sd", idx)
        t = np.full(len(p), Tissue.AIR, np.uint8)
        frac = np.zeros(len(p), np.float32)
        other = np.full(len(p), Tissue.AIR, np.uint8)
        # beyond 30 mm of the brain (the thickest CSF + skull + scalp) only the face and neck are not air
        live = np.flatnonzero((sd <= 30.0) | ((a[:, 2] < 15.0) & (np.abs(a[:, 0]) < 64.0)))
        t[live], frac[live], other[live] = self._sample_near(
            p[live], a[live], idx[:, live], sd[live], voxel_mm
        )
        return t, frac, other

    def _sample_near(
        self, p: np.ndarray, a: np.ndarray, idx: np.ndarray, sd: np.ndarray, voxel_mm: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        at = atlas()
        # thicknesses vary smoothly over the head; they matter only near the brain's surface
        t_csf = np.full(len(p), self.csf_mm, np.float32)
        t_bone = np.full(len(p), self.skull_mm, np.float32)
        t_scalp = np.full(len(p), self.scalp_mm, np.float32)
        shell = np.flatnonzero((sd > 0) & (sd < 40.0))
        th = _eval_field(self._field("thickness"), a[shell] - at.centre)
        t_csf[shell] = np.clip(self.csf_mm * (1 + 0.35 * th[0]), 0.5, 6.0)
        t_bone[shell] = np.clip(self.skull_mm * (1 + 0.25 * th[1]), 2.5, 12.0)
        t_scalp[shell] = np.clip(self.scalp_mm * (1 + 0.3 * th[2]), 1.5, 11.0)
        inner, outer = t_csf, t_csf + t_bone
        t = np.full(len(p), Tissue.AIR, np.uint8)
        # face and neck soft tissue (all below z = 15 mm in the atlas), then the scalp around the cranium
        low = np.flatnonzero((a[:, 2] < 15.0) & (sd > 0))
        al = a[low]
        face = _ellipsoid(al, *FACE_ENVELOPE) < 1.0
        neck_c, neck_ax = NECK
        neck = (np.sum(((al[:, :2] - neck_c[:2]) / neck_ax) ** 2, axis=1) < 1.0) & (al[:, 2] < -40.0)
        t[low[face | neck]] = Tissue.SOFT
        t[sd <= outer + t_scalp] = Tissue.FAT
        # skull: outer and inner tables (≈ 1.5–2 mm) around the diploë
        bone = (sd > inner) & (sd <= outer)
        table = np.minimum(1.8, 0.35 * t_bone)
        t[bone] = Tissue.BONE_DIPLOE
        t[bone & ((sd < inner + table) | (sd > outer - table))] = Tissue.BONE_CORTEX
        t[(sd > 0) & (sd <= inner)] = Tissue.CSF
        half = 0.5 * voxel_mm
        frac = np.clip((sd - inner + half) / voxel_mm, 0, 1) - np.clip((sd - outer + half) / voxel_mm, 0, 1)
        frac = frac.astype(np.float32)
        other = np.where(sd < 0.5 * (inner + outer), Tissue.CSF, Tissue.FAT).astype(np.uint8)
        # brain: labels drawn from the probability maps (arg max of smoothly perturbed probabilities)
        brain = sd <= 0
        if brain.any():
            ib = idx[:, brain]
            noise = _eval_field(self._field("label_noise"), a[brain] - at.centre)
            probs = np.stack([at.sample(n, ib) for n in ("csf", "gm", "wm")]) + noise
            t[brain] = np.array([Tissue.CSF, Tissue.GREY, Tissue.WHITE], np.uint8)[np.argmax(probs, axis=0)]
        tl = t[low]
        self._skull_base(al, sd[low], inner[low], tl)
        self._face(al, sd[low], tl)
        t[low] = tl
        self._midline(a, sd, inner, t)
        for centre, radius in (
            (at.pineal, self.pineal_calc_mm),
            *zip(at.choroid, self.choroid_calc_mm, strict=True),
        ):
            if radius > 0:
                near = np.flatnonzero(np.all(np.abs(a - centre) < radius, axis=1))
                t[near[np.linalg.norm(a[near] - centre, axis=1) < radius]] = Tissue.CALC_NORMAL
        frac[~np.isin(t, (Tissue.BONE_CORTEX, Tissue.BONE_DIPLOE, Tissue.CSF, Tissue.FAT))] = 0.0
        self._lesions(p, brain, t)
        return t, frac, other

    def tissue(self, p: np.ndarray) -> np.ndarray:
        """Tissue code (uint8 `Tissue`) at each of the (N, 3) patient-frame points."""
        return self.sample(p)[0]

    def core_rim(self, p: np.ndarray) -> np.ndarray:
        """bool (N,): True at the (N, 3) patient-frame points `p` (mm) in the outer third of a tumour core
        (where contrast enhances); `lesion_rim` of this head's lesions."""
        return lesion_rim(self.lesions, p)

    def _skull_base(self, a: np.ndarray, sd: np.ndarray, inner: np.ndarray, t: np.ndarray) -> None:
        """Dense bone of the petrous ridges, clivus and sphenoid body, outside the brain and its CSF."""
        for centre, axes, yaw in SKULL_BASE.values():
            inside = (_ellipsoid(a, centre, axes * self.scale.mean(), yaw) < 1.0) & (sd > inner)
            t[inside] = Tissue.SKULL_BASE

    def _face(self, a: np.ndarray, sd: np.ndarray, t: np.ndarray) -> None:
        """Orbits (globe in orbital fat) and the paranasal/mastoid air spaces with thin bony walls."""
        for c in GLOBES:
            r = np.linalg.norm(a - c, axis=1)
            orbit = (r < GLOBE_RADIUS + 6.0) & (sd > 0) & np.isin(t, (Tissue.SOFT, Tissue.FAT))
            t[orbit] = Tissue.FAT
            t[(r < GLOBE_RADIUS) & (sd > 0)] = Tissue.GLOBE
        for name, (centre, axes) in FACE_SINUSES.items():
            s = self.sinus_scale[name]
            if s <= 0:
                continue
            rel = _ellipsoid(a, centre, axes * s)
            wall = (rel < 1.0 + 1.5 / float(np.min(axes * s))) & (sd > 1.0)
            t[wall & (t != Tissue.GLOBE)] = Tissue.BONE_CORTEX
            t[(rel < 1.0) & (sd > 1.0)] = Tissue.SOFT if self.sinus_opaque[name] else Tissue.SINUS

    def _midline(self, a: np.ndarray, sd: np.ndarray, inner: np.ndarray, t: np.ndarray) -> None:
        """The falx (a 1.5 mm midline dural sheet above the corpus callosum), its calcification, and
        the superior sagittal and transverse sinuses in the CSF layer under the inner table."""
        x, y, z = a[:, 0], a[:, 1], a[:, 2]
        falx = (
            (np.abs(x) < 0.9)
            & (z > 18.0)
            & ((sd <= inner) & ((sd > 0) | (t == Tissue.CSF) | (t == Tissue.GREY)))
        )
        t[falx] = Tissue.FALX
        if self.falx_calc:
            patch = _eval_field(self._field("falx_calc_field"), a - atlas().centre)[0] > 1.6
            t[falx & patch & (z > 30.0)] = Tissue.CALC_NORMAL
        layer = (sd > 0) & (sd <= inner + 0.5)
        sss = layer & (np.abs(x) < 5.0) & (z > 10.0)
        transverse = layer & (y > 70.0) & (z > -28.0) & (z < -8.0) & (np.abs(x) < 60.0)
        t[sss | transverse] = Tissue.VENOUS

    def _lesions(self, p: np.ndarray, brain: np.ndarray, t: np.ndarray) -> None:
        """Lesions as in the phantom; the oedema follows white matter (vasogenic oedema spares cortex)."""
        for les in self.lesions:
            near = np.flatnonzero(np.all(np.abs(p - les.oedema.centre) < les.oedema.radius * 1.6, axis=1))
            q, tq, in_brain = p[near], t[near], brain[near]
            tq[in_brain & (les.oedema.rel(q) < 1) & (tq == Tissue.WHITE)] = Tissue.OEDEMA
            rc = les.core.rel(q)
            tq[in_brain & (rc < 1)] = Tissue.CORE
            if les.necrosis:
                tq[in_brain & (rc < 0.5)] = Tissue.NECROSIS
            for c in les.calcifications:
                tq[in_brain & (c.rel(q) < 1)] = Tissue.CALCIFICATION
            t[near] = tq


def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _shifted(b: Blob, shift: np.ndarray) -> Blob:
    return Blob(b.centre + shift, b.radius, b.lobes, b.amps)


# --- Appearance ---

# CT values (HU) drawn per patient within these ranges. Brain, CSF, fat, muscle, blood and bone after
# DenOtter & Schubert, "Hounsfield Unit", StatPearls (NCBI Bookshelf NBK547721, 2023): GM 37–45,
# WM 20–30, CSF ≈ 0–15, blood 30–45 (dense when haematocrit is high: up to ≈ 70), fat −100 to −50,
# muscle 35–55, cortical bone ≥ 700; normal intracranial calcifications 100–600 by partial volume.
CT_RANGES: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (-1000.0, -1000.0),
    Tissue.SINUS: (-990.0, -900.0),
    Tissue.FAT: (-100.0, -60.0),
    Tissue.SOFT: (35.0, 55.0),
    Tissue.CSF: (2.0, 12.0),
    Tissue.WHITE: (22.0, 30.0),
    Tissue.BONE_CORTEX: (1100.0, 1600.0),
    Tissue.BONE_DIPLOE: (450.0, 900.0),
    Tissue.SKULL_BASE: (1300.0, 1900.0),
    Tissue.GLOBE: (5.0, 15.0),
    Tissue.FALX: (40.0, 60.0),
    Tissue.VENOUS: (38.0, 50.0),
    Tissue.CALC_NORMAL: (150.0, 600.0),
    Tissue.CALCIFICATION: (300.0, 1000.0),
}
GREY_WHITE_HU = (7.0, 14.0)  # GM − WM
DENSE_VENOUS_HU = (55.0, 72.0)

# T1 post-contrast means relative to white matter (= 1), drawn per patient (SynthSeg draws every
# tissue's mean and spread per image; here within T1c-plausible ranges so the contrast stays T1c-like).
MR_RANGES: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (0.0, 0.0),
    Tissue.SINUS: (0.0, 0.03),
    Tissue.FAT: (1.1, 1.6),
    Tissue.SOFT: (0.45, 0.7),
    Tissue.CSF: (0.1, 0.3),
    Tissue.GREY: (0.6, 0.8),
    Tissue.WHITE: (1.0, 1.0),
    Tissue.BONE_CORTEX: (0.02, 0.08),
    Tissue.BONE_DIPLOE: (0.5, 1.0),
    Tissue.SKULL_BASE: (0.02, 0.1),
    Tissue.GLOBE: (0.1, 0.25),
    Tissue.FALX: (0.4, 0.9),
    Tissue.VENOUS: (1.0, 1.6),  # enhancing venous blood
    Tissue.CALC_NORMAL: (0.1, 0.5),
    Tissue.CORE: (0.8, 1.0),
    Tissue.NECROSIS: (0.2, 0.35),
    Tissue.OEDEMA: (0.45, 0.65),
    Tissue.CALCIFICATION: (0.05, 0.2),
}
MR_RIM = (1.4, 2.0)


def ct_values(rng: np.random.Generator, dense_venous: bool) -> dict[Tissue, float]:
    """One patient's HU per tissue; lesion tissues are set relative to that patient's white matter
    (core +4 to +12, oedema −5 to −10), as the phantom's are (36 / 20 against 28)."""
    hu = {tissue: float(rng.uniform(lo, hi)) for tissue, (lo, hi) in CT_RANGES.items()}
    hu[Tissue.GREY] = hu[Tissue.WHITE] + float(rng.uniform(*GREY_WHITE_HU))
    if dense_venous:
        hu[Tissue.VENOUS] = float(rng.uniform(*DENSE_VENOUS_HU))
    hu[Tissue.VENTRICLE] = hu[Tissue.CSF]
    hu[Tissue.CORE] = hu[Tissue.WHITE] + float(rng.uniform(4.0, 12.0))
    hu[Tissue.NECROSIS] = hu[Tissue.CSF] + float(rng.uniform(6.0, 16.0))
    hu[Tissue.OEDEMA] = hu[Tissue.WHITE] - float(rng.uniform(5.0, 10.0))
    return hu


# share of CTs rendered as thick-slice reconstructions, and their slice profile FWHM (mm); SynthSeg's
# randomised resolution (Billot et al. 2023) for the slice axis, where real head CTs vary most
THICK_SLICE_P = 0.3
THICK_SLICE_MM = (3.0, 5.5)


def render_ct(
    head: MniHead,
    tissue: np.ndarray,
    bone_fraction: np.ndarray,
    other: np.ndarray,
    grid: Volume,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float]:
    """CT in HU (float32, shape of `tissue`, clipped to [−1024, 3071]).

    Per patient: HU per tissue (`ct_values`), partial volume at the vault (`bone_fraction`), a
    reconstruction kernel blur σ U(0.35, 0.8) mm in plane and a slice profile of FWHM U(1, 1.5) ×
    the slice spacing — or, with probability `THICK_SLICE_P`, of a thick-slice reconstruction, FWHM
    U(`THICK_SLICE_MM`) mm, its range moved up on grids whose 1.5 × spacing exceeds 3 mm (routine axial head CT is often read at 4-5 mm; the image stays on the
    grid's spacing, as a thick-slice CT does once resampled for the model) — beam-hardening-like
    cupping (up to −8 HU at the centre of the head) and Gaussian noise σ U(3, 7) HU.

    Returns the HU array and the slice profile's FWHM (mm)."""
    hu_of = ct_values(rng, head.dense_venous)
    lut = np.zeros(256, np.float32)
    for t, v in hu_of.items():
        lut[int(t)] = v
    hu = lut[tissue]
    edge = (bone_fraction > 0) & (bone_fraction < 1)
    bone_hu = np.where(tissue == Tissue.BONE_DIPLOE, lut[Tissue.BONE_DIPLOE], lut[Tissue.BONE_CORTEX])
    hu[edge] = bone_fraction[edge] * bone_hu[edge] + (1 - bone_fraction[edge]) * lut[other[edge]]
    sx, sy, sz = grid.spacing
    kernel = float(rng.uniform(0.35, 0.8))
    if rng.random() < THICK_SLICE_P:
        # never thinner than the thin profile's widest (1.5 × a coarse grid's spacing can exceed 3 mm)
        low = max(THICK_SLICE_MM[0], 1.5 * sz)
        fwhm_z = float(rng.uniform(low, max(THICK_SLICE_MM[1], low + 1.0)))
    else:
        fwhm_z = float(rng.uniform(1.0, 1.5)) * sz
    sigma = [max(0.3, fwhm_z / 2.355 / sz), max(0.3, kernel / sy), max(0.3, kernel / sx)]
    hu = ndimage.gaussian_filter(hu, sigma=sigma)
    depth = float(rng.uniform(0.0, 8.0))
    nz, ny, nx = hu.shape
    zz, yy, xx = np.ogrid[:nz, :ny, :nx]
    r2 = (((xx - (nx - 1) / 2) * sx) ** 2 + ((yy - (ny - 1) / 2) * sy) ** 2) / 80.0**2
    cup = (depth * np.clip(1.0 - r2, 0.0, 1.0)).astype(np.float32)
    hu -= np.where(hu > -200, cup, 0.0).astype(np.float32) * np.ones((nz, 1, 1), np.float32)
    hu += rng.normal(0.0, float(rng.uniform(3.0, 7.0)), hu.shape).astype(np.float32)
    return np.clip(hu, -1024, 3071).astype(np.float32), fwhm_z


def render_mr(
    head: MniHead,
    tissue: np.ndarray,
    rim: np.ndarray,
    grid: Volume,
    to_patient: Callable[[np.ndarray], np.ndarray],
    rng: np.random.Generator,
) -> np.ndarray:
    """T1c-like MR (float32, non-negative a.u., shape of `tissue`), SynthSeg-style.

    Per patient: tissue means (`MR_RANGES`, × a white-matter level U(500, 800)) and within-tissue
    spread (σ U(1, 4) % of the mean); an enhancing core rim U(1.4, 2.0); a smooth multiplicative bias
    field exp(0.2·g) with g a cubic-spline field of a 4³ control grid in the patient frame (±≈ 20–40 %);
    a resolution blur σ U(0.3, 0.8) voxels in plane and U(0.3, 1.2) across slices; Rician noise σ
    U(1.5, 4) % of white matter. `to_patient` maps the grid's LPS points into the patient frame."""
    level = float(rng.uniform(500.0, 800.0))
    lut = np.zeros(256, np.float32)
    spread = np.zeros(256, np.float32)
    for t, (lo, hi) in MR_RANGES.items():
        lut[int(t)] = level * float(rng.uniform(lo, hi))
        spread[int(t)] = lut[int(t)] * float(rng.uniform(0.01, 0.04))
    lut[Tissue.VENTRICLE] = lut[Tissue.CSF]
    sig = lut[tissue]
    sig[rim & (tissue == Tissue.CORE)] = level * float(rng.uniform(*MR_RIM))
    sig += spread[tissue] * rng.standard_normal(sig.shape, dtype=np.float32)
    sig = ndimage.gaussian_filter(
        sig, sigma=[rng.uniform(0.3, 1.2), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.8)]
    )
    bias_field = _lattice(_coarse_field(rng, 4))
    for k0, k1 in slabs(grid):
        q = to_patient(grid_points(grid, k0, k1))
        g = _eval_field(bias_field, q)[0].reshape(k1 - k0, *tissue.shape[1:])
        sig[k0:k1] *= np.exp(0.2 * g).astype(np.float32)
    noise = level * float(rng.uniform(0.015, 0.04))
    re = sig + rng.normal(0, noise, sig.shape).astype(np.float32)
    im = rng.normal(0, noise, sig.shape).astype(np.float32)
    return np.sqrt(re**2 + im**2).astype(np.float32)


def normal_structures(head: MniHead) -> dict[str, bool]:
    """Which lesion-like normal structures this patient carries (for truth.json and the tests)."""
    return {
        "pineal_calcification": head.pineal_calc_mm > 0,
        "choroid_plexus_calcification": max(head.choroid_calc_mm) > 0,
        "falx_calcification": head.falx_calc,
        "dense_venous_sinuses": head.dense_venous,
        "opacified_paranasal_sinus": any(
            head.sinus_opaque[n] and head.sinus_scale[n] > 0 for n in FACE_SINUSES
        ),
    }
