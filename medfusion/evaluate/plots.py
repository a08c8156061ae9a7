"""Evaluation plots (ROC, PR, reliability, Dice per class, Bland–Altman) and evaluation.pdf."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from reportlab.lib.pagesizes import A4  # noqa: E402
from reportlab.lib.styles import getSampleStyleSheet  # noqa: E402
from reportlab.lib.units import mm  # noqa: E402
from reportlab.platypus import Image, Paragraph, SimpleDocTemplate, Spacer  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from medfusion.evaluate.diagnosis import HEADLINE  # noqa: E402
from medfusion.io.atomic import atomic_path  # noqa: E402
from medfusion.io.pdf_tables import table  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def write_plots_and_pdf(
    out: Path,
    rows: list[dict[str, Any]],
    pairs: dict[str, tuple[np.ndarray, np.ndarray]],
    summary: dict[str, Any],
    *,
    run: str = "",
    model: str = "",
) -> list[Path]:
    """Write the evaluation plots (PNG, one per score and one for segmentation) and evaluation.pdf
    into `out`; `run` and `model` (optional) name what was evaluated in the PDF's header. Returns
    the PNG paths."""
    paths: list[Path] = []
    for s, (y, p) in pairs.items():
        if len(np.unique(y)) < 2:
            continue
        fig, ax = plt.subplots(1, 3, figsize=(11, 3.6), layout="constrained")
        fpr, tpr, _ = roc_curve(y, p)
        ax[0].plot(fpr, tpr)
        ax[0].plot([0, 1], [0, 1], "k--", lw=0.7)
        ax[0].set(title=f"ROC ({s}, n = {len(y)})", xlabel="1 − specificity", ylabel="sensitivity")
        prec, rec, _ = precision_recall_curve(y, p)
        ax[1].plot(rec, prec)
        ax[1].axhline(float(np.mean(y)), color="grey", ls="--", lw=0.7, label="prevalence")
        ax[1].legend(fontsize=7, loc="lower left")
        ax[1].set(title=f"precision–recall ({s})", xlabel="recall", ylabel="precision")
        edges = np.linspace(0, 1, 11)
        idx = np.clip(np.digitize(p, edges[1:-1]), 0, 9)
        bins = [b for b in range(10) if np.any(idx == b)]
        conf = [float(p[idx == b].mean()) for b in bins]
        acc = [float(y[idx == b].mean()) for b in bins]
        ax[2].plot([0, 1], [0, 1], "k--", lw=0.7)
        ax[2].plot(conf, acc, "o-")
        for b, cx, cy in zip(bins, conf, acc, strict=True):  # bin counts: how much each point weighs
            ax[2].annotate(
                f"{int(np.sum(idx == b))}", (cx, cy), textcoords="offset points", xytext=(3, 4), fontsize=7
            )
        ax[2].set(
            title="reliability (n per bin)", xlabel="mean predicted probability", ylabel="observed frequency"
        )
        for a in ax:  # full unit axes: a curve never looks better for a cropped axis
            a.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        paths.append(_save(fig, out / f"diagnosis_{s}.png"))
    classes = list(dict.fromkeys(r["class"] for r in rows))
    if classes:
        fig, ax = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
        data = [[r["dice"] for r in rows if r["class"] == c and r["empty"] != "both"] for c in classes]
        ax[0].boxplot(data, showfliers=False)
        ax[0].set_xticks(
            range(1, len(classes) + 1),
            [f"{c.replace('_', ' ')}\n(n = {len(d)})" for c, d in zip(classes, data, strict=True)],
        )
        for i, d in enumerate(data, start=1):
            ax[0].scatter(
                np.full(len(d), i) + np.random.default_rng(i).uniform(-0.12, 0.12, len(d)), d, s=8, alpha=0.6
            )
        ax[0].set(title="Dice per class (both-empty cases excluded)", ylim=(0, 1.02))
        for k, c in enumerate(classes):  # one colour per class, limits per class
            rs = [r for r in rows if r["class"] == c]
            vp = np.array([r["volume_pred_ml"] for r in rs], float)
            vr = np.array([r["volume_ref_ml"] for r in rs], float)
            diff = vp - vr
            colour = f"C{k}"
            ax[1].scatter(
                (vp + vr) / 2, diff, s=10, color=colour, label=f"{c.replace('_', ' ')} (n = {len(rs)})"
            )
            md, sd = float(diff.mean()), float(diff.std())
            ax[1].axhline(md, color=colour, ls="-", lw=0.8)
            for v in (md + 1.96 * sd, md - 1.96 * sd):
                ax[1].axhline(v, color=colour, ls="--", lw=0.6)
        ax[1].legend(fontsize=7, title="bias (—), ±1.96 SD (--)", title_fontsize=7)
        ax[1].set(
            title="Bland–Altman: volume (mL)",
            xlabel="mean of predicted and reference",
            ylabel="predicted − reference",
        )
        paths.append(_save(fig, out / "segmentation.png"))
    styles = getSampleStyleSheet()
    story: list[Any] = [
        Paragraph("medfusion — evaluation", styles["Title"]),
        Paragraph(
            f"Evaluated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC into {out.name}/. "
            f"Patients: {summary.get('n_patients_predicted', '—')} predicted, "
            f"{summary.get('n_patients_with_reference', '—')} with a reference segmentation, "
            f"{summary.get('n_patients_labelled', '—')} labelled. "
            + (f"Run: {run}. " if run else "")
            + (f"Model: {model}. " if model else "")
            + _domain_sentence(summary)
            + "Each metric states how many cases it averages (n).",
            styles["Normal"],
        ),
    ]
    seg_rows = [
        [
            "class",
            "cases",
            "n (Dice, HD95, NSD)",
            "Dice mean",
            "HD95 mm (median)",
            "NSD mean",
            "both empty",
            "ref empty",
            "pred empty",
        ]
    ]
    for c, b in summary["segmentation"].items():
        fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        seg_rows.append(
            [
                c.replace("_", " "),
                str(b["n_cases"]),
                f"{b['dice']['n']}, {b['hd95_mm']['n']}, {b['nsd']['n']}",
                fmt(b["dice"]["mean"]),
                fmt(b["hd95_mm"]["median"]),
                fmt(b["nsd"]["mean"]),
                str(b["n_both_empty"]),
                str(b["n_ref_empty"]),
                str(b["n_pred_empty"]),
            ]
        )
    story += [
        Paragraph("Segmentation", styles["Heading2"]),
        table(seg_rows, [24, 13, 24, 17, 22, 17, 17, 15, 15]),
    ]
    if "diagnosis" in summary:
        drows = [["score", "metric", "value", "95 % CI"]]
        per_score = dict(summary["diagnosis"]["per_score"])
        for s, d in list(per_score.items()):
            if "in_domain" in d:
                per_score[f"{s} (in domain)"] = d["in_domain"]
        for s, d in per_score.items():
            for m in (*HEADLINE, "accuracy@model", "sensitivity@model", "specificity@model"):
                v = d[m]
                drows.append(
                    [
                        s,
                        m,
                        "—" if v["value"] is None else f"{v['value']:.3f}",
                        "—" if v["ci_low"] is None else f"{v['ci_low']:.3f} – {v['ci_high']:.3f}",
                    ]
                )
                if m == "ece" and "calibrated_null" in v:
                    z = v["calibrated_null"]
                    drows.append(
                        [
                            s,
                            "ece if calibrated",
                            f"{z['median']:.3f}",
                            f"95th pct {z['p95']:.3f}, p = {z['p_value']:.2f}",
                        ]
                    )
        story += [Paragraph("Diagnosis", styles["Heading2"]), table(drows, [30, 48, 25, 40])]
    for png in paths:
        img = Image(str(png))
        img.drawWidth, img.drawHeight = 180 * mm, 180 * mm * img.imageHeight / img.imageWidth
        story += [Spacer(1, 4 * mm), img]
    with atomic_path(out / "evaluation.pdf") as tmp:
        SimpleDocTemplate(str(tmp), pagesize=A4, leftMargin=14 * mm, rightMargin=14 * mm).build(story)
    return paths


def _domain_sentence(summary: dict[str, Any]) -> str:
    """How many evaluated patients the domain guard flagged, for the evaluation PDF's first paragraph."""
    dom = summary.get("domain") or {}
    if not dom.get("n_flagged"):
        return ""
    return (
        f"Domain guard: {dom['n_flagged']} patients flagged (outside the model's training domain, no "
        f"decision given); the diagnosis table gives each score over all cases and again over the "
        f"{dom['n_in_domain'] + dom['n_not_recorded']} others ('in domain'). "
    )
