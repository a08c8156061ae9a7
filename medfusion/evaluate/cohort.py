"""`medfusion evaluate`: pair a run's outputs with labels, compute per-case and cohort metrics,
write CSV/JSON, plots and a PDF."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.evaluate.diagnosis import HEADLINE, diagnosis_metrics
from medfusion.evaluate.segmentation import case_metrics
from medfusion.io.atomic import atomic_path, write_json
from medfusion.io.case import load_label_map
from medfusion.io.errors import InputError
from medfusion.io.labels_csv import labels_csv_path, read_labels_table
from medfusion.io.nifti import read_nifti
from medfusion.io.volume import LabelMap, Volume
from medfusion.run.result import CaseResult, ScoredProbabilities


def load_label_map_exists(folder: Path) -> bool:
    """True when `folder` (labels/<patient_id>/) holds a reference label map."""
    return (folder / "segmentation.nii.gz").exists() or (folder / "segmentation.dcm").exists()


def align_reference(ref: Volume, pred: Volume) -> tuple[Volume, str]:
    """The reference on the prediction's grid: as is when the whole geometry agrees (`Grid.same_as`,
    1e-3 mm), else resampled nearest-neighbour (`LabelMap.resample_to`) with a note.

    Raises:
        ValueError: the reference's grid does not overlap the prediction's (all 8 corners, `Grid.overlaps`).
    """
    if ref.same_grid(pred, tol=1e-3):
        return ref, ""
    if not pred.grid.overlaps(ref.grid):
        msg = "reference label map does not overlap the prediction's space"
        raise ValueError(msg)
    return (
        LabelMap.of(ref).resample_to(pred),
        f"reference resampled (nearest) from spacing {tuple(round(s, 3) for s in ref.spacing)} to {tuple(round(s, 3) for s in pred.spacing)}",
    )


@dataclasses.dataclass
class Pairing:
    """A run's patients matched with labels, checked before any metric is computed (`pair_inputs`)."""

    pred_dir: Path
    labels_dir: Path
    csv_path: Path
    patients: list[str]  # with OUT/<id>/scores.json
    table: list[dict[str, str]]  # labels.csv rows (empty without one)
    fields: list[str]  # labels.csv columns
    labelled: list[str]  # patients with a label map or a labels.csv row
    run: dict[str, Any]  # PRED/run.json (empty when there is none, e.g. another tool's predictions)


def pair_inputs(pred_dir: Path, labels: Path, subgroups: list[str] | None = None) -> Pairing:
    """Match the predictions in `pred_dir` with `labels`; reads only listings, run.json and labels.csv.

    Raises (one line, naming the path): InputError for a missing predictions folder, labels folder or
    CSV, a folder without patient outputs, a labels CSV without patient_id, a --subgroup column that
    labels.csv lacks; ValueError when no predicted patient has a label map or a labels.csv row.
    """
    if not pred_dir.is_dir():
        raise InputError(pred_dir, "predictions folder does not exist")
    if not labels.exists():
        raise InputError(labels, "labels folder or CSV does not exist")
    labels_dir = labels if labels.is_dir() else labels.parent
    csv_path = labels_csv_path(labels)
    patients = sorted(p.name for p in pred_dir.iterdir() if (p / "scores.json").exists())
    if not patients:
        raise InputError(pred_dir, "no patient outputs (OUT/<id>/scores.json) found")
    table, fields = read_labels_table(csv_path) if csv_path.exists() else ([], [])
    for col in subgroups or []:
        if col not in fields:
            raise InputError(csv_path, f"no column {col!r} for the subgroup breakdown")
    labelled = sorted(
        {d.name for d in labels_dir.iterdir() if d.is_dir() and load_label_map_exists(d)}
        | {r["patient_id"] for r in table}
    )
    if not set(patients) & set(labelled):
        msg = (
            f"no overlap: none of the {len(patients)} patient(s) in {pred_dir} has a label map or a "
            f"labels.csv row in {labels} ({len(labelled)} labelled patient(s) there)"
        )
        raise ValueError(msg)
    try:
        run: dict[str, Any] = json.loads((pred_dir / "run.json").read_text())
    except (OSError, ValueError):
        run = {}
    return Pairing(pred_dir, labels_dir, csv_path, patients, table, fields, labelled, run)


def evaluated_run(pairing: Pairing) -> dict[str, str]:
    """What was evaluated, for the report's header and metrics_summary.json: the run folder and the
    model named in its run.json ("" when the predictions came without one)."""
    model = pairing.run.get("model") or {}
    name = " ".join(str(model[k]) for k in ("name", "version") if model.get(k))
    return {"run": str(pairing.pred_dir.resolve()), "model": name}


def read_class_names(path: Path) -> list[str]:
    """The class names of a segmentation.json (what `medfusion run` writes: ``{"labels": {"0":
    "background", "1": …}}``), in label order.

    Raises:
        InputError: one line naming `path`: not JSON, not an object, no "labels" object, or labels
            that are not the names of the values 0, 1, … n-1.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read ({exc})") from exc
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise InputError(path, 'expected a JSON object with a "labels" object ({"0": "background", …})')
    if sorted(labels) != sorted(str(k) for k in range(len(labels))) or not all(
        isinstance(v, str) for v in labels.values()
    ):
        raise InputError(path, '"labels" must name each of the values 0 … n-1 with a string')
    return [labels[str(k)] for k in range(len(labels))]


def evaluate(
    pred_dir: Path,
    labels: Path,
    out: Path,
    classes: list[str] | None = None,
    tolerance_mm: float = 2.0,
    n_boot: int = 2000,
    threshold: float | None = None,
    subgroups: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    pairing: Pairing | None = None,
) -> dict[str, Any]:
    """Pair `pred_dir`'s patients with `labels`, write metrics, plots and evaluation.pdf; returns the summary.

    Class names come from `classes`, else each patient's segmentation.json (what `medfusion run`
    writes), else are numbered ("1", "2", … after "background": predictions from another tool).
    `progress(done, total)` is called after each patient's segmentation metrics. `pairing` is
    `pair_inputs(pred_dir, labels, subgroups)` when the caller made it already. Refused in one line
    before anything is computed or written: see `pair_inputs`. Each scores.json is read as
    `run.result.ScoredProbabilities` (probabilities and threshold; another tool's file holding only
    those reads); one that does not fit raises ValueError naming the file.
    """
    pairing = pairing or pair_inputs(pred_dir, labels, subgroups)
    labels_dir, patients = pairing.labels_dir, pairing.patients
    numbered = False
    rows: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    scores: dict[str, ScoredProbabilities] = {}
    for done, pid in enumerate(patients):
        if progress:
            progress(done, len(patients))
        scores[pid] = CaseResult.load_scored(pred_dir / pid)
        seg_path = pred_dir / pid / "segmentation.nii.gz"
        ref = load_label_map(labels_dir / pid)
        if ref is None or not seg_path.exists():
            continue
        pred = read_nifti(seg_path, modality="SEG")
        ref, note = align_reference(ref, pred)
        names_file = pred_dir / pid / "segmentation.json"
        if classes:
            class_names = classes
        elif names_file.exists():
            class_names = read_class_names(names_file)
        else:
            top = int(max(pred.array.max(), ref.array.max(), 0))
            class_names = ["background", *(str(k) for k in range(1, top + 1))]
            numbered = True
        if note:
            notes[pid] = note
        for r in case_metrics(
            pred.array.astype(np.int16), ref.array.astype(np.int16), pred.spacing, class_names, tolerance_mm
        ):
            rows.append({"patient_id": pid, **r})
    if progress:
        progress(len(patients), len(patients))
    table, fields = pairing.table, pairing.fields
    by_pid = {r["patient_id"]: r for r in table}
    labelled = pairing.labelled
    summary: dict[str, Any] = {
        "n_patients_predicted": len(patients),
        "n_patients_with_reference": len({r["patient_id"] for r in rows}),
        **evaluated_run(pairing),
        "n_patients_labelled": len(labelled),
        "labelled_without_prediction": [p for p in labelled if p not in set(patients)],
        "class_names": "numbered (no segmentation.json, no --classes)" if numbered else "named",
        "nsd_tolerance_mm": tolerance_mm,
        "resampled_references": notes,
        "segmentation": {},
    }
    for cname in sorted({r["class"] for r in rows}, key=lambda c: [r["class"] for r in rows].index(c)):
        rs = [r for r in rows if r["class"] == cname]
        both = [r for r in rs if r["empty"] == "both"]
        scored = [r for r in rs if r["empty"] != "both"]
        block: dict[str, Any] = {
            "n_cases": len(rs),
            "n_both_empty": len(both),
            "n_ref_empty": sum(r["empty"] == "ref" for r in rs),
            "n_pred_empty": sum(r["empty"] == "pred" for r in rs),
        }
        for m in ("dice", "iou", "hd95_mm", "assd_mm", "nsd", "volume_abs_error_ml"):
            vals = np.array([r[m] for r in scored], float)
            block[m] = {
                "mean": float(vals.mean()) if len(vals) else None,
                "median": float(np.median(vals)) if len(vals) else None,
                "n": len(vals),
                "note": "cases where both masks are empty are excluded from the mean and counted in n_both_empty",
            }
        tp, fn, fp, fpi = (
            sum(r[k] for r in rs) for k in ("lesions_tp", "lesions_fn", "lesions_fp", "lesions_fp_isolated")
        )
        block["lesion_detection"] = {
            "tp": tp,
            "fn": fn,
            "fp": fp,
            "fp_isolated": fpi,
            "sensitivity": tp / (tp + fn) if tp + fn else None,
        }
        summary["segmentation"][cname] = block
    flagged = [p for p in patients if scores[p].in_domain is False]
    summary["domain"] = {
        "n_in_domain": sum(scores[p].in_domain is True for p in patients),
        "n_flagged": len(flagged),
        "n_not_recorded": sum(scores[p].in_domain is None for p in patients),
        "flagged": flagged,
        "note": "flagged: outside the model's training domain (scores.json domain.in_domain false), no "
        "decision given; diagnosis metrics are over all cases, and again over the others under 'in_domain'",
    }
    score_names = sorted({k for sc in scores.values() for k in sc.probabilities} & set(fields))
    diag: dict[str, Any] = {}
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in list(score_names):
        ids = [p for p in patients if p in by_pid and by_pid[p].get(s, "") != ""]
        if not ids:  # no metric on zero cases (an ECE of 0.000 from nothing)
            score_names.remove(s)
            continue
        y = np.array([int(float(by_pid[p][s])) for p in ids])
        pr = np.array([scores[p].probabilities[s] for p in ids])
        model_t = scores[ids[0]].threshold
        ths = {"model": model_t}
        if threshold is not None:
            ths["chosen"] = threshold
        diag[s] = diagnosis_metrics(y, pr, ths, n_boot)
        keep = np.array([scores[p].in_domain is not False for p in ids])
        if not keep.all() and keep.any():
            diag[s]["in_domain"] = diagnosis_metrics(y[keep], pr[keep], ths, n_boot)
        pairs[s] = (y, pr)
        for col in subgroups or []:
            groups = {}
            for g in sorted({by_pid[p][col] for p in ids}):
                sel = np.array([by_pid[p][col] == g for p in ids])
                groups[g] = diagnosis_metrics(y[sel], pr[sel], ths, min(n_boot, 500))
            diag[s].setdefault("subgroups", {})[col] = groups
    if diag:
        first = diag[score_names[0]]
        summary["diagnosis"] = {
            "score": score_names[0],
            "threshold": first["thresholds"]["model"],
            **_headline(first),
            "per_score": diag,
        }
        if "in_domain" in first:
            summary["diagnosis"]["in_domain"] = _headline(first["in_domain"])
    _write_per_case(out / "metrics_per_case.csv", rows)
    write_json(out / "metrics_summary.json", summary)
    from medfusion.evaluate.plots import write_plots_and_pdf

    write_plots_and_pdf(out, rows, pairs, summary, run=summary["run"], model=summary["model"])
    return summary


def _headline(d: dict[str, Any]) -> dict[str, Any]:
    """The summary's headline of one score's `diagnosis_metrics`: n, positives, the HEADLINE metrics,
    sensitivity and specificity at the model's threshold, and its confusion counts."""
    return {
        "n": d["n"],
        "n_positive": d["n_positive"],
        **{k: d[k] for k in HEADLINE},
        **{k: d[f"{k}@model"] for k in ("sensitivity", "specificity")},
        "confusion": d["confusion"]["model"],
    }


def _write_per_case(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = [
        "patient_id",
        "class",
        "dice",
        "iou",
        "hd95_mm",
        "assd_mm",
        "nsd",
        "volume_pred_ml",
        "volume_ref_ml",
        "volume_abs_error_ml",
        "volume_rel_error",
        "lesions_tp",
        "lesions_fn",
        "lesions_fp",
        "lesions_fp_isolated",
        "empty",
    ]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
