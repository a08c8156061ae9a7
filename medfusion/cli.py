"""The `medfusion` command: one entry point with sub-commands."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand

from medfusion.io.errors import InputError


class PlainHelpCommand(TyperCommand):
    """A sub-command whose help names values by a metavar (FOLDER..., PATH, N, TEXT) instead of typer's
    type markers (`<path>`, `<list[Path]>`, `{FOLDER}...`), which read as syntax in plain text."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        params: list[Any] = self.params  # typer's TyperOption/TyperArgument
        for param in params:
            if param.param_type_name == "option" and param.metavar is None and not param.is_flag:
                param.metavar = _metavar(param.type_descriptor)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """The usage line's pieces: "[OPTIONS]", then each argument by its metavar (click's hook)."""
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [_argument_label(p) for p in self.get_params(ctx) if p.param_type_name == "argument"]

    def format_options(self, ctx: Any, formatter: Any) -> None:
        """The help's "Arguments" and "Options" sections as plain definition lists (click's hook)."""
        args, opts = [], []
        params: list[Any] = self.get_params(ctx)
        for param in params:
            if param.param_type_name == "argument":
                args.append(
                    (_argument_label(param), (param.help or "") + ("  [required]" if param.required else ""))
                )
            elif (record := param.get_help_record(ctx)) is not None:
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _metavar(descriptor: Any) -> str:
    annotation = descriptor.annotation
    element = getattr(annotation, "__args__", (annotation,))[0] if descriptor.is_list else annotation
    if descriptor.is_path or element is Path:
        return "PATH"
    return {int: "N", float: "NUMBER"}.get(element, "TEXT")


def _argument_label(param: Any) -> str:
    label = str(param.metavar or (param.name or "").upper()) + ("..." if param.nargs != 1 else "")
    return label if param.required else f"[{label}]"


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Multimodal (CT + MRI + clinical note) diagnosis.",
    rich_markup_mode=None,
)
# soft_wrap: a message stays one line also when the output is a log file, not a terminal
console = Console(stderr=True, soft_wrap=True)  # errors, progress
stdout = Console(soft_wrap=True)  # results
_state: dict[str, bool] = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _fail(exc: BaseException) -> None:
    if _state["debug"]:
        raise exc
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2)


def progress_bar(*, transient: bool = False) -> Any:  # rich.progress.Progress
    """The progress bar of every long command: what, bar, done/total, elapsed, ETA (on stderr)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console, transient=transient)


def _parse_map(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            _fail(ValueError(f"--modality expects NAME=CT|MR, got {item!r}"))
        k, v = item.split("=", 1)
        out[k] = v
    return out


# --- inspect ---


@app.command(cls=PlainHelpCommand)
def inspect(
    folders: Annotated[
        list[Path],
        typer.Argument(help="Patient folder(s) or folder(s) of patient folders.", metavar="FOLDER"),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    modality: Annotated[
        list[str] | None, typer.Option(help="NAME=CT|MR for NIfTI files whose modality is not evident.")
    ] = None,
) -> None:
    """List the series found per patient, with geometry, warnings and a verdict."""
    from medfusion.io.case import find_patient_folders, load_case

    try:
        patients = find_patient_folders(folders)
    except InputError as exc:
        _fail(exc)
    if not patients:
        _fail(InputError(folders[0], "no patient folder (one holding DICOM or NIfTI images) found"))
    report: list[dict[str, Any]] = []
    for folder in patients:
        try:
            case = load_case(folder, _parse_map(modality))
        except InputError as exc:
            report.append(
                {
                    "patient_id": folder.name,
                    "folder": str(folder),
                    "series": [],
                    "errors": [str(exc)],
                    "verdict": "unreadable",
                }
            )
            continue
        report.append(
            {
                "patient_id": case.patient_id,
                "folder": str(folder),
                "series": [
                    v.summary() | {"chosen": v is case.ct or v is case.primary_mr} for v in case.candidates
                ],
                "note": str(case.note_path) if case.note_path else None,
                "skipped": [{"path": p, "why": w} for p, w in case.skipped],
                "errors": [str(e) for e in case.errors],
                "choices": case.choices,
                "verdict": case.verdict(),
            }
        )
    unusable = [r["patient_id"] for r in report if r["verdict"].startswith(("unusable", "unreadable"))]
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        if unusable:
            raise typer.Exit(1)
        return
    out = stdout
    for rec in report:
        t = Table(title=f"{rec['patient_id']} — {rec['verdict']}", title_justify="left")
        for col in ("modality", "size", "spacing (mm)", "orient.", "slices", "description", "warnings"):
            t.add_column(col)
        for s in rec["series"]:
            t.add_row(
                s["modality"] + (" *" if s["chosen"] else ""),
                "×".join(map(str, s["size"])),
                "×".join(f"{x:g}" for x in s["spacing_mm"]),
                s["orientation"],
                str(s["size"][2]),
                s["series_description"],
                "; ".join(s["warnings"]),
            )
        out.print(t)
        for line in rec.get("choices", []):
            out.print(f"  choice: {line}")
        for sk in rec.get("skipped", []):
            out.print(f"  skipped: {sk['path']} ({sk['why']})")
        for err in rec["errors"]:
            out.print(f"  [red]error:[/red] {err}")
    if unusable:
        console.print(f"[red]unusable:[/red] {len(unusable)} patient(s): {', '.join(unusable)}")
        raise typer.Exit(1)


# --- register ---


@app.command(cls=PlainHelpCommand)
def register(
    patient: Annotated[Path, typer.Argument(help="One patient folder (a CT and an MR).", metavar="PATIENT")],
    out: Annotated[Path, typer.Option("--out", help="Folder for transform.json, mr_in_ct.nii.gz, qc.json.")],
    affine: Annotated[bool, typer.Option(help="Add an affine stage after the rigid one.")] = False,
    no_check: Annotated[
        bool, typer.Option("--no-check", help="Skip the reverse-registration consistency check.")
    ] = False,
) -> None:
    """Co-register the MR onto the CT only (no model)."""
    from medfusion.config import RegistrationConfig
    from medfusion.run.qc import register_patient

    try:
        pid, res = register_patient(
            patient, out, RegistrationConfig(affine=affine, consistency_check=not no_check)
        )
    except (InputError, ValueError) as exc:
        _fail(exc)
    verdict = "passed" if res.passed else "FAILED"
    stdout.print(f"{pid}: registration {verdict} in {res.seconds:.1f} s → {out}")
    for line in [*res.qc.get("reasons", []), *res.qc.get("warnings", [])]:
        stdout.print(f"  {line}")
    if not res.passed:
        raise typer.Exit(1)


# --- synth ---


@app.command(cls=PlainHelpCommand)
def synth(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Output folder: OUT/patients/ID/ and OUT/labels/ (default: reports/synth-SEED-TIME).",
        ),
    ] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Number of patients.")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same cohort.")] = 7,
    size: Annotated[
        str,
        typer.Option(
            help="Grid preset: standard (128×128×96 CT), small (96×96×64) or clinical (512×512×152 CT at 0.45 × 0.45 × 1.25 mm, 256×256×176 MR at 1 mm)."
        ),
    ] = "standard",
    workers: Annotated[int, typer.Option(min=1, help="Processes.")] = 2,
    start: Annotated[int, typer.Option(min=0, help="First patient index (to extend a cohort).")] = 0,
    sample_plan: Annotated[
        bool,
        typer.Option(
            "--sample-plan",
            help="Force the sample_data mix: DICOM and NIfTI MR, one patient without lesion, one note without the key facts.",
        ),
    ] = False,
    notes_only: Annotated[
        bool,
        typer.Option(
            "--notes-only",
            help="Write only OUT/notes.csv: notes and diagnoses, no images (a corpus to pre-train the note path).",
        ),
    ] = False,
    anatomy: Annotated[
        str,
        typer.Option(
            help="Head anatomy: phantom (ellipsoid head) or mni (nilearn's MNI152 brain, deformed per patient, with skull, face and skull base; needs medfusion[mni])."
        ),
    ] = "phantom",
) -> None:
    """Generate synthetic head patients (CT DICOM, MR DICOM/NIfTI, notes) with labels and truth."""
    import datetime as dt

    from medfusion.synth.generate import generate_cohort, generate_note_corpus

    out = out or Path("reports") / f"synth-{seed}-{dt.datetime.now():%Y%m%d-%H%M%S}"

    if notes_only:
        counts = generate_note_corpus(out, n, seed, start)
        stdout.print(f"wrote {counts['notes']} notes to {out}/notes.csv ({counts['malignant']} malignant)")
        return
    try:
        plan: dict[int, dict[str, Any]] | None = None
        if sample_plan:
            plan = {start + i: {"mr_format": "dicom" if i % 2 == 0 else "nifti"} for i in range(n)}
            plan[start]["n_lesions"] = 0
            if n > 1:
                plan[start + 1].update({"course_stated": False, "history_stated": False})
        with progress_bar(transient=True) as bar:
            task = bar.add_task("generating patients", total=n)
            rows = generate_cohort(
                out,
                n,
                seed,
                size,
                workers,
                start=start,
                progress=lambda: bar.advance(task),
                plan=plan,
                anatomy=anatomy,
            )
    except (ValueError, ImportError) as exc:
        _fail(exc)
    pos = sum(r["malignant"] for r in rows)
    stdout.print(f"wrote {len(rows)} patients to {out}/patients and labels to {out}/labels ({pos} malignant)")


# --- train ---


@app.command(cls=PlainHelpCommand)
def train(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option("--config", help="Training YAML (pipelines/train_default.yaml).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: train.jsonl, checkpoints, package/.")],
    patients: Annotated[Path | None, typer.Option(help="Override data.patients.")] = None,
    labels: Annotated[Path | None, typer.Option(help="Override data.labels.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override epochs.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoint.")] = False,
    package_only: Annotated[
        bool,
        typer.Option(
            help="No segmentation training: run the diagnosis stage as configured on OUT/best.safetensors and package it (temperature refitted on the validation split)."
        ),
    ] = False,
    nproc_per_node: Annotated[
        int, typer.Option("--nproc-per-node", min=1, help="Processes (torchrun + DDP).")
    ] = 1,
) -> None:
    """Train a model package from a labelled cohort."""
    import os
    import subprocess

    from medfusion.config import load_yaml_model
    from medfusion.train.config import TrainConfig
    from medfusion.train.distributed import process_device
    from medfusion.train.loop import train as run_training

    try:
        cfg = load_yaml_model(config, TrainConfig)
    except ValueError as exc:
        _fail(exc)
    if patients:
        cfg.data.patients = str(patients)
    if labels:
        cfg.data.labels = str(labels)
    if epochs is not None:  # 0 too: no segmentation epochs
        cfg.epochs = epochs
    if nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:
        try:  # refuse here, before any process starts, what each rank would refuse
            process_device(cfg.device, 0, nproc_per_node)
        except ValueError as exc:
            _fail(exc)
        raise typer.Exit(subprocess.call(torchrun_command(ctx, nproc_per_node)))
    summary = run_training(cfg, out, resume=resume, package_only=package_only)
    if summary:
        stdout.print(f"package written to {summary.get('package')}")


def torchrun_command(ctx: typer.Context, nproc_per_node: int) -> list[str]:
    """The `torchrun` command that starts `nproc_per_node` copies of this `train` command (every
    option the user gave, --package-only and --epochs 0 included; --debug kept)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc_per_node}",
        "-m",
        "medfusion.cli",
        *(["--debug"] if _state["debug"] else []),
        "train",
        *_command_args(ctx, drop=("nproc_per_node",)),
    ]


# --- run ---

DEFAULT_PIPELINE = Path(__file__).resolve().parent.parent / "pipelines" / "default.yaml"


@app.command(cls=PlainHelpCommand)
def run(
    ctx: typer.Context,
    patients: Annotated[
        list[Path],
        typer.Argument(help="Patient folder(s) or folder(s) of patient folders.", metavar="FOLDER"),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: a new folder under reports/).")
    ] = None,
    pipeline: Annotated[
        Path | None, typer.Option(help="Pipeline YAML (default: pipelines/default.yaml).")
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="Model package folder (default: the shipped one).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    workers: Annotated[
        int, typer.Option(min=0, help="Dask LocalCluster worker processes (0/1: in-process).")
    ] = 0,
    cluster: Annotated[str | None, typer.Option(help="Address of an existing Dask scheduler.")] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue a run in OUT: skip patients whose outputs are complete."),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace the listed patients in an OUT that holds another run (others kept)."
        ),
    ] = False,
    only: Annotated[str | None, typer.Option(help="Comma-separated patient ids to run.")] = None,
    retries: Annotated[int, typer.Option(min=0, help="Re-runs of a patient whose Dask worker died.")] = 1,
    modality: Annotated[
        list[str] | None, typer.Option(help="NAME=CT|MR for NIfTI files whose modality is not evident.")
    ] = None,
) -> None:
    """Segment, score and report every patient; write OUT/ID/…, OUT/summary.csv and OUT/run.json.

    Ctrl-C (or SIGTERM) stops cleanly (exit 130/143) and prints how to resume."""
    import datetime as dt

    from medfusion.run.interrupt import Interrupted, signal_name, stop_on_signals

    out = out or Path("reports") / f"run-{dt.datetime.now():%Y%m%d-%H%M%S}"
    ctx.params["out"] = out  # the resume hint names the folder also when it was defaulted
    stage = {"now": "before any patient was run; nothing was written"}
    try:
        with stop_on_signals():  # from here on, also during the imports: a stop is a clean stop
            _run(ctx, stage, **ctx.params)  # the parameters above, `out` defaulted
    except Interrupted as exc:  # (nothing heavy may be imported here: the stop may have cut an import)
        console.print(
            f"interrupted ({signal_name(exc.signum)}) {stage['now']}. "
            f"Resume with: {_shell(_resume_command(ctx, out))}"
        )
        raise typer.Exit(exc.exit_code) from None


def _shell(args: list[str]) -> str:
    import shlex

    return shlex.join(args)


def _command_args(
    ctx: typer.Context, values: dict[str, Any] | None = None, drop: tuple[str, ...] = ()
) -> list[str]:
    """The command line that gives `ctx`'s command its current parameters (`values` replace some):
    the arguments, then every option whose value is not its default, as the user would type them."""
    given = {**ctx.params, **(values or {})}
    positional: list[str] = []
    options: list[str] = []
    for param in ctx.command.params:
        name = param.name or ""
        if name in drop or name not in given:
            continue
        value = given[name]
        if param.param_type_name == "argument":
            positional += [str(v) for v in (value if isinstance(value, list | tuple) else [value])]
            continue
        if value == param.default or value is None or (value == [] and not param.default):
            continue
        flag = param.opts[0]
        if getattr(param, "is_flag", False):
            if value:
                options.append(flag)
            elif param.secondary_opts:
                options.append(param.secondary_opts[0])
            continue
        for v in value if getattr(param, "multiple", False) else [value]:
            options += [flag, str(v)]
    return [*positional, *options]


def _resume_command(ctx: typer.Context, out: Path) -> list[str]:
    """`medfusion run …` with every option of this run, into the same OUT, with --resume."""
    return ["medfusion", "run", *_command_args(ctx, {"out": out, "resume": True, "overwrite": False})]


def _run(
    ctx: typer.Context,
    stage: dict[str, str],
    *,
    patients: list[Path],
    out: Path,
    pipeline: Path | None,
    model: Path | None,
    device: str | None,
    workers: int,
    cluster: str | None,
    resume: bool,
    overwrite: bool,
    only: str | None,
    retries: int,
    modality: list[str] | None,
) -> None:
    """`run`'s work, inside its clean-stop block; `stage["now"]` says where a stop would leave OUT."""
    from medfusion.config import PipelineConfig, load_yaml_model
    from medfusion.io.case import find_patient_folders
    from medfusion.run.cohort import plan_cohort, run_cohort
    from medfusion.run.pipeline import RunOptions

    try:
        cfg = (
            load_yaml_model(pipeline or DEFAULT_PIPELINE, PipelineConfig)
            if (pipeline or DEFAULT_PIPELINE.exists())
            else PipelineConfig()
        )
        folders = find_patient_folders(patients)
    except (ValueError, InputError) as exc:
        _fail(exc)
    if not folders:
        _fail(InputError(patients[0], "no patient folder (one holding DICOM or NIfTI images) found"))
    if resume and overwrite:
        _fail(ValueError("--resume and --overwrite exclude each other"))
    if device:
        cfg.infer.device = device
    if not cluster:  # on another cluster the device is the workers' business
        from medfusion.device import pick_device

        try:
            pick_device(cfg.infer.device)
        except ValueError as exc:
            _fail(exc)
    opts = RunOptions(
        out=out,
        pipeline=cfg,
        model=str(model) if model else None,
        device=cfg.infer.device,
        workers=workers,
        cluster=cluster,
        resume=resume,
        only=[p.strip() for p in only.split(",") if p.strip()] if only else None,
        modality_map=_parse_map(modality),
        overwrite=overwrite,
        retries=retries,
    )
    try:  # every refusal before the progress bar shows
        plan = plan_cohort(folders, opts)
    except (ValueError, InputError) as exc:
        _fail(exc)
    with progress_bar() as bar:
        task = bar.add_task("patients", total=len(plan.todo))

        def _tick(row: dict[str, Any]) -> None:
            stages = " ".join(f"{k[2:]} {v:.1f}s" for k, v in row.items() if k.startswith("t_"))
            status = row["status"] if row["status"] != "failed" else f"[red]failed[/red]: {row.get('error')}"
            bar.console.print(f"{row['patient_id']}: {status} {stages}")
            bar.advance(task)

        try:
            result = run_cohort(folders, opts, _tick, plan=plan)
        except (ValueError, InputError) as exc:
            _fail(exc)
    stage["now"] = f"after the run; summary.csv and run.json describe what is in {out}"
    if result["kept_from_earlier_runs"]:
        kept = result["kept_from_earlier_runs"]
        console.print(
            f"kept {len(kept)} patient(s) of an earlier run in {out} (not in this run's list): "
            + ", ".join(kept[:10])
            + (" …" if len(kept) > 10 else "")
        )
    mixed = result["from_another_model_or_config"]
    if mixed:
        console.print(
            f"[yellow]warning:[/yellow] {len(mixed)} patient(s) in {out} were made by another model or "
            "pipeline config than this run's: "
            + "; ".join(f"{p} ({why})" for p, why in list(mixed.items())[:5])
            + (" …" if len(mixed) > 5 else "")
            + " (run.json: from_another_model_or_config)"
        )
    if (out / "evaluation").exists():
        console.print(f"note: {out}/evaluation predates this run; run `medfusion evaluate` again")
    if result["interrupted"]:
        console.print(
            f"interrupted ({result['interrupted']}): {result['processed']} patient(s) done in this run, "
            f"{len(result['failures'])} failed; summary.csv and run.json describe what is in {out}. "
            f"Resume with: {_shell(_resume_command(ctx, out))}"
        )
        raise typer.Exit(int(result["exit_code"]))
    first = next(
        (out / f.name / "report.pdf" for f in sorted(plan.folders) if (out / f.name / "report.pdf").exists()),
        None,
    )
    stdout.print(f"outputs in {out}/ (summary.csv, run.json)" + (f"; first report: {first}" if first else ""))
    if result["failures"]:
        console.print(
            f"[red]{len(result['failures'])} patient(s) failed[/red]; see error.json in their folders "
            f"and {out}/failures.jsonl"
        )
        raise typer.Exit(1)


# --- evaluate ---


@app.command(cls=PlainHelpCommand)
def evaluate(
    pred: Annotated[Path, typer.Option("--pred", help="Output folder of `medfusion run`.")],
    labels: Annotated[
        Path,
        typer.Option(
            "--labels", help="Labels folder (labels/ID/segmentation.nii.gz + labels.csv) or a labels CSV."
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Evaluation folder (default: PRED/evaluation).")
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(help="Comma-separated class names, background first (default: from the run)."),
    ] = None,
    nsd_tolerance_mm: Annotated[
        float, typer.Option("--nsd-tolerance-mm", help="Surface Dice tolerance.")
    ] = 2.0,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for the CIs.")] = 2000,
    threshold: Annotated[float | None, typer.Option(help="A second operating threshold to report.")] = None,
    subgroup: Annotated[
        list[str] | None, typer.Option(help="labels.csv column(s) to break the diagnosis metrics down by.")
    ] = None,
) -> None:
    """Segmentation and diagnosis metrics with bootstrap CIs, plots and evaluation.pdf."""
    from medfusion.evaluate.cohort import evaluate as run_eval
    from medfusion.evaluate.cohort import pair_inputs

    try:  # refusals before the progress bar shows and before anything is written
        pairing = pair_inputs(pred, labels, subgroup)
    except (ValueError, InputError) as exc:
        _fail(exc)
    try:
        with progress_bar(transient=True) as bar:
            task = bar.add_task("patients", total=len(pairing.patients))
            summary = run_eval(
                pred,
                labels,
                out or pred / "evaluation",
                classes.split(",") if classes else None,
                nsd_tolerance_mm,
                bootstrap,
                threshold,
                subgroup,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
                pairing=pairing,
            )
    except (ValueError, InputError) as exc:
        _fail(exc)
    missing = summary["labelled_without_prediction"]
    if missing:
        console.print(
            f"note: {len(missing)} of {summary['n_patients_labelled']} labelled patient(s) have no prediction "
            f"in {pred} and are not evaluated: "
            + ", ".join(missing[:10])
            + (" …" if len(missing) > 10 else "")
        )
    t = Table(title="segmentation")
    for col in ("class", "n", "Dice", "HD95 mm (median)", "NSD", "empty (both/ref/pred)"):
        t.add_column(col)
    for c, b in summary["segmentation"].items():
        f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        t.add_row(
            c,
            str(b["dice"]["n"]),
            f(b["dice"]["mean"]),
            f(b["hd95_mm"]["median"]),
            f(b["nsd"]["mean"]),
            f"{b['n_both_empty']}/{b['n_ref_empty']}/{b['n_pred_empty']}",
        )
    out_c = stdout
    out_c.print(t)
    undefined: list[str] = []
    refused: list[str] = []
    if "diagnosis" in summary:
        from medfusion.evaluate.diagnosis import HEADLINE

        d = summary["diagnosis"]
        n, n_pos = d["n"], d["n_positive"]
        out_c.print(f"diagnosis ({d['score']}): n = {n} ({n_pos} positive, {n - n_pos} negative)")
        c = d["confusion"]  # counts at the threshold: shown on any number of cases
        sens, spec = d["sensitivity"]["value"], d["specificity"]["value"]
        out_c.print(
            f"at p ≥ {d['threshold']:g}: sensitivity "
            + ("" if sens is None else f"{sens:.3f} ")
            + f"({c['tp']}/{c['tp'] + c['fn']}), specificity "
            + ("" if spec is None else f"{spec:.3f} ")
            + f"({c['tn']}/{c['tn'] + c['fp']})"
        )
        for k in HEADLINE:
            v = d[k]
            if v.get("refused"):
                refused.append(k)
                out_c.print(f"{k}: not computed, {v['refused']}")
                continue
            if v["value"] is None:
                if n_pos in (0, n):  # a ranking or calibration metric needs cases of both classes
                    undefined.append(k)
                out_c.print(f"{k}: not defined on these cases (n = {n}, {n_pos} positive)")
                continue
            ci = "" if v["ci_low"] is None else f" (95% CI {v['ci_low']:.3f} to {v['ci_high']:.3f})"
            line = f"{k}: {v['value']:.3f}{ci} (n = {n})"
            if "calibrated_null" in v:
                z = v["calibrated_null"]
                line += (
                    f"; a calibrated model on these cases: median {z['median']:.3f}, "
                    f"95th pct {z['p95']:.3f} (p = {z['p_value']:.2f})"
                )
            out_c.print(line)
    dom = summary.get("domain") or {}
    if dom.get("n_flagged"):
        out_c.print(
            f"domain guard: {dom['n_flagged']} of {summary['n_patients_predicted']} patients flagged "
            "(outside the model's training domain, no decision given); the metrics above count them"
        )
        inside = (summary.get("diagnosis") or {}).get("in_domain")
        if inside:
            vals = ", ".join(
                f"{k} {inside[k]['value']:.3f}" for k in ("auroc", "ece") if inside[k]["value"] is not None
            )
            out_c.print(
                f"in domain only: n = {inside['n']} ({inside['n_positive']} positive){': ' + vals if vals else ''}"
            )
    out_c.print(f"written to {out or pred / 'evaluation'}")
    if refused:
        from medfusion.evaluate.diagnosis import MIN_CASES

        console.print(
            f"[red]error:[/red] too few cases for {', '.join(refused)}: each needs at least {MIN_CASES} "
            f"cases, these predictions have labels for {n}"
        )
    elif undefined:
        console.print(
            f"[red]error:[/red] too few cases for {', '.join(undefined)}: each needs cases of both classes "
            f"(n = {n}, {n_pos} positive)"
        )
    if refused or undefined:
        raise typer.Exit(1)


# --- compare ---


@app.command(cls=PlainHelpCommand)
def compare(
    pred: Annotated[Path, typer.Option("--pred", help="Output folder of `medfusion run` (model A).")],
    baseline: Annotated[
        Path, typer.Option("--baseline", help="Output folder of another run on the same patients (model B).")
    ],
    labels: Annotated[
        Path, typer.Option("--labels", help="Labels folder (with labels.csv) or a labels CSV.")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="JSON to write (default: PRED/evaluation/compare.json).")
    ] = None,
    bootstrap: Annotated[int, typer.Option(min=100, help="Bootstrap resamples (over patients).")] = 2000,
) -> None:
    """Paired A − B differences (Dice per class, AUROC, Brier) with bootstrap CIs over patients.

    Both runs need `medfusion evaluate` first (its per-case Dice is read back)."""
    from medfusion.evaluate.compare import compare as run_compare
    from medfusion.evaluate.compare import write_comparison

    try:
        res = run_compare(pred, baseline, labels, bootstrap)
    except (ValueError, InputError) as exc:
        _fail(exc)
    t = Table(title=f"A = {pred}  vs  B = {baseline}  (paired over patients)")
    for col in ("measure", "A", "B", "A − B (95% CI)", "p", "A better / worse"):
        t.add_column(col)

    def pv(v: float) -> str:  # a bootstrap p-value cannot be resolved below 1 / resamples
        return f"<{1 / bootstrap:.4f}" if v == 0 else f"{v:.3f}"

    def row(measure: str, r: dict[str, Any], counts: str = "") -> None:
        ci = f"{r['delta']:+.3f} ({r['ci_low']:+.3f} to {r['ci_high']:+.3f})"
        t.add_row(measure, f"{r['a']:.3f}", f"{r['b']:.3f}", ci, pv(r["p"]), counts)

    for c, r in res["segmentation"].items():
        row(f"Dice {c}", r, f"{r['better']}/{r['worse']}")
    for s, rec in res["diagnosis"].items():
        for m, r in rec.items():
            row(f"{m} {s}", r)
    stdout.print(t)
    stdout.print("Dice here counts a patient where both masks are empty as 1 (see evaluate/compare.py).")
    stdout.print(f"written to {write_comparison(res, pred, out)}")


# --- calibrate ---


@app.command(cls=PlainHelpCommand)
def calibrate(
    pred: Annotated[
        list[Path],
        typer.Option(
            "--pred",
            help="Output folder of `medfusion run` on a labelled cohort, with --model; repeat to pool runs.",
        ),
    ],
    labels: Annotated[
        list[Path],
        typer.Option(
            "--labels",
            help="Labels folder (with labels.csv) or a labels CSV: one per --pred, or one for all.",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the re-calibrated package (must not exist).")
    ],
    model: Annotated[
        Path | None, typer.Option("--model", help="Package that made the run (default: the shipped one).")
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            help="platt: slope and intercept on the logit (moves the mean probability too); temperature: a scale only."
        ),
    ] = "platt",
    version: Annotated[
        str | None, typer.Option(help="Version of the new package (default: the old one + '+recalibrated').")
    ] = None,
) -> None:
    """Refit the score calibration on a labelled run; writes a new package (only the calibration differs).

    Measure the new package on other patients than these: on the fitted cases it looks better than it is."""
    from medfusion.package import PackageError
    from medfusion.train.calibrate import describe, recalibrate

    if method not in ("platt", "temperature"):
        _fail(ValueError(f"--method {method!r}: choose platt or temperature"))
    try:
        record = recalibrate(
            pred, labels, out, model, "platt" if method == "platt" else "temperature", version
        )
    except (ValueError, InputError, PackageError) as exc:
        _fail(exc)
    for line in describe(record):
        stdout.print(line)
    stdout.print(f"written to {out}; use it with `medfusion run --model {out}`")


# --- convert ---


@app.command(cls=PlainHelpCommand)
def convert(
    patient: Annotated[
        Path, typer.Argument(help="One patient folder (DICOM and/or NIfTI).", metavar="PATIENT")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for ct.nii.gz, mr.nii.gz, mr_2.nii.gz … + JSON.")
    ],
    modality: Annotated[
        list[str] | None, typer.Option(help="NAME=CT|MR for NIfTI files whose modality is not evident.")
    ] = None,
) -> None:
    """Write what medfusion reads from a patient folder: the chosen volumes as NIfTI, each with a JSON
    sidecar (modality, series UID and description, warnings, choices)."""
    from medfusion.io.convert import convert_case

    try:
        case, written = convert_case(patient, out, _parse_map(modality))
    except (InputError, ValueError) as exc:
        _fail(exc)
    for path in written:
        stdout.print(f"{path}")
    for line in case.choices:
        stdout.print(f"  choice: {line}")
    for err in case.errors:
        console.print(f"  [yellow]not converted:[/yellow] {err}")
    if case.ct is None:
        console.print(f"[red]error:[/red] {patient}: no usable CT volume (MR written)")
        raise typer.Exit(1)


# --- domain ---

domain_app = typer.Typer(help="The model package's domain guard (what its training inputs looked like).")
app.add_typer(domain_app, name="domain")


@domain_app.command("fit", cls=PlainHelpCommand)
def domain_fit(
    patients: Annotated[
        list[Path],
        typer.Argument(help="In-domain patient folders (or folders of them) to fit on.", metavar="FOLDER"),
    ],
    model: Annotated[
        Path | None, typer.Option("--model", "--package", help="Package to fit (default: the shipped one).")
    ] = None,
    heldout: Annotated[
        list[Path] | None,
        typer.Option(help="In-domain patients never fitted on, for calibrating the threshold too."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N fitting patients.")] = None,
    flag_rate: Annotated[
        float,
        typer.Option(min=0.0, max=0.5, help="Share of in-domain cases the threshold flags, in [0, 0.5]."),
    ] = 0.015,
    calibration: Annotated[
        str | None,
        typer.Option(
            help='JSON {"SITUATION": {"n": …, "auroc": …, "ece": …, "source": "…"}}: calibration measured '
            "elsewhere for an input situation (e.g. CT+MR+note)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")] = "auto",
) -> None:
    """Fit the domain guard of a package in place: input facts, and a Mahalanobis density of its encoder
    features (Ledoit-Wolf; Lee et al. 2018) per input situation, thresholded to flag ≈ --flag-rate of
    held-out in-domain cases. Written to model.json ("domain") and domain.safetensors."""
    from medfusion.io.case import find_patient_folders
    from medfusion.models.domain import check_calibration
    from medfusion.package import PackageError
    from medfusion.train.domain import fit_package_domain

    try:
        cal = check_calibration(json.loads(calibration)) if calibration else None
        fit_folders = find_patient_folders(patients)[:limit]
        held = find_patient_folders(heldout) if heldout else []
        block = fit_package_domain(
            model,
            fit_folders,
            held,
            flag_rate=flag_rate,
            calibration=cal,
            device=device,
            progress=lambda pid, sec: console.print(f"{pid}: {sec:.1f} s"),
        )
    except (ValueError, InputError, PackageError) as exc:
        _fail(exc)
    for sit, rec in block["fitted_on"]["thresholds"].items():
        if "not_fitted" in rec:
            stdout.print(f"{sit}: no density ({rec['n_fit']} cases: {rec['not_fitted']})")
            continue
        stdout.print(
            f"{sit}: {rec['n_fit']} fitted, threshold {rec['threshold']} "
            f"({rec['heldout_flagged']}/{rec['n_heldout']} held-out flagged)"
        )
    for line in block["fitted_on"]["skipped"]:
        console.print(f"  [yellow]skipped:[/yellow] {line}")
    stdout.print(f"calibrated situations: {', '.join(sorted(block['calibration'])) or 'none'}")


def main() -> None:
    """The `medfusion` console script: the app on `sys.argv`, with `--debug` accepted after the
    sub-command too; `run` stops cleanly on SIGINT/SIGTERM from its first moment (exit 130/143)."""
    # --debug is the app's option; accept it after the sub-command too (medfusion run … --debug)
    args = sys.argv[1:]
    if "--debug" in args[1:]:
        args = ["--debug", *[a for a in args if a != "--debug"]]
    if next((a for a in args if not a.startswith("-")), None) != "run":
        app(args=args)
        return
    from medfusion.run.interrupt import Interrupted, signal_name, stop_on_signals

    try:  # `run` stops cleanly from its first moment; its own handler takes over once it starts
        with stop_on_signals():
            app(args=args)
    except Interrupted as exc:
        again = ["medfusion", *(a for a in args if a not in ("--overwrite", "--resume")), "--resume"]
        console.print(
            f"interrupted ({signal_name(exc.signum)}) before any patient was run; nothing was written. "
            f"Resume with: {_shell(again)}"
        )
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
