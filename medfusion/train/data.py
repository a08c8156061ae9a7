"""Training data: the labels table, the patient split, and a per-case preprocessing cache (each case is
prepared once by `preprocess.prepare_case`, the entry point inference uses, with SimpleITK on one thread
as inference runs it; the registration is reused while its settings hold). Augmentation and batches are
in train/batches.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.config import PreprocessConfig, RegistrationConfig, StrictModel, upgrade_registration
from medfusion.device import repeatable_registration
from medfusion.io.atomic import atomic_path, write_json
from medfusion.io.case import load_case, read_note
from medfusion.io.errors import InputError
from medfusion.preprocess.prepare import prepare_case
from medfusion.preprocess.registration import RegistrationResult
from medfusion.run.result import QC, CaseResult, RegistrationRecord, validated


def read_labels_csv(path: str | Path, score_names: list[str]) -> dict[str, dict[str, int]]:
    """The diagnosis labels of a cohort: `labels.csv` with a `patient_id` column and one 0/1 column per
    score name (other columns are ignored).

    Returns:
        {patient_id: {score name: 0 or 1}}.

    Raises:
        InputError: the file cannot be read, lacks a column, or a cell is not 0 or 1 (one line naming
            the file, the patient and the column).
    """
    path = Path(path)
    out: dict[str, dict[str, int]] = {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [s for s in ["patient_id", *score_names] if s not in (reader.fieldnames or [])]
            if missing:
                raise InputError(path, f"missing column(s) {missing}")
            for row in reader:
                out[row["patient_id"]] = {s: _zero_one(path, row, s) for s in score_names}
    except OSError as exc:
        raise InputError(path, f"cannot read the labels table ({exc.strerror})") from exc
    return out


def _zero_one(path: Path, row: dict[str, str], column: str) -> int:
    """A labels-table cell as 0 or 1 ("1", "1.0", "0", …); anything else is refused."""
    cell = (row.get(column) or "").strip()
    try:
        value = float(cell)
    except ValueError:
        value = float("nan")
    if value not in (0.0, 1.0):
        raise InputError(
            path, f"patient {row.get('patient_id')!r}: column {column!r} holds {cell!r}, not 0 or 1"
        )
    return int(value)


def split_patients(pids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded split of patient ids into training and validation (both sorted): round(n × val_fraction)
    patients, at least one, go to validation. The same ids (in any order) and seed give the same split.

    Examples:
        >>> tr, va = split_patients([f"p{i}" for i in range(10)], 0.2, seed=0)
        >>> len(tr), len(va), set(tr) & set(va)
        (8, 2, set())
    """
    rng = np.random.default_rng(seed)
    order = sorted(pids)
    rng.shuffle(order)  # type: ignore[arg-type]
    n_val = max(1, int(round(len(order) * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


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


def _registration_of(record: RegistrationRecord | dict[str, Any], path: Path) -> RegistrationResult:
    """The stored registration `record` (a cache record's or a qc.json's "registration") to reuse.

    Raises:
        ValueError: one line naming `path`: the record does not fit `run.result.RegistrationRecord`,
            or holds no registration (mode other than "auto", "skip", "file").
    """
    r = record if isinstance(record, RegistrationRecord) else validated(RegistrationRecord, record, path)
    if not r.ran:
        msg = f"{path}: its registration record holds no registration (mode {r.mode!r})"
        raise ValueError(msg)
    assert r.matrix_lps is not None and r.metric_mattes_mi is not None  # RegistrationRecord's check
    assert r.iterations is not None and r.seconds is not None and r.mode is not None
    return RegistrationResult(
        np.asarray(r.matrix_lps, float), r.metric_mattes_mi, r.iterations, r.seconds, r.mode, r.qc
    )


def _cache_one(
    folder: str, labels_dir: str, cfg_json: str, cache_dir: str, registration_from: str | None = None
) -> dict[str, Any]:
    """One case into `cache_dir`; kept if it was made with the same preprocessing. When only the grid or
    intensity settings changed, the stored registration is reused rather than run again; so is one stored
    for the same case in `registration_from`: another cache folder (when its registration settings are
    the same) or a `medfusion run` output folder (its per-patient qc.json, read as
    `run.result.QCRecord`, its "registration" a `RegistrationRecord`; one that does not fit, or holds no
    registration record, raises ValueError naming the file). SimpleITK runs on one
    thread in this process from here on (`device.repeatable_registration`), as in inference."""
    repeatable_registration()  # as inference registers: the same case gives the same transform
    cfg = PreprocessConfig.model_validate_json(cfg_json)
    pid = Path(folder).name
    target = Path(cache_dir) / f"{pid}.npz"
    meta_path = Path(cache_dir) / f"{pid}.json"
    key = cfg.model_dump(mode="json")
    old = json.loads(meta_path.read_text()) if meta_path.exists() else None
    # a record from before "mr_reason" was stored may have kept an MR whose registration failed its QC
    # (only inference left such an MR out then): it is prepared again, its registration reused
    if old is not None and target.exists() and _same(old.get("preprocess"), key) and "mr_reason" in old:
        # records from before "preprocess" was stored are taken as they are; the note is cheap to
        # read and is read again, so that an edited note never trains from a stale copy
        note = read_note(Path(folder))[0]
        if note != old.get("note"):
            old["note"] = note
            write_json(meta_path, old)
        return old
    reuse = None
    donors = [(old, meta_path)]
    if registration_from and (Path(registration_from) / f"{pid}.json").exists():
        path = Path(registration_from) / f"{pid}.json"
        donors.append((json.loads(path.read_text()), path))
    elif registration_from and (Path(registration_from) / pid / QC).exists():
        # a `medfusion run` output folder: its qc.json holds the registration it used; asking for it
        # by name is taken as saying its settings are the ones wanted
        registration = CaseResult.load_qc(Path(registration_from) / pid).registration
        if registration.mode is None:
            msg = f'{Path(registration_from) / pid / QC}: holds no registration record (no "mode")'
            raise ValueError(msg)
        if registration.mode == "auto":
            donors.append(
                ({"registration": registration, "preprocess": key}, Path(registration_from) / pid / QC)
            )
    donor = next(
        (
            (d, path)
            for d, path in donors
            if d is not None
            and d.get("registration")
            and d.get("preprocess")
            and _same(d["preprocess"].get("registration"), key["registration"], RegistrationConfig)
        ),
        None,
    )
    if donor is not None:
        reuse = _registration_of(donor[0]["registration"], donor[1])
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
        "mr_reason": ct.mr_reason,
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
    """Preprocess every case once into `cache_dir` (`workers` > 1: in parallel through Dask's process
    scheduler; else in this process), reusing what is cached (`_cache_one`).

    Args:
        folders: patient folders.
        labels_dir: the labels folder (`<patient_id>/segmentation.nii.gz`).
        cfg: the preprocessing (grid, intensities, registration).
        cache_dir: created if missing.
        workers: processes.
        registration_from: a cache or `medfusion run` output folder whose registrations may be reused.

    Returns:
        One record per folder, in order: the cached case's record, or {"patient_id", "error"} for a case
        that could not be prepared (unreadable input, no label map) — such cases are skipped, not fatal.
    """
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
    """One cached case: its arrays — "ct" float16 (C_ct, z, y, x) in [0, 1], "mr" float16 (C_mr, z, y,
    x) robust z-scores (0 where there is no MR), "target" uint8 (z, y, x) class codes, all on the model
    grid — and its record ("note", "has_mr", "registration", "preprocess", "seconds", …).

    Raises:
        FileNotFoundError: the case is not in the cache.
    """
    with np.load(cache_dir / f"{pid}.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in ("ct", "mr", "target")}
    meta = json.loads((cache_dir / f"{pid}.json").read_text())
    return {**arrays, **meta}
