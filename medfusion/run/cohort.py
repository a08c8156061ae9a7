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
from medfusion.run.interrupt import Interrupted, check_stop, signal_name, stop_on_signals
from medfusion.run.pipeline import RunOptions, process_case
from medfusion.run.result import CaseResult

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


def _worker_run(folder: str, opts: RunOptions, threads: int) -> dict[str, Any]:
    """Dask task: each worker process loads the model once and keeps it, and runs torch on `threads`
    threads (a serial run's number, so that both give the same numbers)."""
    key = (opts.model, opts.device, opts.pipeline.infer.model_dump_json())
    if key not in _WORKER_PREDICTOR:
        import torch
        from distributed import get_worker

        torch.set_num_threads(threads)
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


def model_identity(model: str | Path | None) -> dict[str, Any]:
    """A package's identity for run records, read from its `model.json` (no weights loaded): the keys of
    `Predictor.describe()` — name, version, architecture, weights' SHA-256, whether it has a domain
    guard — plus `domain_sha256`, the SHA-256 of its domain block (which holds the guard's thresholds
    and its sidecar's SHA-256), so that a guard refitted in place (`medfusion domain fit`) is told apart.

    Raises:
        PackageError: `model` (None: the shipped package) holds no readable, valid `model.json`.
    """
    from medfusion.package import DEFAULT_PACKAGE, read_package_meta

    meta = read_package_meta(model or DEFAULT_PACKAGE)
    domain = meta.block("domain")
    return {
        "name": meta.name,
        "version": meta.version,
        "architecture": meta.architecture,
        "weights_sha256": meta.weights_sha256,
        "domain_guard": bool(domain),
        "domain_sha256": _sha256_json(domain) if domain else None,
    }


def config_record(opts: RunOptions) -> dict[str, Any]:
    """The pipeline settings that shape a patient's outputs: the pipeline config without the device
    (a run may resume on another device; each patient's scores.json records where it ran)."""
    cfg = opts.pipeline.model_dump(mode="json")
    cfg.get("infer", {}).pop("device", None)
    return cfg


def _sha256_json(value: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differences(old: dict[str, Any], new: dict[str, Any], *, common_only: bool = False) -> list[str]:
    """`key (old → new)` for each dotted key whose value differs; `common_only`: keys in both only (a
    record written before a key existed is not a difference)."""
    a, b = _flat(old), _flat(new)
    keys = sorted(a.keys() & b.keys()) if common_only else sorted(a.keys() | b.keys())
    return [f"{k} ({a.get(k)!r} → {b.get(k)!r})" for k in keys if a.get(k) != b.get(k)]


@dataclasses.dataclass
class CohortPlan:
    """What a run will do, decided (and refused) before any work: see `plan_cohort`."""

    folders: list[Path]  # the patients listed (after --only)
    todo: list[Path]  # those to run (all, or with --resume those without a complete result)
    resumed: list[str]  # listed patients skipped because their result is complete
    kept: list[str]  # patients in OUT from earlier runs that this run does not list
    model: dict[str, Any]  # `model_identity` of this run's package
    config: dict[str, Any]  # `config_record` of this run
    config_sha256: str
    previous_run: dict[str, Any]  # OUT/run.json as it was (empty when none)
    patient_config: dict[str, str | None]  # earlier patients → SHA-256 of the config that made them


def plan_cohort(folders: list[Path], opts: RunOptions) -> CohortPlan:
    """Check a run against its inputs and output folder and list what it will do; writes nothing.

    Raises ValueError (one line) for: `--only` ids that name no folder; an `--out` that overlaps an
    input patient folder; an output folder holding another run's patients without `resume` or
    `overwrite`; a `resume` whose earlier patients were made by another pipeline config or model
    (name, version, architecture, weights, domain guard), naming what differs.
    PackageError (a ValueError): the model package is unreadable.
    """
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
    foreign = [f.name for f in folders if (opts.out / f.name).exists() and f.name not in previous]
    if foreign:  # a patient's folder there that medfusion did not write is never replaced
        msg = (
            f"--out {opts.out} already holds {len(foreign)} folder(s) named like the patients "
            f"({', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''}) that are not medfusion "
            "outputs; choose another output folder"
        )
        raise ValueError(msg)
    if previous and not (opts.resume or opts.overwrite):
        msg = (
            f"{opts.out} already holds the outputs of {len(previous)} patient(s) from an earlier run; "
            "pass --resume to continue it or --overwrite to replace the patients listed (the others are kept)"
        )
        raise ValueError(msg)
    model = model_identity(opts.model)
    config = config_record(opts)
    prev_run = _read_run_json(opts.out)
    if opts.resume and previous:
        _refuse_another_setup(opts.out, previous, prev_run, model, config)
    sessions = prev_run.get("sessions") or []
    last = sessions[-1].get("config_sha256") if sessions else None
    if last is None and "config" in prev_run:  # a run.json from before sessions were recorded
        cfg = dict(prev_run["config"])
        cfg["infer"] = {k: v for k, v in cfg.get("infer", {}).items() if k != "device"}
        last = _sha256_json(cfg)
    recorded = prev_run.get("patient_config") or {}
    # a patient without a record was made by the last session that started (one killed before its end)
    patient_config = {pid: recorded.get(pid, last) for pid in previous}
    todo = [f for f in folders if not (opts.resume and is_done(opts.out, f.name))]
    listed = {f.name for f in folders}
    return CohortPlan(
        folders=folders,
        todo=todo,
        resumed=[f.name for f in folders if f not in todo],
        kept=sorted(p for p in previous if p not in listed),
        model=model,
        config=config,
        config_sha256=_sha256_json(config),
        previous_run=prev_run,
        patient_config=patient_config,
    )


def _read_run_json(out: Path) -> dict[str, Any]:
    try:
        run: dict[str, Any] = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return run


def _patient_model(out: Path, pid: str) -> dict[str, Any] | None:
    """The "model" record of a kept patient's scores.json as written (keys it holds only), None when
    the file has none or cannot be read (`CaseResult.load_model`)."""
    try:
        model = CaseResult.load_model(out / pid)
    except ValueError:
        return None
    return model.model_dump(mode="json", exclude_unset=True) if model is not None else None


def _refuse_another_setup(
    out: Path, previous: list[str], prev_run: dict[str, Any], model: dict[str, Any], config: dict[str, Any]
) -> None:
    """--resume continues the same run: the config and model must be those of the run it continues."""
    what: list[str] = []
    if "config" in prev_run:
        old = dict(prev_run["config"])
        old["infer"] = {k: v for k, v in old.get("infer", {}).items() if k != "device"}
        diff = differences(old, config)
        if diff:
            what.append(
                "config " + ", ".join(diff[:3]) + (f" and {len(diff) - 3} more" if len(diff) > 3 else "")
            )
    if prev_run.get("model"):
        diff = differences(prev_run["model"], model, common_only=True)
        if diff:
            what.append("model " + ", ".join(diff))
    marked = set(prev_run.get("from_another_model_or_config") or {})
    others: dict[str, list[str]] = {}
    for pid in previous:
        if pid in marked:
            continue  # kept on purpose by an --overwrite, and recorded as such
        old_model = _patient_model(out, pid)
        for d in differences(old_model, model, common_only=True) if old_model else []:
            others.setdefault(d, []).append(pid)
    for d, pids in others.items():
        if not any(d in w for w in what):
            what.append(
                f"model {d} in {len(pids)} patient(s) ({', '.join(pids[:3])}{' …' if len(pids) > 3 else ''})"
            )
    if what:
        msg = (
            f"--resume: {out} was made with another " + "; ".join(what) + "; resume with the same "
            "settings, pass --overwrite to replace the listed patients (the others are kept and marked), "
            "or choose another --out"
        )
        raise ValueError(msg)


def run_cohort(
    folders: list[Path], opts: RunOptions, progress: Any = None, *, plan: CohortPlan | None = None
) -> dict[str, Any]:
    """Run every patient folder; write summary.csv, run.json and failures.jsonl. Returns run.json's content.

    `plan` is `plan_cohort(folders, opts)` when the caller made it already (to refuse before showing
    anything); otherwise it is made here, with its refusals (ValueError, before any work). A
    SIGINT/SIGTERM stops the run cleanly: the cohort files are still rebuilt and run.json's
    "interrupted" names the signal (its "exit_code" is 130 or 143; 0 on success, 1 with failures).
    `progress(row)` is called after each patient.
    """
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    plan = plan or plan_cohort(folders, opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    for stale in opts.out.glob(".tmp-*"):  # left by a run that was killed
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    threads = _torch_threads()
    session: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "finished": None,  # stays None when the session is killed (SIGKILL, power loss)
        "seconds": None,
        "config_sha256": plan.config_sha256,
        "model_version": plan.model.get("version"),
        "device": opts.device,
        "workers": opts.workers,
        "torch_threads": threads,
        "listed": len(plan.folders),
        "processed": 0,
        "resumed": len(plan.resumed),
        "interrupted": None,
        "exit_code": None,
    }
    rows: list[dict[str, Any]] = []
    interrupted: Interrupted | None = None
    try:
        with stop_on_signals():
            write_cohort_files(opts, plan, session, rows)  # a record of this session even if it is killed
            if opts.workers > 1 or opts.cluster:
                _run_dask(plan.todo, opts, rows, progress, threads)
            else:
                predictor = _predictor(opts)
                for f in plan.todo:
                    rows.append(process_case(f, opts, predictor))
                    if progress:
                        progress(rows[-1])
    except Interrupted as exc:
        interrupted = exc
    session["seconds"] = round(time.perf_counter() - t0, 2)
    session["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    session["interrupted"] = None if interrupted is None else signal_name(interrupted.signum)
    return write_cohort_files(opts, plan, session, rows, interrupted=interrupted)


def _torch_threads() -> int:
    """The intra-op threads of a serial run in this process; Dask workers are given the same number,
    because torch's CPU reductions split by thread count (u_malignant moved in the 8th decimal
    between 1 and 4 threads on one sample patient), and a run's numbers must not depend on --workers."""
    import torch

    return int(torch.get_num_threads())


def write_cohort_files(
    opts: RunOptions,
    plan: CohortPlan,
    session: dict[str, Any],
    rows: list[dict[str, Any]],
    interrupted: Interrupted | None = None,
) -> dict[str, Any]:
    """Rebuild summary.csv, failures.jsonl and run.json from every patient folder in `opts.out`.

    run.json keeps the history of the folder: "started" is its first session's start, "sessions" lists
    every session (this one last; a session killed before its end has "finished": null), and
    "from_another_model_or_config" names the patients (kept by an --overwrite) that another model or
    pipeline config made. `rows` are the patients this session ran.
    """
    all_rows = [patient_row(opts.out / pid) for pid in output_patients(opts.out)]
    _write_summary(opts.out / "summary.csv", all_rows)
    failures = [
        {"patient_id": r["patient_id"], "stage": r.get("stage"), "error": r.get("error")}
        for r in all_rows
        if r["status"] == "failed"
    ]
    write_text(opts.out / "failures.jsonl", "".join(json.dumps(f) + "\n" for f in failures))
    processed = [r["patient_id"] for r in rows]
    session["processed"] = len(processed)
    exit_code = interrupted.exit_code if interrupted else (1 if failures else 0)
    if session["finished"] is not None:
        session["exit_code"] = exit_code
    prev = plan.previous_run
    sessions = [*(prev.get("sessions") or _legacy_session(prev)), session]
    present = {r["patient_id"] for r in all_rows}
    patient_config = {p: c for p, c in plan.patient_config.items() if p in present}
    patient_config.update(dict.fromkeys(processed, plan.config_sha256))
    other_configs = dict(prev.get("other_configs") or {})
    if prev.get("config") and prev.get("config_sha256"):
        other_configs[prev["config_sha256"]] = prev["config"]
    mixed = _from_another_setup(opts.out, plan, patient_config, set(processed))
    used = {c for p, c in patient_config.items() if p in mixed}
    stage_keys = sorted({k for r in all_rows for k in r if k.startswith("t_")})
    run = {
        "medfusion_version": __version__,
        "started": sessions[0]["started"],
        "finished": session["finished"],
        "python": platform.python_version(),
        "versions": _versions(),
        "config": opts.pipeline.model_dump(),
        "config_sha256": plan.config_sha256,
        "model": plan.model,
        "device": opts.device,
        "devices_used": sorted({str(r["device"]) for r in all_rows if r.get("device")}),
        "workers": opts.workers,
        "patients": len(all_rows),
        "requested": len(plan.folders),
        "processed": len(processed),
        "resumed": plan.resumed,
        "kept_from_earlier_runs": plan.kept,
        "from_another_model_or_config": mixed,
        "interrupted": None if interrupted is None else signal_name(interrupted.signum),
        "exit_code": exit_code if session["finished"] is not None else None,
        "failures": failures,
        "seconds_total": round(sum(s.get("seconds") or 0.0 for s in sessions), 2),
        "sessions": sessions,
        "patient_config": patient_config,
        "other_configs": {k: v for k, v in other_configs.items() if k in used},
        "median_stage_seconds": {
            k[2:]: float(np.median([r[k] for r in all_rows if k in r])) for k in stage_keys
        },
    }
    write_json(opts.out / "run.json", run)
    return run


def _legacy_session(prev: dict[str, Any]) -> list[dict[str, Any]]:
    """The one session a run.json written before sessions were recorded stands for."""
    if not prev.get("started"):
        return []
    return [
        {
            "started": prev["started"],
            "finished": prev.get("finished"),
            "seconds": prev.get("seconds_total"),
            "model_version": (prev.get("model") or {}).get("version"),
            "processed": prev.get("processed"),
            "interrupted": prev.get("interrupted"),
            "exit_code": prev.get("exit_code"),
        }
    ]


def _from_another_setup(
    out: Path, plan: CohortPlan, patient_config: dict[str, str | None], fresh: set[str]
) -> dict[str, str]:
    """Patients in `out` made by another model (their scores.json "model") or another pipeline config
    (`patient_config`) than this run's: patient id → what differs."""
    mixed: dict[str, str] = {}
    for pid, sha in sorted(patient_config.items()):
        if pid in fresh:
            continue
        what = []
        if sha is not None and sha != plan.config_sha256:
            what.append(f"config {sha[:12]}")
        old_model = _patient_model(out, pid)
        if old_model:
            what += [f"model {d}" for d in differences(old_model, plan.model, common_only=True)]
        if what:
            mixed[pid] = "; ".join(what)
    return mixed


def _run_dask(
    todo: list[Path], opts: RunOptions, rows: list[dict[str, Any]], progress: Any, threads: int
) -> None:
    """The patients on a Dask LocalCluster (or `opts.cluster`), each worker on `threads` torch threads;
    a patient whose worker died is run again up to `opts.retries` times, then recorded as failed. The
    cluster is always closed."""
    import dask
    from dask.distributed import Client, LocalCluster

    quiet = logging.getLogger().getEffectiveLevel() > logging.DEBUG  # not --debug
    settings: dict[str, Any] = {
        # the scheduler's own re-runs off: a worker's death surfaces here at once, counted by --retries
        "distributed.scheduler.allowed-failures": 0,
    }
    if quiet:
        # Dask logs the scheduler's and workers' start-up and shut-down at INFO, with a traceback for
        # each comm it closes at the end; the workers inherit this config
        settings["logging"] = {"distributed": "error", "distributed.nanny": "error"}
        for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker"):
            logging.getLogger(name).setLevel(logging.ERROR)
    cluster = None
    try:
        with dask.config.set(settings):
            if not opts.cluster:
                cluster = LocalCluster(
                    n_workers=opts.workers,
                    threads_per_worker=1,
                    processes=True,
                    # None does not switch the scheduler's HTTP server off (dask/distributed#8136); a free
                    # port on the loopback keeps it off the network and out of another cluster's way
                    dashboard_address="127.0.0.1:0",
                    silence_logs=logging.ERROR if quiet else logging.WARNING,
                )
            with Client(opts.cluster or cluster) as client:
                _gather(client, todo, opts, rows, progress, threads)
    finally:
        if cluster is not None:
            cluster.close()


def _gather(
    client: Any, todo: list[Path], opts: RunOptions, rows: list[dict[str, Any]], progress: Any, threads: int
) -> None:
    from dask.distributed import as_completed

    futs = {client.submit(_worker_run, str(f), opts, threads, pure=False): f for f in todo}
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
                again = client.submit(_worker_run, str(folder), opts, threads, pure=False)
                futs[again] = folder
                pending.add(again)
                continue
            row = record_failure(
                opts.out, folder.name, "worker", f"{reason} (after {attempts[folder]} attempts)"
            )
        rows.append(row)
        if progress:
            progress(row)


def _write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """summary.csv: one row per patient; the columns of the scored rows first, in their order, then
    those only failed or unreadable rows have, so the layout does not depend on which patient is first."""
    cols: list[str] = []
    for r in sorted(rows, key=lambda r: r.get("status") != "ok"):
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
