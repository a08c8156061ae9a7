"""The domain guard of a model package on in-domain and out-of-domain inputs, and what the model answers
on them (issue #25).

Each case is run as `medfusion run` runs it — load, register and prepare with the run's preprocessing,
one `Predictor.predict` (no flip, 8 MC-dropout passes of the score head: the settings the shipped
package's calibration was measured with, `evaluate-fast`), then the package's input-fact rules and the
Mahalanobis distance of the encoder features the prediction recorded. The held-out patients are also
predicted with their MR removed and with their note removed (the same prepared case), for
`benchmarks/missing_inputs.py`'s side-by-side calibration, uncertainty and indeterminate-band tables,
printed at the end.

Cases:
- held-out in-domain: a synthetic cohort of a seed used neither in training nor in fitting the guard
  (generated, or extended, to --n patients), labels from each patient's truth.json;
- real abdomen CT (NIfTI, and the DICOM series) and the real GE head CT (`../shared/real-data/`), the
  head CT also with an MR built from nilearn's MNI152 (`benchmarks/real_head_mr.py`; skipped without
  nilearn);
- synthetic patients with CT and MR swapped; an MR given as CT (no MR); the CT resampled to 5 mm
  slices; the CT with 5× its noise (--variants patients each).

    python benchmarks/domain.py --work /tmp/domain-bench --n 100 --variants 10 [--package PKG] [--seed 13013]

Prints a table and writes WORK/domain_results.json. Each case's facts, features and answers are kept in
WORK/measured/ (they depend on the weights, not on the guard): `--measure-only` fills it (several
processes at once with `--shard K/M`) while the guard is being fitted, a later run only checks. On the
shared 2-core VM a held-out patient costs 4–8 min (registration, three predictions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import missing_inputs  # benchmarks/missing_inputs.py: the analysis of the answers
import numpy as np
import torch

from medfusion.config import PipelineConfig
from medfusion.infer.predictor import Predictor
from medfusion.io.atomic import write_json
from medfusion.io.case import Case, load_case
from medfusion.io.volume import Grid, Volume
from medfusion.models.domain import assess, case_facts
from medfusion.preprocess.prepare import ModelInputs, prepare_case
from medfusion.run.pipeline import run_preprocess_config

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-data"
HELD_OUT = "held-out in-domain"


# the held-out cohort is also scored with an input removed: the situations of issue #25's "incomplete inputs"
WITHOUT = {"CT+note": "MR", "CT+MR": "note"}


def _predict(predictor: Predictor, tensors: ModelInputs) -> dict[str, Any]:
    t0 = time.perf_counter()
    pred = predictor.predict(tensors)
    return {
        "features": pred.domain_features.tolist() if pred.domain_features is not None else None,
        "scores": pred.scores,
        "uncertainty": pred.uncertainty,
        "lesion_voxels": int((pred.labels.array > 0).sum()),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def measure(
    case: Case, predictor: Predictor, pipeline: PipelineConfig, without: bool = False
) -> dict[str, Any]:
    """What the guard reads of one case — its input facts and encoder features — and what the model
    answers (calibrated scores, their MC-dropout s.d.), from one full `Predictor.predict` as `medfusion run`
    makes it. With `without`, the same prepared case is also predicted with its MR removed (zeros,
    `has_mr` False: what `prepare_case` gives a CT-only folder) and with its note removed ("");
    under `"without"`, keyed by situation."""
    t0 = time.perf_counter()
    tensors = prepare_case(case, run_preprocess_config(pipeline, predictor.meta))
    seconds_prepare = round(time.perf_counter() - t0, 1)
    mr_used = bool(tensors.has_mr and (tensors.registration is None or tensors.registration.passed))
    tensors.has_mr = mr_used
    facts = case_facts(case, mr_used)
    rec: dict[str, Any] = {"facts": facts, **_predict(predictor, tensors), "seconds_prepare": seconds_prepare}
    if without and mr_used and case.note:
        no_mr = dataclasses.replace(
            tensors, mr=np.zeros_like(tensors.mr), has_mr=False, mr_in_ct=None, registration=None
        )
        ct_only = {k: v for k, v in facts.items() if k != "mr"}
        rec["without"] = {
            "CT+note": {"facts": {**ct_only, "situation": "CT+note"}, **_predict(predictor, no_mr)},
            "CT+MR": {
                "facts": {**facts, "situation": "CT+MR"},
                **_predict(predictor, dataclasses.replace(tensors, note="")),
            },
        }
    return rec


def _swapped(case: Case) -> Case:
    assert case.ct is not None and case.primary_mr is not None
    ct, mr = case.ct, case.primary_mr
    return dataclasses.replace(case, ct=mr.with_array(mr.array, "CT"), mr=[ct.with_array(ct.array, "MR")])


def _mr_as_ct(case: Case) -> Case:
    mr = case.primary_mr
    assert mr is not None
    return dataclasses.replace(case, ct=mr.with_array(mr.array, "CT"), mr=[])


def _thick(case: Case, mm: float = 5.0) -> Case:
    ct = case.ct
    assert ct is not None
    nz = max(1, int(round(ct.shape[0] * ct.spacing[2] / mm)))
    grid = Grid((nz, *ct.shape[1:]), (ct.spacing[0], ct.spacing[1], mm), ct.origin, ct.direction)
    thick = ct.resample_to(grid, default=-1024.0)
    return dataclasses.replace(
        case, ct=Volume(thick.array, thick.spacing, thick.origin, thick.direction, "CT", ct.meta)
    )


def _noisy(case: Case, factor: float = 5.0, seed: int = 0) -> Case:
    ct = case.ct
    assert ct is not None
    sigma = case_facts(case, False)["ct"]["noise_hu"]
    extra = np.random.default_rng(seed).normal(0.0, sigma * np.sqrt(factor**2 - 1), ct.shape)
    body = ct.array > -500
    arr = np.where(body, ct.array + extra, ct.array).astype(np.float32)
    return dataclasses.replace(case, ct=ct.with_array(arr, "CT"))


def loader(folder: Path, transform: Callable[[Case], Case] | None = None) -> Callable[[], Case]:
    """A case maker: load `folder`, then apply `transform`."""

    def make() -> Case:
        case = load_case(folder)
        return transform(case) if transform else case

    return make


def truth_label(cohort: Path, pid: str) -> int | None:
    """The patient's malignant label (0/1) from `cohort/labels/<pid>/truth.json`, None without one."""
    path = cohort / "labels" / pid / "truth.json"
    return int(json.loads(path.read_text())["malignant"]) if path.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--package", type=Path, default=None)
    ap.add_argument("--n", type=int, default=20, help="held-out in-domain patients")
    ap.add_argument("--seed", type=int, default=13013, help="seed of the held-out cohort (never trained on)")
    ap.add_argument("--variants", type=int, default=3, help="patients per synthetic out-of-domain variant")
    ap.add_argument(
        "--swapped",
        type=int,
        default=None,
        help="patients for the swapped CT/MR variant (default: --variants; each registers for minutes)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    ap.add_argument("--measure-only", action="store_true", help="measure the cases, check nothing yet")
    ap.add_argument("--cached-only", action="store_true", help="check only the cases measured already")
    ap.add_argument("--shard", default="0/1", help="K/M: measure only every M-th case from the K-th")
    args = ap.parse_args()
    from medfusion.synth.generate import generate_cohort

    torch.set_num_threads(args.threads)
    shard, shards = (int(v) for v in args.shard.split("/"))
    cohort = args.work / f"heldout-{args.seed}"
    have = sum(p.is_dir() for p in (cohort / "patients").iterdir()) if (cohort / "patients").exists() else 0
    if (
        have < args.n and not args.cached_only
    ):  # the cohort is extended, patient by patient, to --n (deterministic per seed and index)
        generate_cohort(cohort, args.n - have, seed=args.seed, preset="standard", workers=1, start=have)
    # the settings the shipped package's calibration was measured with (evaluate-fast: no flip, 8 MC passes)
    predictor = Predictor(args.package, args.device, tta=False, mc_samples=8)
    pipeline = PipelineConfig()
    cache = (
        args.work / "measured"
    )  # facts, features and answers per case: they need the weights, not the guard
    cache.mkdir(exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    counter = iter(range(10**9))

    def record(group: str, name: str, make: Callable[[], Case], label: int | None = None) -> None:
        path = cache / f"{group.replace(' ', '_').replace('/', '-')}__{name}.json"
        if args.measure_only and next(counter) % shards != shard:
            return
        if args.cached_only and not path.exists():
            return
        if path.exists():
            rec = json.loads(path.read_text())
        else:
            try:
                rec = measure(make(), predictor, pipeline, without=group == HELD_OUT)
            except Exception as exc:  # a refused input is never scored: it counts as flagged, with its reason
                rec = {"refused": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            rec["label"] = label
            write_json(path, rec)
        if args.measure_only:
            print(f"{group:22s} {name:28s} measured ({rec.get('seconds', 'refused')} s)", flush=True)
            return
        if "refused" in rec:
            res = {"in_domain": False, "refused": rec["refused"]}
        else:
            features = np.asarray(rec["features"])
            res = {**assess(predictor.guard, rec["facts"], features).to_json(), "seconds": rec["seconds"]}
            res.update({k: rec[k] for k in ("scores", "uncertainty", "label") if k in rec})
        res["case"] = name
        results.setdefault(group, []).append(res)
        for sit, alt in rec.get("without", {}).items():
            verdict = assess(predictor.guard, alt["facts"], np.asarray(alt["features"])).to_json()
            results.setdefault(f"{group}, {sit}", []).append(
                {**verdict, "case": name, "label": rec.get("label"), "scores": alt["scores"]}
                | {"uncertainty": alt["uncertainty"]}
            )
        why = "; ".join(res.get("reasons", [])) or res.get("refused", "")
        print(f"{group:22s} {name:28s} in_domain={res['in_domain']!s:5s} d={res.get('distance')} {why[:160]}")

    if not args.measure_only and predictor.guard is None:
        raise SystemExit(f"{predictor.package}: no domain guard; run `medfusion domain fit` first")
    folders = sorted(p for p in (cohort / "patients").iterdir() if p.is_dir())[: args.n]
    nifti = args.work / "abdomen-nifti"  # the NIfTI alone (its folder also holds the DICOM series)
    nifti.mkdir(exist_ok=True)
    if not (nifti / "ct.nii.gz").exists():
        (nifti / "ct.nii.gz").symlink_to(REAL / "abdomen-ct" / "example_ct.nii.gz")
    from real_head_mr import build  # benchmarks/real_head_mr.py

    from tests.mni_anatomy import mni_dir

    def real_head_mr() -> Case:  # built by the process that measures it, once
        return load_case(build(args.work / "real-head-mr"))

    # interleaved, so that a run stopped early has measured every kind of case
    for i, f in enumerate(folders):
        record(HELD_OUT, f.name, loader(f), truth_label(cohort, f.name))
        if i < (args.variants if args.swapped is None else args.swapped):
            record("swapped CT/MR", f.name, loader(f, _swapped))
        if i < args.variants:
            record("MR given as CT", f.name, loader(f, _mr_as_ct))
            record("5 mm slices", f.name, loader(f, _thick))
            record("noise x5", f.name, loader(f, _noisy))
        if i == 0:
            record("real abdomen CT", "example_ct.nii.gz", loader(nifti))
            record("real abdomen CT", "dicom", loader(REAL / "abdomen-ct" / "dicom"))
            record("real head CT", "ge-head-ct", loader(REAL / "ge-head-ct"))
            if mni_dir() is not None:  # nilearn's wheel carries the template
                record("real head CT + MNI MR", "ge-head-ct+mni152", real_head_mr)
            else:
                print("real head CT + MNI MR skipped: nilearn is not installed")
    if args.measure_only:
        return
    for path in sorted(cache.glob("ct-only__*.json")):  # benchmarks/missing_inputs.py --ct-only
        rec = json.loads(path.read_text())
        verdict = assess(predictor.guard, rec["facts"], np.asarray(rec["features"])).to_json()
        results.setdefault(missing_inputs.CT_ONLY, []).append(
            {**verdict, **{k: rec[k] for k in ("case", "label", "scores", "uncertainty")}}
        )
    summary = {
        g: {
            "n": len(r),
            "flagged": sum(not x["in_domain"] for x in r),
            "refused": sum("refused" in x for x in r),
        }
        for g, r in results.items()
    }
    print()
    for g, s in summary.items():
        print(f"{g:32s} flagged {s['flagged']}/{s['n']} (refused by the loader: {s['refused']})")
    print()
    print(missing_inputs.report(results))
    out = {
        "package": str(predictor.package),
        "version": predictor.meta.version,
        "args": {k: str(v) for k, v in vars(args).items()},
        "summary": summary,
        "cases": results,
    }
    (args.work / "domain_results.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
