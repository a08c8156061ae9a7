"""Synthetic cohorts: `DIR/patients/<id>/` (what a hospital hands over) and `DIR/labels/` (truth).

Examples:
    >>> from medfusion.synth.generate import GridPreset
    >>> GridPreset.get("small").ct_size
    (96, 96, 64)
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from medfusion.io.atomic import atomic_path, write_json, write_text
from medfusion.io.nifti import write_nifti
from medfusion.io.volume import Volume
from medfusion.labels import CLASS_NAMES, SCORE_NAMES
from medfusion.synth import mni, notes
from medfusion.synth.export import study_info, write_series
from medfusion.synth.phantom import HeadPhantom, labels_from_tissue
from medfusion.synth.render import grid_points, render_ct, render_mr, slabs

# --- Parameters ---


@dataclasses.dataclass(frozen=True)
class GridPreset:
    """The CT and MR grids of a synthetic cohort: sizes in voxels (x, y, z) and spacings in mm (x, y,
    z). The MR has its own grid, orientation and misalignment; see `generate_patient`."""

    ct_size: tuple[int, int, int]  # x, y, z voxels
    ct_spacing: tuple[float, float, float]
    mr_size: tuple[int, int, int]
    mr_spacing: tuple[float, float, float]

    @staticmethod
    def get(name: str) -> GridPreset:
        """The preset `name`: "standard", "small" or "clinical". Raises ValueError for another name."""
        presets = {
            "standard": GridPreset((128, 128, 96), (1.6, 1.6, 2.0), (112, 112, 80), (1.9, 1.9, 2.5)),
            "small": GridPreset((96, 96, 64), (2.1, 2.1, 3.0), (80, 80, 56), (2.6, 2.6, 3.6)),
            # a head CT as scanners write it (512², 0.45 mm in plane, 1.25 mm slices) and a 3D T1 at 1 mm
            "clinical": GridPreset((512, 512, 152), (0.45, 0.45, 1.25), (256, 256, 176), (1.0, 1.0, 1.0)),
        }
        if name not in presets:
            msg = f"unknown grid preset {name!r}; choose one of {sorted(presets)}"
            raise ValueError(msg)
        return presets[name]


ANATOMIES = {"phantom": "SYN", "mni": "MNI"}  # anatomy → patient-ID prefix
MAX_ROTATION_DEG = 15.0
MAX_TRANSLATION_MM = 20.0
_ORIENTATIONS = {
    "axial": np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]]).T,
    "sagittal": np.array([[0.0, 1, 0], [0, 0, -1], [-1, 0, 0]]).T,
    "coronal": np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]).T,
}


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """The 3×3 rotation about the x, then the y, then the z axis (fixed axes: R = Rz · Ry · Rx) by
    `angles_deg` = (x, y, z) degrees; scipy's `Rotation.from_euler("xyz", …)` (lower case: extrinsic).

    Examples:
        >>> np.round(rotation_matrix(np.array([0.0, 0.0, 90.0])), 6) + 0.0
        array([[ 0., -1.,  0.],
               [ 1.,  0.,  0.],
               [ 0.,  0.,  1.]])
    """
    return Rotation.from_euler("xyz", np.asarray(angles_deg, dtype=float), degrees=True).as_matrix()


def centred_grid(
    size: tuple[int, int, int], spacing: tuple[float, float, float], direction: np.ndarray, centre: np.ndarray
) -> Volume:
    """An empty float32 volume of `size` voxels (x, y, z) and `spacing` mm whose centre lies at the LPS
    point `centre` (mm), axes along the columns of the 3×3 `direction`."""
    half = direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2.0)
    return Volume(np.zeros(size[::-1], np.float32), spacing, tuple(np.asarray(centre) - half), direction)


@functools.lru_cache(maxsize=1)
def _priors() -> tuple[list[notes.ImageFacts], list[notes.NoteFacts]]:
    """Fixed draws from the image-fact and note-fact priors, for the oracle's marginalisation."""
    rng = np.random.default_rng(12345)
    imgs = [image_facts(HeadPhantom.random(rng, _n_lesions(rng))) for _ in range(1500)]
    nts = [notes.sample_note_facts(rng) for _ in range(1500)]
    return imgs, nts


def _n_lesions(rng: np.random.Generator) -> int:
    return int(rng.choice([0, 1, 2], p=[0.2, 0.6, 0.2]))


def image_facts(head: HeadPhantom) -> notes.ImageFacts:
    """What the diagnosis model reads from the image: the largest lesion's core diameter (mm), oedema
    ratio and necrosis, and whether any lesion is calcified (all zero / False without a lesion)."""
    if not head.lesions:
        return notes.ImageFacts(False, 0.0, 0.0, False, False)
    big = max(head.lesions, key=lambda les: les.core.radius)
    return notes.ImageFacts(
        True, big.diameter_mm, big.oedema_ratio, big.necrosis, any(les.calcifications for les in head.lesions)
    )


# --- One patient ---


def draw_label(seed: int, index: int, prob: float) -> int:
    """The diagnosis draw, from its own stream so that it does not depend on image rendering."""
    return int(np.random.default_rng([seed, index, 3]).random() < prob)


def patient_facts(seed: int, index: int) -> tuple[HeadPhantom, notes.NoteFacts, np.random.Generator]:
    """Patient `index` of cohort `seed`: its head (0, 1 or 2 lesions with probabilities 0.2 / 0.6 /
    0.2), its clinical facts (each of course and history stated in the note with probability 0.88),
    and the random stream that goes on to render it — the same (seed, index) always gives the same
    patient, whatever else the cohort holds."""
    rng = np.random.default_rng([seed, index])
    head = HeadPhantom.random(rng, _n_lesions(rng))
    nf = notes.sample_note_facts(rng)
    nf.course_stated = bool(rng.random() > 0.12)
    nf.history_stated = bool(rng.random() > 0.12)
    return head, nf, rng


def generate_patient(
    out: Path,
    seed: int,
    index: int,
    preset: str = "standard",
    mr_format: str | None = None,
    force: dict[str, Any] | None = None,
    anatomy: str = "phantom",
) -> dict[str, Any]:
    """Generate one patient; returns its row for labels.csv / oracle.csv.

    `anatomy` is "phantom" (the ellipsoid head of phantom.py) or "mni" (nilearn's MNI152 template,
    deformed per patient: mni.py). Both carry the same lesion and diagnosis draws for a (seed, index):
    the MNI patient moves the phantom's lesions into its white matter.

    Raises:
        ValueError: an unknown `anatomy` or `preset`.
        ImportError: "mni" without nilearn installed.
    """
    grid = GridPreset.get(preset)
    if anatomy not in ANATOMIES:
        msg = f"unknown anatomy {anatomy!r}; choose one of {list(ANATOMIES)}"
        raise ValueError(msg)
    head, nf, rng = patient_facts(seed, index)
    for key, value in (force or {}).items():
        if key == "n_lesions":
            head.lesions = (
                head.lesions[:value]
                if value <= len(head.lesions)
                else head.lesions + [head._random_lesion(rng) for _ in range(value - len(head.lesions))]
            )
        else:
            setattr(nf, key, value)
    real = None
    if anatomy == "mni":
        real = mni.MniHead.from_phantom(head, np.random.default_rng([seed, index, 11]))
    body: HeadPhantom | mni.MniHead = real if real is not None else head
    pid = f"{ANATOMIES[anatomy]}{seed % 10000:04d}{index:04d}"
    pdir = out / "patients" / pid
    ldir = out / "labels" / pid
    # CT: axial, head centred near the table's origin
    ct_centre = np.array([rng.uniform(-5, 5), rng.uniform(-25, -15), rng.uniform(-60, 60)])
    ct = centred_grid(grid.ct_size, grid.ct_spacing, np.eye(3), ct_centre)
    tissue_ct = np.empty(ct.shape, np.uint8)
    slice_fwhm_mm = 0.0
    if real is None:
        for k0, k1 in slabs(ct):
            tissue_ct[k0:k1] = head.tissue(grid_points(ct, k0, k1) - ct_centre).reshape(
                k1 - k0, *ct.shape[1:]
            )
        hu = render_ct(head, tissue_ct, ct, rng)
    else:
        bone_fraction = np.empty(ct.shape, np.float32)
        other = np.empty(ct.shape, np.uint8)
        voxel_mm = float(np.prod(ct.spacing) ** (1 / 3))
        for k0, k1 in slabs(ct):
            t, f, o = real.sample(grid_points(ct, k0, k1) - ct_centre, voxel_mm)
            tissue_ct[k0:k1], bone_fraction[k0:k1], other[k0:k1] = (
                a.reshape(k1 - k0, *ct.shape[1:]) for a in (t, f, o)
            )
        hu, slice_fwhm_mm = mni.render_ct(real, tissue_ct, bone_fraction, other, ct, rng)
    labels = labels_from_tissue(tissue_ct)
    # MR: own grid and orientation, rigidly misaligned; y = R x + t maps CT points to MR points
    angles = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3)
    shift = rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, 3)
    rot = rotation_matrix(angles)
    trans = shift + ct_centre - rot @ ct_centre  # rotate about the head centre, then shift
    orient = str(rng.choice(list(_ORIENTATIONS)))
    mr_centre = rot @ ct_centre + trans + rng.uniform(-8, 8, 3)
    mr = centred_grid(grid.mr_size, grid.mr_spacing, _ORIENTATIONS[orient], mr_centre)

    def to_phantom(q: np.ndarray) -> np.ndarray:
        return (q - trans) @ rot - ct_centre  # R^T (q - t), about the head centre

    tissue_mr = np.empty(mr.shape, np.uint8)
    rim = np.empty(mr.shape, bool)
    for k0, k1 in slabs(mr):
        p = to_phantom(grid_points(mr, k0, k1))
        tissue_mr[k0:k1] = body.tissue(p).reshape(k1 - k0, *mr.shape[1:])
        rim[k0:k1] = body.core_rim(p).reshape(k1 - k0, *mr.shape[1:])
    if real is None:
        t1c = render_mr(head, tissue_mr, rim, mr, to_phantom, rng)
    else:
        t1c = mni.render_mr(real, tissue_mr, rim, mr, to_phantom, rng)
    # Files
    study = study_info(pid, nf.sex, nf.age, seed, rng)
    write_series(
        ct,
        np.clip(np.round(hu + 1024), 0, 4095).astype(np.uint16),
        pdir / "CT",
        study,
        rng,
        modality="CT",
        series_number=2,
        description="Head 2.0 Hr40",
        intercept=-1024,
    )
    fmt = mr_format or ("dicom" if rng.random() < 0.5 else "nifti")
    mr_stored = np.clip(np.round(t1c), 0, 4095).astype(np.uint16)
    if fmt == "dicom":
        write_series(
            mr,
            mr_stored,
            pdir / "MR",
            study,
            rng,
            modality="MR",
            series_number=5,
            description=f"T1 MPRAGE post-Gd {orient}",
        )
    else:
        base = f"sub-{pid}_ce-gd_T1w"
        write_nifti(mr.with_array(mr_stored.astype(np.int16), "MR"), pdir / "nifti" / f"{base}.nii.gz")
        write_json(
            pdir / "nifti" / f"{base}.json",
            {
                "Modality": "MR",
                "SeriesDescription": f"T1 post-Gd {orient}",
                "Manufacturer": "GE MEDICAL SYSTEMS",
                "MagneticFieldStrength": 3,
                "RepetitionTime": 0.0078,
                "EchoTime": 0.0031,
            },
        )
    write_text(pdir / "note.txt", notes.note_text(nf, rng) + "\n")
    write_nifti(ct.with_array(labels.astype(np.int16), "SEG"), ldir / "segmentation.nii.gz")
    # Ground truth and diagnosis
    facts = image_facts(head)
    prob = float(1 / (1 + np.exp(-notes.logit(facts, nf))))
    malignant = draw_label(seed, index, prob)
    imgs, nts = _priors()
    oracle = notes.oracle_probabilities(facts, nf, imgs, nts, np.random.default_rng([seed, index, 7]))
    matrix = np.eye(4)
    matrix[:3, :3] = rot
    matrix[:3, 3] = trans
    truth: dict[str, Any] = {
        "patient_id": pid,
        "seed": seed,
        "index": index,
        "anatomy": anatomy,
        "registration": {
            "matrix_lps": matrix.tolist(),
            "convention": "ITK: maps a CT (fixed) point in LPS mm to the corresponding MR (moving) point",
            "rotation_deg_xyz": angles.tolist(),
            "translation_mm": shift.tolist(),
            "mr_orientation": orient,
            "mr_format": fmt,
        },
        "head_centre_lps": ct_centre.tolist(),
        "lesions": [
            {
                "centre_lps": (les.core.centre + ct_centre).tolist(),
                "diameter_mm": les.diameter_mm,
                "oedema_ratio": les.oedema_ratio,
                "necrosis": les.necrosis,
                "calcifications": len(les.calcifications),
            }
            for les in body.lesions
        ],
        "image_facts": dataclasses.asdict(facts),
        "note_facts": dataclasses.asdict(nf),
        "probability_malignant": prob,
        "malignant": malignant,
        "oracle": oracle,
        "class_names": list(CLASS_NAMES),
        "voxels_per_class": {name: int(np.sum(labels == i)) for i, name in enumerate(CLASS_NAMES)},
    }
    if real is not None:
        truth["normal_structures"] = mni.normal_structures(real)
        truth["ct_slice_profile_fwhm_mm"] = round(slice_fwhm_mm, 3)
        truth["ct_thick_slice"] = bool(slice_fwhm_mm > 1.5 * ct.spacing[2])
    write_json(ldir / "truth.json", truth)
    return {
        "patient_id": pid,
        "malignant": malignant,
        "sex": nf.sex,
        "mr_format": fmt,
        "n_lesions": len(head.lesions),
        **{f"p_{k}": v for k, v in oracle.items()},
    }


# --- Cohort ---


def generate_cohort(
    out: str | Path,
    n: int,
    seed: int,
    preset: str = "standard",
    workers: int = 2,
    start: int = 0,
    progress: Callable[[], None] | None = None,
    plan: dict[int, dict[str, Any]] | None = None,
    anatomy: str = "phantom",
) -> list[dict[str, Any]]:
    """Generate `n` patients into `out`; deterministic for (`seed`, index). `plan` forces facts per index;
    `anatomy` is "phantom" or "mni" (see `generate_patient`); `progress` is called once per finished
    patient, in either mode (in-process or `workers` > 1 processes).

    Raises:
        ValueError: an unknown `anatomy` or `preset`.
    """
    if anatomy not in ANATOMIES:
        msg = f"unknown anatomy {anatomy!r}; choose one of {list(ANATOMIES)}"
        raise ValueError(msg)
    if anatomy == "mni":
        mni.atlas()  # built once (and the template checked) before forking
    out = Path(out)
    (out / "patients").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    plan = plan or {}
    indices = list(range(start, start + n))
    rows: list[dict[str, Any]] = []
    _priors()  # computed once before forking
    jobs = [
        (
            out,
            seed,
            i,
            preset,
            plan.get(i, {}).get("mr_format"),
            {k: v for k, v in plan.get(i, {}).items() if k != "mr_format"},
            anatomy,
        )
        for i in indices
    ]
    if workers > 1 and n > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futs = [pool.submit(generate_patient, *job) for job in jobs]
            rows = _collect(futs, progress)
    else:
        for job in jobs:
            rows.append(generate_patient(*job))
            if progress:
                progress()
    _write_tables(out, rows)
    return rows


def generate_note_corpus(out: str | Path, n: int, seed: int, start: int = 0) -> dict[str, int]:
    """Notes with their diagnosis and no images: OUT/notes.csv (patient_id, note, malignant).

    Each row is the patient (`seed`, index) of a full cohort with the images left unrendered: the same
    facts and the same diagnosis draw (which depends on the unseen image facts too), and a note drawn
    from the same templates. It stands for what hospitals hold in bulk — reports with a diagnosis but no
    segmented scans — and pre-trains the note path (train/diagnosis.py)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, int]] = []
    for index in range(start, start + n):
        head, nf, rng = patient_facts(seed, index)
        prob = float(1 / (1 + np.exp(-notes.logit(image_facts(head), nf))))
        rows.append(
            (f"SYN{seed % 10000:04d}{index:04d}", notes.note_text(nf, rng), draw_label(seed, index, prob))
        )
    with atomic_path(out / "notes.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["patient_id", "note", "malignant"])
        writer.writerows(rows)
    return {"notes": len(rows), "malignant": sum(r[2] for r in rows)}


def _collect(futs: list[Any], progress: Callable[[], None] | None) -> list[dict[str, Any]]:
    out = []
    for f in futs:
        out.append(f.result())
        if progress:
            progress()
    return out


def _merged_rows(path: Path, header: list[str], new: list[list[Any]]) -> list[list[Any]]:
    """Rows of an existing table (from an earlier `--start`) with `new` replacing same-id rows."""
    by_id: dict[str, list[Any]] = {}
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.reader(f)
            if next(reader, None) == header:
                by_id = {r[0]: r for r in reader if r}
    by_id.update({str(r[0]): r for r in new})
    return [by_id[k] for k in sorted(by_id)]


def _write_table(path: Path, header: list[str], new: list[list[Any]]) -> int:
    rows = _merged_rows(path, header, new)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return len(rows)


def _write_tables(out: Path, rows: list[dict[str, Any]]) -> None:
    """labels.csv / oracle.csv / cohort.json; extending a cohort (`start` > 0) keeps earlier rows."""
    n = _write_table(
        out / "labels" / "labels.csv",
        ["patient_id", *SCORE_NAMES, "sex", "mr_format", "n_lesions"],
        [[r["patient_id"], r["malignant"], r["sex"], r["mr_format"], r["n_lesions"]] for r in rows],
    )
    _write_table(
        out / "labels" / "oracle.csv",
        ["patient_id", "p_all", "p_image", "p_note"],
        [[r["patient_id"], f"{r['p_all']:.6f}", f"{r['p_image']:.6f}", f"{r['p_note']:.6f}"] for r in rows],
    )
    write_json(
        out / "labels" / "cohort.json",
        {"n": n, "class_names": list(CLASS_NAMES), "score_names": list(SCORE_NAMES)},
    )


def read_truth(labels_dir: Path, patient_id: str) -> dict[str, Any]:
    """A generated patient's ground truth, `labels_dir/<patient_id>/truth.json` (the MR misalignment as
    a 4×4 LPS matrix mapping CT points to MR points, facts, oracle probabilities, voxels per class).
    Raises FileNotFoundError when it is missing."""
    return json.loads((labels_dir / patient_id / "truth.json").read_text())
