"""The domain guard of a model package on in-domain and out-of-domain inputs (issue #25).

For each case the guard's check is run exactly as `medfusion run` runs it — load, register and prepare
with the run's preprocessing, the package's input-fact rules, and the Mahalanobis distance of the
encoder features — except that the features come from the encoder alone over the same windows
(`infer.windowed.encoder_features`, what `medfusion domain fit` fits on) rather than from a full
inference, so a case costs a registration and an encoder pass, not minutes of TTA and MC dropout.

Cases:
- held-out in-domain: a synthetic cohort of a seed used neither in training nor in fitting the guard;
- real abdomen CT (NIfTI, and the DICOM series) and the real GE head CT (`../shared/real-data/`);
- synthetic patients with CT and MR swapped; an MR given as CT (no MR); the CT resampled to 5 mm
  slices; the CT with 5× its noise.

    python benchmarks/domain.py --work /tmp/domain-bench --n 20 [--package PKG] [--seed 13013]

Prints a table and writes WORK/domain_results.json. Each case's facts and features are kept in
WORK/measured/ (they depend on the weights, not on the guard): `--measure-only` fills it while the guard
is being fitted, a later run only checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfusion.config import PipelineConfig
from medfusion.infer.predictor import Predictor
from medfusion.infer.windowed import encoder_features
from medfusion.io.case import Case, load_case
from medfusion.io.volume import Volume
from medfusion.models.domain import assess, case_facts
from medfusion.models.network import channels_last
from medfusion.preprocess.prepare import prepare_case
from medfusion.preprocess.resample import resample
from medfusion.run.pipeline import run_preprocess_config

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-data"


def measure(case: Case, predictor: Predictor, pipeline: PipelineConfig) -> dict[str, Any]:
    """What the guard reads of one case: its input facts and encoder features (module docstring)."""
    t0 = time.perf_counter()
    tensors = prepare_case(case, run_preprocess_config(pipeline, predictor.meta))
    mr_used = bool(tensors.has_mr and (tensors.registration is None or tensors.registration.passed))
    dev = predictor.device
    feats = encoder_features(
        predictor.model,
        channels_last(torch.from_numpy(tensors.ct).float()[None].to(dev)),
        channels_last(torch.from_numpy(tensors.mr).float()[None].to(dev)),
        torch.tensor([mr_used], device=dev),
        predictor.roi,
        predictor.window_overlap,
        predictor.sw_batch_size,
    )
    return {
        "facts": case_facts(case, mr_used),
        "features": feats.tolist(),
        "seconds": round(time.perf_counter() - t0, 1),
    }


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
    grid = Volume(
        np.zeros((nz, *ct.shape[1:]), np.float32),
        (ct.spacing[0], ct.spacing[1], mm),
        ct.origin,
        ct.direction,
        "GRID",
    )
    thick = resample(ct, grid, default=-1024.0)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--package", type=Path, default=None)
    ap.add_argument("--n", type=int, default=20, help="held-out in-domain patients")
    ap.add_argument("--seed", type=int, default=13013, help="seed of the held-out cohort (never trained on)")
    ap.add_argument("--variants", type=int, default=3, help="patients per synthetic out-of-domain variant")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--measure-only", action="store_true", help="measure the cases, check nothing yet")
    args = ap.parse_args()
    from medfusion.synth.generate import generate_cohort

    torch.set_num_threads(2)
    cohort = args.work / f"heldout-{args.seed}"
    if not (cohort / "patients").exists():
        generate_cohort(cohort, args.n, seed=args.seed, preset="standard", workers=1)
    predictor = Predictor(args.package, args.device, tta=False, mc_samples=0)
    pipeline = PipelineConfig()
    cache = args.work / "measured"  # facts and features per case: they need the weights, not the guard
    cache.mkdir(exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}

    def record(group: str, name: str, make: Callable[[], Case]) -> None:
        path = cache / f"{group.replace(' ', '_').replace('/', '-')}__{name}.json"
        if path.exists():
            rec = json.loads(path.read_text())
        else:
            try:
                rec = measure(make(), predictor, pipeline)
            except Exception as exc:  # a refused input is never scored: it counts as flagged, with its reason
                rec = {"refused": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            path.write_text(json.dumps(rec))
        if args.measure_only:
            print(f"{group:22s} {name:28s} measured ({rec.get('seconds', 'refused')} s)", flush=True)
            return
        if "refused" in rec:
            res = {"in_domain": False, "refused": rec["refused"]}
        else:
            features = np.asarray(rec["features"])
            res = {**assess(predictor.guard, rec["facts"], features).to_json(), "seconds": rec["seconds"]}
        res["case"] = name
        results.setdefault(group, []).append(res)
        why = "; ".join(res.get("reasons", [])) or res.get("refused", "")
        print(f"{group:22s} {name:28s} in_domain={res['in_domain']!s:5s} d={res.get('distance')} {why[:160]}")

    if not args.measure_only and predictor.guard is None:
        raise SystemExit(f"{predictor.package}: no domain guard; run `medfusion domain fit` first")
    folders = sorted(p for p in (cohort / "patients").iterdir() if p.is_dir())[: args.n]
    for f in folders:
        record("held-out in-domain", f.name, loader(f))
    for f in folders[: args.variants]:
        record("swapped CT/MR", f.name, loader(f, _swapped))
        record("MR given as CT", f.name, loader(f, _mr_as_ct))
        record("5 mm slices", f.name, loader(f, _thick))
        record("noise x5", f.name, loader(f, _noisy))
    nifti = args.work / "abdomen-nifti"  # the NIfTI alone (its folder also holds the DICOM series)
    nifti.mkdir(exist_ok=True)
    if not (nifti / "ct.nii.gz").exists():
        (nifti / "ct.nii.gz").symlink_to(REAL / "abdomen-ct" / "example_ct.nii.gz")
    record("real abdomen CT", "example_ct.nii.gz", loader(nifti))
    record("real abdomen CT", "dicom", loader(REAL / "abdomen-ct" / "dicom"))
    record("real head CT", "ge-head-ct", loader(REAL / "ge-head-ct"))
    if args.measure_only:
        return
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
        print(f"{g:22s} flagged {s['flagged']}/{s['n']} (refused by the loader: {s['refused']})")
    out = {
        "package": str(predictor.package),
        "version": predictor.meta.get("version"),
        "args": {k: str(v) for k, v in vars(args).items()},
        "summary": summary,
        "cases": results,
    }
    (args.work / "domain_results.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
