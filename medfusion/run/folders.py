"""The output folder's layout: one folder per patient, published whole, read back into summary rows.

`OUT/<patient_id>/` either holds a whole result (scores.json is written last) or an error.json, or
does not exist: a patient is assembled in `OUT/.tmp-<patient_id>/` and renamed into place.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from medfusion.io.atomic import write_json
from medfusion.run.result import CaseResult

log = logging.getLogger("medfusion.run")


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
    publish(tmp, out / pid)
    return patient_row(out / pid)


def patient_row(folder: Path) -> dict[str, Any]:
    """A patient's summary.csv row, read back from its output folder (scores.json and qc.json through
    `run.result.CaseResult`, or error.json), so that a resumed patient's row is the same as a freshly
    run one's.

    A folder whose scores.json, qc.json or error.json is unreadable or does not fit the output
    contract (one made by an older medfusion, or edited by hand) gets a row with status "unreadable"
    and the one-line reason naming the file: the summary of the rest of the folder is still written.
    """
    pid = folder.name
    err = folder / "error.json"
    if err.exists() and not (folder / "scores.json").exists():
        try:
            e = json.loads(err.read_text())
            if not isinstance(e, dict):
                msg = f"expected a JSON object, got {type(e).__name__}"
                raise ValueError(msg)
        except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
            reason = f"{err}: cannot read ({exc})".splitlines()[0]
            return {"patient_id": pid, "status": "unreadable", "qc_verdict": "", "error": reason, "stage": ""}
        return {
            "patient_id": pid,
            "status": "failed",
            "qc_verdict": "",
            "error": e.get("error", ""),
            "stage": e.get("stage", ""),
        }
    try:
        result = CaseResult.load(folder)
    except ValueError as exc:
        return {"patient_id": pid, "status": "unreadable", "qc_verdict": "", "error": str(exc), "stage": ""}
    sc, meas = result.scores, result.scores.measurements
    row: dict[str, Any] = {
        "patient_id": pid,
        "status": "ok",
        "qc_verdict": sc.qc_verdict.value,
        "device": sc.inference.get("device", ""),
    }
    row.update({f"p_{k}": round(v, 4) for k, v in sc.probabilities.items()})
    row["in_domain"] = sc.domain.in_domain
    # one pred_ column per score in every row (empty when not assessed), so the columns keep their order
    row.update({f"pred_{k}": int(sc.predicted[k]) if sc.predicted else "" for k in sc.probabilities})
    # positive / negative / indeterminate / not assessed: what the report's verdict says
    row.update({f"decision_{k}": v.value for k, v in sc.decision.items()})
    row.update({f"u_{k}": round(v, 4) for k, v in sc.uncertainty.items()})
    row.update({f"vol_{k}_ml": v for k, v in meas.volumes_ml.items()})
    row["lesion_count"] = meas.lesion_count
    row["largest_diameter_mm"] = meas.largest_diameter_mm
    row["outputs_failed"] = ";".join(result.qc.outputs.failed if result.qc.outputs else {})
    row.update({f"t_{k}": round(v, 2) for k, v in sc.timings_s.items()})
    return row


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished patient folder into place; an earlier output there is replaced, anything
    else (a folder medfusion did not write, e.g. the patient's own inputs) is never deleted.

    Raises:
        OSError: `final` exists and is not a medfusion output, or the rename fails.
    """
    if final.exists():
        if not any((final / name).exists() for name in ("scores.json", "error.json", "qc.json")):
            msg = f"{final} exists and is not a medfusion output; refusing to replace it"
            raise OSError(msg)
        shutil.rmtree(final)
    tmp.rename(final)


def is_done(out: Path, pid: str) -> bool:
    """True when `OUT/<pid>/` holds a complete result that fits the output contract: scores.json
    (written last) and qc.json read through `CaseResult.load`.

    A folder whose scores.json or qc.json does not fit (truncated, edited by hand, an older
    medfusion's) is not done: `--resume` runs the patient again, and a one-line warning names the file.
    """
    folder = out / pid
    if not (folder / "scores.json").exists():
        return False
    try:
        CaseResult.load(folder)
    except ValueError as exc:
        log.warning("--resume: running %s again: its result is unreadable: %s", pid, str(exc).splitlines()[0])
        return False
    return True


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
