"""The cohort runner: every patient folder, serially or on Dask, then the cohort files.

The cohort files (`summary.csv`, `run.json`, `failures.jsonl`) are rebuilt from the per-patient
folders after every run (`run/folders.py`), so a resumed or interrupted run describes the whole
output folder exactly as an uninterrupted one does.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import logging
import platform
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from medfusion import __version__
from medfusion.io.atomic import atomic_path, write_json, write_text
from medfusion.run.folders import is_done, output_patients, patient_row, record_failure
from medfusion.run.interrupt import Interrupted, check_stop, stop_on_signals
from medfusion.run.pipeline import RunOptions, process_case

log = logging.getLogger("medfusion.run")

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
