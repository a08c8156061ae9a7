"""What the one lesion definition (#29) does to a model whose measurement term was fitted on regions:
the diagnosis's measurement features and probability per patient, before and after, without running
the network again.

python benchmarks/lesion_definition.py RUN [RUN …] [--package PKG] [--detection RUN LABELS …]

(e.g. RUN from `medfusion run sample_data/patients --out RUN` with the package of that run)

Each RUN is a `medfusion run` output folder. For every patient with a `segmentation.nii.gz` and
"score_features" in its scores.json:

1. the label map (on the CT's grid) is resampled nearest-neighbour onto the package's model grid
   (`preprocess.resample.model_grid`), where the predictor measures the features; this stands in for
   the network's own model-grid argmax, which a run does not keep;
2. the features are computed there the old way (`features_on_regions` below, the pre-#29 code kept
   as the baseline: a lesion = a 26-connected foreground region holding core, whatever the number of
   cores in it) and the new way (`measure.features.lesion_features`: regions split by core);
3. the probability after is the run's own probability moved by the change of the measurement term:
   p' = sigmoid((T·logit(p) + g·(m(f_new) − m(f_old))) / T), with the package's temperature T, gain g
   and standardised linear term m (`MedFusionNet.score_logits`: the term is added to the logit).

With `--detection`, evaluation's lesion detection is compared too: per-class 26-connected components
(before) against the lesions medfusion reports (after), summed over the run's patients. It also times the
two feature computations per patient and prints the median ratio new/old. The old
features on the resampled map are printed beside the run's recorded ones ("rec"): where they
differ, step 1's stand-in is not the network's map, and the p' of that patient is approximate.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from medfusion.evaluate.segmentation import lesion_detection
from medfusion.io.nifti import read_nifti
from medfusion.io.volume import LabelMap
from medfusion.measure.features import FEATURES, lesion_features
from medfusion.measure.lesions import (
    CONNECTIVITY,
    axial_diameters_mm,
    bidimensional_mm,
    box_grid,
    class_roles,
    components,
    feret_diameter_mm,
    label_lesions,
    lesion_regions,
    slices_are_axial,
)
from medfusion.models.meta import PackageMeta
from medfusion.package.store import DEFAULT_PACKAGE, load_package
from medfusion.preprocess.resample import model_grid

SHORT = ("present", "core_mm", "oed_ratio", "calc", "log_core", "log_oed", "count")


def features_on_regions(
    labels: np.ndarray, spacing_zyx: tuple[float, ...], class_names: list[str]
) -> np.ndarray:
    """The baseline: the measurement features as 0.7.1 was fitted and run (before #29), on
    26-connected foreground regions holding core; the "main lesion" is the region with the most core +
    calcification, its core diameter spanning every core in it."""
    core_k, calc_k = class_roles(class_names)
    out = np.zeros(len(FEATURES), np.float32)
    comp, with_core = lesion_regions(labels, core_k)
    n = int(comp.max())
    if len(with_core) == 0:
        out[FEATURES.index("oedema_radius_ratio")] = 1.0
        return out
    calc = np.zeros(labels.shape, bool) if calc_k is None else labels == calc_k
    solid = (labels == core_k) | calc
    ml = float(np.prod(spacing_zyx)) / 1000.0
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    solid_sizes = np.bincount(comp[solid], minlength=n + 1)
    main = int(with_core[np.argmax(solid_sizes[with_core])])
    lesion = np.zeros(n + 1, bool)
    lesion[with_core] = True
    box = ndimage.find_objects(comp, max_label=main)[main - 1]
    n_solid = int(solid_sizes[lesion].sum())
    out[:] = [
        1.0,
        feret_diameter_mm(solid[box] & (comp[box] == main), spacing_zyx),
        (sizes[main] / max(int(solid_sizes[main]), 1)) ** (1.0 / 3.0),
        float(bool(lesion[comp[calc]].any())),
        np.log1p(n_solid * ml),
        np.log1p(float(sizes[lesion].sum() - n_solid) * ml),
        float(len(with_core)),
    ]
    return out


def axial_before_after(
    on_ct: LabelMap, names: list[str]
) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Per lesion (largest first): RANO's pair read on the grid's own k-slices (before #29) and on the
    patient's axial plane (`axial_diameters_mm`), mm."""
    found = label_lesions(on_ct.array, names, on_ct.spacing_zyx)
    boxes = found.boxes()
    out = []
    for k in found.ids.tolist():
        box = boxes[k - 1]
        assert box is not None
        core = (found.components[box] == k) & found.solid[box]
        z = int(np.argmax(core.sum(axis=(1, 2))))
        sp = on_ct.spacing_zyx
        d1, d2 = bidimensional_mm(core[z], (sp[1], sp[2]))
        out.append(((d1, max(d2, min(sp[1:]))), axial_diameters_mm(core, box_grid(on_ct.grid, box))))
    return out


def detection_on_components(pred: np.ndarray, ref: np.ndarray, ref_any: np.ndarray) -> dict[str, int]:
    """The baseline detection (before #29) for one class: 26-connected components of the class's masks."""
    rl, nr = components(ref)
    pl, npd = components(pred)
    tp = len(set(np.unique(rl[pred & ref]).tolist()) - {0})
    matched = set(np.unique(pl[pred & ref]).tolist()) - {0}
    near = ndimage.binary_dilation(ref_any, structure=CONNECTIVITY)
    touching = set(np.unique(pl[pred & near]).tolist()) - {0}
    return {
        "lesions_tp": tp,
        "lesions_fn": nr - tp,
        "lesions_fp": npd - len(matched),
        "lesions_fp_isolated": npd - len(matched | touching),
    }


def detection_before_after(run: Path, labels: Path, names: list[str]) -> None:
    """Evaluation's lesion detection summed over a run's patients: per-class components (before)
    against the lesions medfusion reports (`evaluate.segmentation.lesion_detection`, after)."""
    keys = ("lesions_tp", "lesions_fn", "lesions_fp", "lesions_fp_isolated")
    before = {(n, k): 0 for n in names[1:] for k in keys}
    after = dict(before)
    for seg in sorted(run.glob("*/segmentation.nii.gz")):
        ref_path = labels / seg.parent.name / "segmentation.nii.gz"
        if not ref_path.exists():
            continue
        pred = LabelMap.of(read_nifti(seg))
        ref = LabelMap.of(read_nifti(ref_path))
        if not pred.same_grid(ref, tol=1e-3):
            ref = ref.resample_to(pred.grid)
        pa, ra = pred.array.astype(np.int64), ref.array.astype(np.int64)
        new = lesion_detection(pa, ra, names, pred.spacing_zyx)
        for c, n in enumerate(names[1:], start=1):
            old = detection_on_components(pa == c, ra == c, ra > 0)
            for k in keys:
                before[(n, k)] += old[k]
                after[(n, k)] += new[n][k]
    print(f"\ndetection {run.name} against {labels}: before -> after (summed over patients)")
    for n in names[1:]:
        print(f"  {n:>14}: " + ", ".join(f"{k[8:]} {before[(n, k)]} -> {after[(n, k)]}" for k in keys))


def _logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="medfusion run output folders")
    ap.add_argument("--package", type=Path, default=DEFAULT_PACKAGE, help="the model package the runs used")
    ap.add_argument(
        "--detection",
        nargs=2,
        action="append",
        default=[],
        type=Path,
        metavar=("RUN", "LABELS"),
        help="also compare evaluation's lesion detection on RUN against the labels folder LABELS",
    )
    args = ap.parse_args()
    model, raw = load_package(args.package)
    meta = PackageMeta.of(raw, args.package / "model.json")
    names = list(meta.class_names)
    score = meta.score_names[0]
    gain = float(model.measure_gain[0])
    temp = float(model.temperature[0])
    pre = meta.preprocess

    def term(f: np.ndarray) -> float:
        with torch.no_grad():
            return float(model.measure_logits(torch.from_numpy(f)[None])[0, 0])

    rows = []
    seconds: list[tuple[float, float]] = []  # (old, new) per patient
    tilted: list[tuple[str, LabelMap]] = []  # CT grids whose slices are not axial
    for run in args.runs:
        for scores_path in sorted(run.glob("*/scores.json")):
            folder = scores_path.parent
            scores = json.loads(scores_path.read_text())
            seg = folder / "segmentation.nii.gz"
            if not seg.exists() or not scores.get("score_features"):
                continue
            on_ct = LabelMap.of(read_nifti(seg))
            grid = model_grid(on_ct.grid, pre.target_spacing_mm, pre.target_size)
            lab = on_ct.resample_to(grid).array.astype(np.int64)
            t0 = time.perf_counter()
            old = features_on_regions(lab, grid.spacing_zyx, names)
            t1 = time.perf_counter()
            new = lesion_features(lab, grid.spacing_zyx, names)
            seconds.append((t1 - t0, time.perf_counter() - t1))
            rec = np.array([scores["score_features"][n] for n in FEATURES], np.float32)
            p = float(scores["probabilities"][score])
            delta = gain * (term(new) - term(old))
            p_new = 1.0 / (1.0 + math.exp(-(temp * _logit(p) + delta) / temp))
            if not slices_are_axial(on_ct.grid):
                tilted.append((f"{run.name}/{folder.name}", on_ct))
            rows.append(
                (f"{run.name}/{folder.name}", rec, old, new, p, p_new, scores["measurements"]["lesion_count"])
            )

    print(f"package {meta.name} {meta.version}: gain {gain:.4f}, temperature {temp:.4f}")
    print("features: " + ", ".join(f"{s} = {n}" for s, n in zip(SHORT, FEATURES, strict=True)))
    for name, rec, old, new, p, p_new, n_meas in rows:
        print(f"\n{name}  (scores.json measurements: {n_meas} lesions)")
        print("  " + " ".join(f"{s:>9}" for s in ("", *SHORT)))
        for label, f in (("rec", rec), ("old", old), ("new", new)):
            print("  " + f"{label:>9}" + " ".join(f"{v:9.3f}" for v in f))
        print(f"  p {p:.4f} -> {p_new:.4f} (Δ {p_new - p:+.4f})")
    changed = [r for r in rows if not np.allclose(r[2], r[3], atol=1e-4)]
    moved = [r for r in rows if abs(r[5] - r[4]) > 0.01]
    stand_in = [r for r in rows if not np.allclose(r[1], r[2], atol=0.05, rtol=0.01)]
    ratios = [float(r[3][1] / r[2][1]) for r in rows if r[2][1] > 0]
    split = [r for r in rows if r[3][6] > r[2][6]]  # a region holding several cores became several lesions
    print(f"\n{len(rows)} patients; features changed on {len(changed)}; p moved by > 0.01 on {len(moved)}")
    print(
        f"patients with a multi-core region: {len(split)}; features changed without one: {len(set(r[0] for r in changed) - set(r[0] for r in split))}"
    )
    print(
        f"median |Δp| {np.median([abs(r[5] - r[4]) for r in rows]):.4f}, max {max(abs(r[5] - r[4]) for r in rows):.4f}"
    )
    if ratios:
        print(f"core diameter new/old: median {np.median(ratios):.3f}, min {min(ratios):.3f}")
    old_s, new_s = np.median([s[0] for s in seconds]), np.median([s[1] for s in seconds])
    print(
        f"time per patient (model grid): old {old_s:.3f} s, new {new_s:.3f} s median, new/old {new_s / old_s:.2f}x"
    )
    print(f"the resampled map's old features differ from the recorded ones on {len(stand_in)} patients")
    for r in changed:
        print(
            f"  changed: {r[0]}: count {r[2][6]:.0f} -> {r[3][6]:.0f}, core {r[2][1]:.1f} -> {r[3][1]:.1f} mm, p {r[4]:.3f} -> {r[5]:.3f}"
        )

    for (
        name,
        on_ct,
    ) in tilted:  # RANO's axial pair (#29 step 4): the grid's slices against the patient's axial plane
        t0 = time.perf_counter()
        pairs = axial_before_after(on_ct, names)
        cos = abs(float(on_ct.direction[2, 2]))
        print(
            f"\n{name}: slices {np.degrees(np.arccos(min(cos, 1.0))):.1f}° off axial; {len(pairs)} lesions ({time.perf_counter() - t0:.2f} s)"
        )
        for i, (before, after) in enumerate(pairs[:8], start=1):
            print(
                f"  lesion {i}: k-slice {before[0]:.1f} × {before[1]:.1f} mm -> axial {after[0]:.1f} × {after[1]:.1f} mm"
            )
        d = np.array([[a[0] - b[0], a[1] - b[1]] for b, a in pairs])
        print(
            f"  |Δ| long / short: median {np.median(abs(d[:, 0])):.1f} / {np.median(abs(d[:, 1])):.1f} mm, max {abs(d[:, 0]).max():.1f} / {abs(d[:, 1]).max():.1f} mm"
        )

    for run, labels in args.detection:
        detection_before_after(run, labels, names)


if __name__ == "__main__":
    main()
