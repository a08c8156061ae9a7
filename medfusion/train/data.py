"""Training data: labels tables, a per-case preprocessing cache (registration runs once per case),
and augmentation (MONAI transforms on the image side, sentence shuffling/dropping on the note)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai import transforms as mt

from medfusion.config import PreprocessConfig, RegistrationConfig, StrictModel, upgrade_registration
from medfusion.io.atomic import atomic_path, write_json
from medfusion.io.case import load_case, read_note
from medfusion.io.errors import InputError
from medfusion.preprocess.prepare import prepare_case
from medfusion.preprocess.registration import RegistrationResult


def read_labels_csv(path: str | Path, score_names: list[str]) -> dict[str, dict[str, int]]:
    """`labels.csv`: `patient_id` plus one 0/1 column per score name."""
    path = Path(path)
    out: dict[str, dict[str, int]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [s for s in ["patient_id", *score_names] if s not in (reader.fieldnames or [])]
        if missing:
            raise InputError(path, f"missing column(s) {missing}")
        for row in reader:
            out[row["patient_id"]] = {s: int(float(row[s])) for s in score_names}
    return out


def _same(
    stored: dict[str, Any] | None, key: dict[str, Any], model: type[StrictModel] = PreprocessConfig
) -> bool:
    """Settings stored by an earlier version equal `key` once fields added since take their defaults
    (None, from before settings were stored, counts as equal)."""
    if stored is None:
        return True
    reg = stored if model is RegistrationConfig else stored.get("registration")
    if isinstance(reg, dict):  # fields whose default changed: absent means the old value
        stored = dict(stored)
        reg = upgrade_registration(reg)
        if model is RegistrationConfig:
            stored = reg
        else:
            stored["registration"] = reg
    try:
        return model.model_validate(stored).model_dump(mode="json") == key
    except ValueError:
        return False


def _cache_one(
    folder: str, labels_dir: str, cfg_json: str, cache_dir: str, registration_from: str | None = None
) -> dict[str, Any]:
    """One case into `cache_dir`; kept if it was made with the same preprocessing. When only the grid or
    intensity settings changed, the stored registration is reused rather than run again; so is one stored
    for the same case in `registration_from`: another cache folder (when its registration settings are
    the same) or a `medfusion run` output folder (its per-patient qc.json)."""
    cfg = PreprocessConfig.model_validate_json(cfg_json)
    pid = Path(folder).name
    target = Path(cache_dir) / f"{pid}.npz"
    meta_path = Path(cache_dir) / f"{pid}.json"
    key = cfg.model_dump(mode="json")
    old = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if old is not None and target.exists() and _same(old.get("preprocess"), key):
        # records from before "preprocess" was stored are taken as they are; the note is cheap to
        # read and is read again, so that an edited note never trains from a stale copy
        note = read_note(Path(folder))[0]
        if note != old.get("note"):
            old["note"] = note
            write_json(meta_path, old)
        return old
    reuse = None
    donors = [old]
    if registration_from and (Path(registration_from) / f"{pid}.json").exists():
        donors.append(json.loads((Path(registration_from) / f"{pid}.json").read_text()))
    elif registration_from and (Path(registration_from) / pid / "qc.json").exists():
        # a `medfusion run` output folder: its qc.json holds the registration it used; asking for it
        # by name is taken as saying its settings are the ones wanted
        qc = json.loads((Path(registration_from) / pid / "qc.json").read_text())
        if qc.get("registration", {}).get("mode") == "auto":
            donors.append({"registration": qc["registration"], "preprocess": key})
    donor = next(
        (
            d
            for d in donors
            if d is not None
            and d.get("registration")
            and d.get("preprocess")
            and _same(d["preprocess"].get("registration"), key["registration"], RegistrationConfig)
        ),
        None,
    )
    if donor is not None:
        r = donor["registration"]
        reuse = RegistrationResult(
            np.asarray(r["matrix_lps"], float),
            r["metric_mattes_mi"],
            r["iterations"],
            r["seconds"],
            r["mode"],
            r.get("qc", {}),
        )
    try:
        case = load_case(folder, labels_dir=labels_dir)
        ct = prepare_case(case, cfg, registration=reuse)
    except InputError as exc:
        return {"patient_id": pid, "error": str(exc)}
    if ct.target is None:
        return {"patient_id": pid, "error": "no label map"}
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        np.savez(
            f, ct=ct.ct.astype(np.float16), mr=ct.mr.astype(np.float16), target=ct.target.astype(np.uint8)
        )
    rec = {
        "patient_id": pid,
        "note": ct.note,
        "has_mr": ct.has_mr,
        "registration_qc": ct.registration.qc if ct.registration else None,
        "registration": ct.registration.to_json() if ct.registration else None,
        "preprocess": key,
        "seconds": ct.timings,
    }
    write_json(meta_path, rec)
    return rec


def build_cache(
    folders: list[Path],
    labels_dir: Path,
    cfg: PreprocessConfig,
    cache_dir: Path,
    workers: int = 2,
    registration_from: Path | None = None,
) -> list[dict[str, Any]]:
    """Preprocess every case once (in parallel through Dask's process scheduler) into `cache_dir`."""
    import dask

    cache_dir.mkdir(parents=True, exist_ok=True)
    tasks = [
        dask.delayed(_cache_one)(
            str(f),
            str(labels_dir),
            cfg.model_dump_json(),
            str(cache_dir),
            str(registration_from) if registration_from else None,
        )
        for f in folders
    ]
    if workers > 1:
        results = dask.compute(*tasks, scheduler="processes", num_workers=workers)
    else:
        results = dask.compute(*tasks, scheduler="synchronous")
    return list(results)


def load_cached(cache_dir: Path, pid: str) -> dict[str, Any]:
    with np.load(cache_dir / f"{pid}.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in ("ct", "mr", "target")}
    meta = json.loads((cache_dir / f"{pid}.json").read_text())
    return {**arrays, **meta}


# --- Augmentation ---


def image_augment(
    crop: list[int],
    flip: bool,
    rotate_deg: float,
    noise: float,
    scale: float,
    lesion_prob: float,
    seed: int,
    class_ratios: list[float] | None = None,
) -> mt.Compose:
    """Lesion-biased crop, flips, small rotations, intensity noise/scale (MONAI dictionary transforms).

    With `class_ratios` (one weight per class, background first) crops are centred on a voxel of a class
    drawn with those weights (classes absent from a case are skipped), so that a rare class such as a
    few-millimetre calcification is seen in a fixed share of crops; otherwise a crop is centred on lesion
    with probability `lesion_prob`.

    Input: {"ct", "mr", "label"} as stored (channel first, any dtype); the crop comes first, so only the
    crop is copied and made float32, then CT and MR become one "image". Output: {"image", "label"}.
    """
    keys = ["ct", "mr", "label"]
    crop_t: Any
    if class_ratios:
        crop_t = mt.RandCropByLabelClassesd(
            keys=keys,
            label_key="label",
            spatial_size=crop,
            ratios=list(class_ratios),
            num_classes=len(class_ratios),
            num_samples=1,
            allow_smaller=True,
            warn=False,
        )
    else:
        crop_t = mt.RandCropByPosNegLabeld(
            keys=keys,
            label_key="label",
            spatial_size=crop,
            pos=max(lesion_prob, 1e-3),
            neg=max(1.0 - lesion_prob, 1e-3),
            num_samples=1,
            allow_smaller=True,
        )
    ts: list[Any] = [
        crop_t,
        mt.SpatialPadd(keys=keys, spatial_size=crop),
        mt.CastToTyped(keys=keys, dtype=np.float32),
        mt.ConcatItemsd(keys=["ct", "mr"], name="image", dim=0),
        mt.DeleteItemsd(keys=["ct", "mr"]),
    ]
    if flip:
        ts.append(mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2))
    if rotate_deg > 0:
        r = float(np.radians(rotate_deg))
        ts.append(
            mt.RandAffined(
                keys=["image", "label"],
                prob=0.5,
                rotate_range=(r, r, r),
                scale_range=(0.05, 0.05, 0.05),
                mode=("bilinear", "nearest"),
                padding_mode="border",
            )
        )
    if noise > 0:
        ts.append(mt.RandGaussianNoised(keys=["image"], prob=0.5, std=noise))
    if scale > 0:
        ts.append(mt.RandScaleIntensityd(keys=["image"], prob=0.5, factors=scale))
    comp = mt.Compose(ts)
    comp.set_random_state(seed=seed)
    return comp


_SENT = re.compile(r"(?<=[.!?])\s+")


def note_augment(note: str, rng: np.random.Generator, shuffle: bool, drop: float) -> str:
    """Shuffle sentence order after the first and drop sentences at random (never the first)."""
    sents = _SENT.split(note.strip()) if note.strip() else []
    if len(sents) < 2:
        return note
    head, tail = sents[:1], sents[1:]
    if shuffle:
        rng.shuffle(tail)  # type: ignore[arg-type]
    tail = [s for s in tail if rng.random() >= drop]
    return " ".join(head + tail)


def to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
