"""The per-patient pipeline (load → register → infer → write → report) and the cohort runner.

Each patient's outputs are written into a hidden folder and renamed into place when complete, so
`OUT/<patient_id>/` either holds a whole result or does not exist. Each output is written on its
own: a writer that fails (a DICOM SEG from a de-identified source, a report) is recorded in
`qc.json` ("outputs") and the others still land. A failed patient gets `OUT/<patient_id>/error.json`
and the run goes on. The cohort files (`summary.csv`, `run.json`, `failures.jsonl`) are rebuilt
from the per-patient files after every run, so a resumed or interrupted run describes the whole
output folder exactly as an uninterrupted one does.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import platform
import shutil
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medfusion import __version__
from medfusion.config import PipelineConfig, PreprocessConfig, RegistrationConfig
from medfusion.io.atomic import atomic_path, write_json, write_text
from medfusion.io.case import load_case
from medfusion.io.errors import InputError
from medfusion.io.nifti import write_nifti, write_probabilities
from medfusion.io.volume import Volume
from medfusion.models.package import preprocess_config
from medfusion.run.interrupt import Interrupted, check_stop, stop_on_signals

log = logging.getLogger("medfusion.run")


@dataclasses.dataclass
class RunOptions:
    """What `run_cohort` does: where to, with which pipeline, model, device and scale-out.

    `resume` skips patients whose outputs are complete; `overwrite` replaces the listed patients in
    an output folder that holds another run (without either, such a folder is refused). `retries`:
    how many times a patient whose Dask worker died is run again elsewhere.
    """

    out: Path
    pipeline: PipelineConfig
    model: str | None = None
    device: str = "auto"
    workers: int = 0
    cluster: str | None = None
    resume: bool = False
    only: list[str] | None = None
    modality_map: dict[str, str] | None = None
    overwrite: bool = False
    retries: int = 1


# --- One patient ---


def _provenance(case: Any) -> dict[str, Any]:
    def vol_info(v: Any) -> dict[str, Any]:
        if v is None:
            return {}
        info = {
            "modality": v.modality,
            "format": v.meta.get("format"),
            "series_description": v.meta.get("series_description", ""),
        }
        if v.meta.get("format") == "dicom":
            info["series_uid"] = v.meta.get("series_uid")
            info["study_uid"] = v.meta.get("study_uid")
        else:
            src = Path(v.meta["source"])
            info["file"] = src.name
            info["sha256"] = hashlib.sha256(src.read_bytes()).hexdigest()
        return info

    return {
        "ct": vol_info(case.ct),
        "mr": [vol_info(m) for m in case.mr],
        "note": case.note_path.name if case.note_path else None,
        "study_date": case.ct.meta.get("study_date", "") if case.ct else "",
    }


def run_preprocess_config(pipeline: PipelineConfig, meta: dict[str, Any]) -> PreprocessConfig:
    """The preprocessing a run uses: the pipeline's own if it gives one, otherwise the package's, with
    the registration settings the pipeline asks for and its consistency-check switch."""
    if pipeline.preprocess is not None:
        cfg = pipeline.preprocess.model_copy(deep=True)
    else:
        cfg = preprocess_config(meta)
        if pipeline.registration == "library":
            stored = cfg.registration
            cfg.registration = RegistrationConfig(mode=stored.mode, transform_file=stored.transform_file)
    cfg.registration.consistency_check = pipeline.registration_consistency_check
    return cfg


def process_case(folder: Path, opts: RunOptions, predictor: Any) -> dict[str, Any]:
    """Run one patient; returns its summary row. Raises nothing for bad input: it writes error.json.

    A stop the user asked for (`Interrupted`) propagates instead, with the half-made folder removed.
    """
    from medfusion.preprocess.prepare import prepare_case
    from medfusion.run.measure import measure

    pid = folder.name
    final = opts.out / pid
    t: dict[str, float] = {}
    stage = "load"
    tmp = opts.out / f".tmp-{pid}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        case = load_case(folder, opts.modality_map)
        if case.ct is None:
            detail = "; ".join(str(e) for e in case.errors[:3])
            raise InputError(folder, "no usable CT volume" + (f" ({detail})" if detail else ""))
        t["load"] = time.perf_counter() - t0
        stage = "register"
        cfg = run_preprocess_config(opts.pipeline, predictor.meta)
        tensors = prepare_case(case, cfg)
        t["register"] = tensors.timings.get("register", 0.0)
        t["resample"] = tensors.timings.get("resample", 0.0)
        reg = tensors.registration
        mr_used = tensors.has_mr
        if reg is not None and not reg.passed:
            tensors.has_mr = False  # a failed registration never reaches the model: MR is left out
            mr_used = False
        stage = "infer"
        t1 = time.perf_counter()
        pred = predictor.predict(tensors)
        domain = predictor.assess(case, pred, mr_used)  # models/domain.py: before anyone reads a score
        t["infer"] = time.perf_counter() - t1
        stage = "write"
        t2 = time.perf_counter()
        class_names = predictor.class_names
        ct: Volume = case.ct
        seg = ct.with_array(pred.labels_ct.astype(np.int16), "SEG")
        outputs = _Outputs(pid)
        outputs.attempt("segmentation.nii.gz", lambda: write_nifti(seg, tmp / "segmentation.nii.gz"))
        outputs.attempt(
            "segmentation.json",
            lambda: write_json(
                tmp / "segmentation.json",
                {
                    "labels": {str(k): n for k, n in enumerate(class_names)},
                    "geometry": "the CT's own grid (same shape and affine)",
                    **(
                        {"probabilities": "probabilities.nii.gz: one volume per label above, in that order"}
                        if opts.pipeline.outputs.probabilities
                        else {}
                    ),
                },
            ),
        )
        if opts.pipeline.outputs.probabilities:
            outputs.attempt(
                "probabilities.nii.gz",
                lambda: write_probabilities(pred.probs_ct, ct, tmp / "probabilities.nii.gz", class_names),
            )
        if opts.pipeline.outputs.dicom_seg and ct.meta.get("format") == "dicom":
            from medfusion.io.seg import write_dicom_seg

            def _seg() -> bool:
                res = write_dicom_seg(
                    seg,
                    ct,
                    class_names,
                    tmp / "segmentation.dcm",
                    model_name=str(predictor.meta.get("name")),
                    model_version=str(predictor.meta.get("version")),
                )
                outputs.notes += [f"segmentation.dcm: {n}" for n in res.notes]
                return res.path is not None

            outputs.attempt("segmentation.dcm", _seg)
        mr_grid = tensors.mr_in_ct if mr_used else None  # on the CT's grid
        meas = measure(seg, class_names, ct=case.ct, mr=mr_grid)
        # out of the model's domain: no answer ("not assessed"); the probabilities stay for research use
        predicted = {n: bool(p >= 0.5) for n, p in pred.scores.items()} if domain.in_domain else None
        qc = {
            "patient_id": pid,
            "inputs": {
                "ct": case.ct.summary(),
                "mr": [m.summary() for m in case.mr],
                "note_chars": len(case.note),
                "unreadable_files": [str(e) for e in case.errors],
                "skipped_objects": [{"path": p, "why": w} for p, w in case.skipped],
                "choices": case.choices,
            },
            "registration": {
                **(reg.to_json() if reg is not None else {"mode": "none", "reason": "no MR volume"}),
                "settings_from": "pipeline"
                if opts.pipeline.preprocess is not None
                else opts.pipeline.registration,
                "settings": cfg.registration.model_dump(mode="json"),
            },
            "mr_used_by_model": mr_used,
            # input warnings (tilt corrected, NaN replaced, orientation unknown, …) make it "warn"
            "verdict": "pass"
            if (reg is None or reg.passed)
            and not case.errors
            and not any(v.warnings for v in [case.ct, *case.mr])
            else ("fail" if reg is not None and not reg.passed else "warn"),
        }
        scores = {
            "patient_id": pid,
            "probabilities": pred.scores,
            "predicted": predicted,
            "threshold": 0.5,
            "uncertainty": pred.uncertainty,
            "domain": domain.to_json(),
            "measurements": meas,
            **({"score_features": pred.score_features} if pred.score_features else {}),
            "model": predictor.describe(),
            # how the network ran (the pipeline's "auto" and unset fields resolved on this machine)
            "inference": {
                "device": str(predictor.device),
                "amp": bool(predictor.amp),
                "windows_per_call": int(predictor.sw_batch_size),
            },
            "seed": {"inference": predictor.seed, "registration": cfg.registration.seed},
            "inputs": _provenance(case),
            "qc_verdict": qc["verdict"],
            "timings_s": {k: round(v, 3) for k, v in t.items()},
        }
        if "segmentation.dcm" in outputs.written:  # the SR's measurement groups reference the SEG
            from medfusion.io.sr import write_dicom_sr

            outputs.attempt(
                "segmentation_sr.dcm",
                lambda: write_dicom_sr(
                    tmp / "segmentation.dcm",
                    ct,
                    class_names,
                    scores,
                    tmp / "segmentation_sr.dcm",
                    model_name=str(predictor.meta.get("name")),
                    model_version=str(predictor.meta.get("version")),
                ),
            )
        t["write"] = time.perf_counter() - t2
        if opts.pipeline.outputs.report:
            stage = "report"
            t3 = time.perf_counter()
            from medfusion.report.pdf import write_report

            qc["outputs"] = outputs.to_json()  # what the report can say about the other outputs
            outputs.attempt(
                "report.pdf",
                lambda: write_report(tmp / "report.pdf", case, tensors, pred, scores, qc, class_names),
            )
            if "report.pdf" in outputs.written and ct.meta.get("format") == "dicom":
                from medfusion.io.docpdf import write_encapsulated_pdf

                outputs.attempt(
                    "report.dcm", lambda: write_encapsulated_pdf(tmp / "report.pdf", ct, tmp / "report.dcm")
                )
            t["report"] = time.perf_counter() - t3
        stage = "write"
        qc["outputs"] = outputs.to_json()
        write_json(tmp / "qc.json", qc)
        scores["timings_s"] = {k: round(v, 3) for k, v in t.items()}
        write_json(tmp / "scores.json", scores)  # last: its presence marks the patient done
        _publish(tmp, final)
        return patient_row(final)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        check_stop(exc)  # the user's stop surfacing as a library's error is not the patient's failure
        reason = str(exc) if isinstance(exc, InputError | ValueError) else f"{type(exc).__name__}: {exc}"
        log.debug("patient %s failed", pid, exc_info=True)
        return record_failure(opts.out, pid, stage, reason, traceback.format_exc(limit=6))
    except BaseException:  # Interrupted, KeyboardInterrupt: leave no half-made folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _Outputs:
    """The per-patient writers' record: each output is attempted on its own, a failure is kept."""

    def __init__(self, pid: str) -> None:
        self.pid = pid
        self.written: list[str] = []
        self.failed: dict[str, str] = {}
        self.notes: list[str] = []

    def attempt(self, name: str, write: Callable[[], object]) -> None:
        """Run one writer; on an error keep its reason and go on (a stop request still stops).
        A writer returning False chose not to write (its note says why)."""
        try:
            if write() is not False:
                self.written.append(name)
        except Exception as exc:
            check_stop(exc)
            reason = str(exc) if isinstance(exc, InputError | ValueError) else f"{type(exc).__name__}: {exc}"
            log.warning("patient %s: %s not written (%s)", self.pid, name, reason.splitlines()[0])
            log.debug("writer %s failed", name, exc_info=True)
            self.failed[name] = reason.splitlines()[0] if reason else type(exc).__name__

    def to_json(self) -> dict[str, Any]:
        return {"written": list(self.written), "failed": dict(self.failed), "notes": list(self.notes)}


def record_failure(out: Path, pid: str, stage: str, reason: str, trace: str = "") -> dict[str, Any]:
    """Write `OUT/<pid>/error.json` (replacing whatever was there) and return the patient's row."""
    tmp = out / f".tmp-{pid}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_json(
        tmp / "error.json",
        {
            "patient_id": pid,
            "stage": stage,
            "error": reason.splitlines()[0] if reason else "",
            "traceback": trace,
        },
    )
    _publish(tmp, out / pid)
    return patient_row(out / pid)


def patient_row(folder: Path) -> dict[str, Any]:
    """A patient's summary.csv row, read back from its output folder (scores.json, qc.json or
    error.json), so that a resumed patient's row is the same as a freshly run one's."""
    pid = folder.name
    err = folder / "error.json"
    if err.exists() and not (folder / "scores.json").exists():
        e = json.loads(err.read_text())
        return {
            "patient_id": pid,
            "status": "failed",
            "qc_verdict": "",
            "error": e.get("error", ""),
            "stage": e.get("stage", ""),
        }
    sc = json.loads((folder / "scores.json").read_text())
    qc_path = folder / "qc.json"
    qc = json.loads(qc_path.read_text()) if qc_path.exists() else {}
    meas = sc.get("measurements", {})
    row: dict[str, Any] = {
        "patient_id": pid,
        "status": "ok",
        "qc_verdict": sc.get("qc_verdict", ""),
        "device": sc.get("inference", {}).get("device", ""),
    }
    row.update({f"p_{k}": round(v, 4) for k, v in sc.get("probabilities", {}).items()})
    row["in_domain"] = sc.get("domain", {}).get("in_domain", "")
    row.update({f"pred_{k}": int(v) for k, v in (sc.get("predicted") or {}).items()})
    row.update({f"u_{k}": round(v, 4) for k, v in sc.get("uncertainty", {}).items()})
    row.update({f"vol_{k}_ml": v for k, v in meas.get("volumes_ml", {}).items()})
    row["lesion_count"] = meas.get("lesion_count")
    row["largest_diameter_mm"] = meas.get("largest_diameter_mm")
    row["outputs_failed"] = ";".join(qc.get("outputs", {}).get("failed", {}))
    row.update({f"t_{k}": round(v, 2) for k, v in sc.get("timings_s", {}).items()})
    return row


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished patient folder into place; an earlier output there is replaced, anything
    else (a folder medfusion did not write, e.g. the patient's own inputs) is never deleted."""
    if final.exists():
        if not any((final / name).exists() for name in ("scores.json", "error.json", "qc.json")):
            msg = f"{final} exists and is not a medfusion output; refusing to replace it"
            raise OSError(msg)
        shutil.rmtree(final)
    tmp.rename(final)


def is_done(out: Path, pid: str) -> bool:
    """True when `OUT/<pid>/` holds a complete result (scores.json is written last)."""
    return (out / pid / "scores.json").exists()


# --- Cohort ---

_WORKER_PREDICTOR: dict[tuple[Any, ...], Any] = {}


def worker_device(requested: str, worker_name: object, n_gpus: int) -> str:
    """A cohort worker's device: with several GPUs, `auto`/`cuda` workers are spread over them by worker
    name (LocalCluster names its workers 0, 1, …), so that N workers do not all load GPU 0."""
    if requested not in ("auto", "cuda") or n_gpus <= 1:
        return requested
    try:
        index = int(str(worker_name))
    except ValueError:
        index = zlib.crc32(str(worker_name).encode())
    return f"cuda:{index % n_gpus}"


def _worker_run(folder: str, opts: RunOptions) -> dict[str, Any]:
    """Dask task: each worker process loads the model once and keeps it."""
    key = (opts.model, opts.device, opts.pipeline.infer.model_dump_json())
    if key not in _WORKER_PREDICTOR:
        import torch
        from distributed import get_worker

        torch.set_num_threads(1)
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        device = worker_device(opts.device, get_worker().name, n_gpus)
        _WORKER_PREDICTOR[key] = _predictor(dataclasses.replace(opts, device=device))
    return process_case(Path(folder), opts, _WORKER_PREDICTOR[key])


def _predictor(opts: RunOptions) -> Any:  # Predictor (torch is imported lazily)
    from medfusion.infer.predictor import Predictor

    infer = opts.pipeline.infer
    return Predictor(
        opts.model,
        opts.device,
        tta=infer.tta,
        mc_samples=infer.mc_samples,
        amp=infer.amp,
        sliding_window=infer.sliding_window,
        lesions_need_core=infer.lesions_need_core,
        window_overlap=infer.window_overlap,
        sw_batch_size=infer.sw_batch_size,
    )


def run_cohort(folders: list[Path], opts: RunOptions, progress: Any = None) -> dict[str, Any]:
    """Run every patient folder; write summary.csv, run.json and failures.jsonl. Returns run.json's content.

    Refuses (ValueError, before any work) `--only` ids that name no folder, and an output folder that
    holds another run's patients unless `resume` or `overwrite` is set. A SIGINT/SIGTERM stops the
    run cleanly: the cohort files are still rebuilt and run.json's "interrupted" names the signal
    (its "exit_code" is 130 or 143).
    """
    started = time.perf_counter()
    if opts.only:
        names = {f.name for f in folders}
        unknown = [p for p in opts.only if p not in names]
        if unknown:
            msg = (
                f"--only: no patient folder named {', '.join(unknown)} (found {len(names)} patient folder(s))"
            )
            raise ValueError(msg)
        wanted = set(opts.only)
        folders = [f for f in folders if f.name in wanted]
    out = opts.out.resolve()
    for f in folders:
        src = f.resolve()
        if out == src or out == src.parent or src in out.parents:  # OUT/<id> would be an input
            msg = (
                f"--out {opts.out} overlaps the input folder {f}: outputs would be written over the "
                "patient's own files; choose an output folder outside the inputs"
            )
            raise ValueError(msg)
    previous = output_patients(opts.out)
    if previous and not (opts.resume or opts.overwrite):
        msg = (
            f"{opts.out} already holds the outputs of {len(previous)} patient(s) from another run; "
            "pass --resume to continue it or --overwrite to replace the patients listed (the others are kept)"
        )
        raise ValueError(msg)
    opts.out.mkdir(parents=True, exist_ok=True)
    for stale in opts.out.glob(".tmp-*"):  # left by a run that was killed
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    todo = [f for f in folders if not (opts.resume and is_done(opts.out, f.name))]
    skipped = [f.name for f in folders if f not in todo]
    listed = {f.name for f in folders}
    kept = sorted(p for p in previous if p not in listed)
    rows: list[dict[str, Any]] = []
    model_info: dict[str, Any] = {}
    interrupted: Interrupted | None = None
    try:
        with stop_on_signals():
            if opts.workers > 1 or opts.cluster:
                model_info = _run_dask(todo, opts, rows, progress)
            else:
                predictor = _predictor(opts)
                model_info = predictor.describe()
                for f in todo:
                    rows.append(process_case(f, opts, predictor))
                    if progress:
                        progress(rows[-1])
    except Interrupted as exc:
        interrupted = exc
    return write_cohort_files(
        opts,
        model_info,
        requested=len(folders),
        processed=[r["patient_id"] for r in rows],
        resumed=skipped,
        kept=kept,
        seconds=time.perf_counter() - started,
        interrupted=interrupted,
    )


def output_patients(out: Path) -> list[str]:
    """The patient ids with outputs in `out` (a folder holding scores.json or error.json)."""
    if not out.is_dir():
        return []
    return sorted(
        p.name
        for p in out.iterdir()
        if p.is_dir()
        and not p.name.startswith(".")
        and ((p / "scores.json").exists() or (p / "error.json").exists())
    )


def write_cohort_files(
    opts: RunOptions,
    model_info: dict[str, Any],
    *,
    requested: int,
    processed: list[str],
    resumed: list[str],
    kept: list[str],
    seconds: float,
    interrupted: Interrupted | None = None,
) -> dict[str, Any]:
    """Rebuild summary.csv, failures.jsonl and run.json from every patient folder in `opts.out`."""
    rows = [patient_row(opts.out / pid) for pid in output_patients(opts.out)]
    if not model_info:
        model_info = next(
            (
                json.loads((opts.out / r["patient_id"] / "scores.json").read_text())["model"]
                for r in rows
                if r["status"] == "ok"
            ),
            {},
        )
    _write_summary(opts.out / "summary.csv", rows)
    failures = [
        {"patient_id": r["patient_id"], "stage": r.get("stage"), "error": r.get("error")}
        for r in rows
        if r["status"] == "failed"
    ]
    write_text(opts.out / "failures.jsonl", "".join(json.dumps(f) + "\n" for f in failures))
    stage_keys = sorted({k for r in rows for k in r if k.startswith("t_")})
    finished = dt.datetime.now(dt.timezone.utc)
    run = {
        "medfusion_version": __version__,
        "started": (finished - dt.timedelta(seconds=seconds)).isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": _versions(),
        "config": opts.pipeline.model_dump(),
        "model": model_info,
        "device": opts.device,
        "devices_used": sorted({str(r["device"]) for r in rows if r.get("device")}),
        "workers": opts.workers,
        "patients": len(rows),
        "requested": requested,
        "processed": len(processed),
        "resumed": resumed,
        "kept_from_earlier_runs": kept,
        "interrupted": None if interrupted is None else signal_name(interrupted.signum),
        "exit_code": None if interrupted is None else interrupted.exit_code,
        "failures": failures,
        "seconds_total": round(seconds, 2),
        "median_stage_seconds": {k[2:]: float(np.median([r[k] for r in rows if k in r])) for k in stage_keys},
    }
    write_json(opts.out / "run.json", run)
    return run


def signal_name(signum: int) -> str:
    """SIGINT, SIGTERM, …"""
    import signal

    return signal.Signals(signum).name


def _run_dask(
    todo: list[Path], opts: RunOptions, rows: list[dict[str, Any]], progress: Any
) -> dict[str, Any]:
    """The patients on a Dask LocalCluster (or `opts.cluster`); a patient whose worker died is run
    again up to `opts.retries` times, then recorded as failed. The cluster is always closed."""
    import dask
    from dask.distributed import Client, LocalCluster, as_completed

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # not --debug
        # Dask's logging config (applied on import) prints the scheduler's start-up and shut-down at
        # INFO, with a traceback for each comm it closes at the end: keep it to warnings
        logging.getLogger("distributed").setLevel(logging.WARNING)
    cluster = None
    try:
        if not opts.cluster:
            # the scheduler's own re-runs off: a worker's death surfaces here at once, counted by --retries
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                cluster = LocalCluster(
                    n_workers=opts.workers,
                    threads_per_worker=1,
                    processes=True,
                    # None does not switch the scheduler's HTTP server off (dask/distributed#8136); a free
                    # port on the loopback keeps it off the network and out of another cluster's way
                    dashboard_address="127.0.0.1:0",
                )
        with Client(opts.cluster or cluster) as client:
            futs = {client.submit(_worker_run, str(f), opts, pure=False): f for f in todo}
            attempts = dict.fromkeys(futs.values(), 0)
            pending = as_completed(list(futs))
            for fut in pending:
                folder = futs.pop(fut)
                try:
                    row = fut.result()
                except Interrupted:
                    raise
                except Exception as exc:
                    check_stop(exc)
                    attempts[folder] += 1
                    reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    if attempts[folder] <= opts.retries:
                        log.warning(
                            "patient %s: %s; running it again (%d of %d)",
                            folder.name,
                            reason,
                            attempts[folder],
                            opts.retries,
                        )
                        again = client.submit(_worker_run, str(folder), opts, pure=False)
                        futs[again] = folder
                        pending.add(again)
                        continue
                    row = record_failure(
                        opts.out, folder.name, "worker", f"{reason} (after {attempts[folder]} attempts)"
                    )
                rows.append(row)
                if progress:
                    progress(row)
    finally:
        if cluster is not None:
            cluster.close()
    from medfusion.models.package import DEFAULT_PACKAGE, read_meta

    meta = read_meta(opts.model or DEFAULT_PACKAGE)
    return {
        "name": meta.get("name"),
        "version": meta.get("version"),
        "weights_sha256": meta.get("weights_sha256"),
    }


def _write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "monai", "SimpleITK", "pydicom", "nibabel", "highdicom", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
