"""Evaluation plots (ROC, PR, reliability, Dice per class, Bland–Altman) and evaluation.pdf."""

from __future__ import annotations

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
from medfusion.report.pdf import table  # noqa: E402


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
) -> list[Path]:
    paths: list[Path] = []
    for s, (y, p) in pairs.items():
        if len(np.unique(y)) < 2:
            continue
        fig, ax = plt.subplots(1, 3, figsize=(11, 3.4))
        fpr, tpr, _ = roc_curve(y, p)
        ax[0].plot(fpr, tpr)
        ax[0].plot([0, 1], [0, 1], "k--", lw=0.7)
        ax[0].set(title=f"ROC {s}", xlabel="1 − specificity", ylabel="sensitivity")
        prec, rec, _ = precision_recall_curve(y, p)
        ax[1].plot(rec, prec)
        ax[1].set(title=f"precision–recall {s}", xlabel="recall", ylabel="precision")
        edges = np.linspace(0, 1, 11)
        idx = np.clip(np.digitize(p, edges[1:-1]), 0, 9)
        conf = [p[idx == b].mean() for b in range(10) if np.any(idx == b)]
        acc = [y[idx == b].mean() for b in range(10) if np.any(idx == b)]
        ax[2].plot([0, 1], [0, 1], "k--", lw=0.7)
        ax[2].plot(conf, acc, "o-")
        ax[2].set(title="reliability", xlabel="mean predicted probability", ylabel="observed frequency")
        paths.append(_save(fig, out / f"diagnosis_{s}.png"))
    classes = list(dict.fromkeys(r["class"] for r in rows))
    if classes:
        fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
        data = [[r["dice"] for r in rows if r["class"] == c and r["empty"] != "both"] for c in classes]
        ax[0].boxplot(data, showfliers=False)
        ax[0].set_xticks(range(1, len(classes) + 1), classes)
        for i, d in enumerate(data, start=1):
            ax[0].scatter(
                np.full(len(d), i) + np.random.default_rng(i).uniform(-0.12, 0.12, len(d)), d, s=8, alpha=0.6
            )
        ax[0].set(title="Dice per class", ylim=(0, 1.02))
        vp = np.array([r["volume_pred_ml"] for r in rows])
        vr = np.array([r["volume_ref_ml"] for r in rows])
        mean, diff = (vp + vr) / 2, vp - vr
        ax[1].scatter(mean, diff, s=10)
        md, sd = float(diff.mean()), float(diff.std())
        for v, ls in ((md, "-"), (md + 1.96 * sd, "--"), (md - 1.96 * sd, "--")):
            ax[1].axhline(v, color="grey", ls=ls, lw=0.8)
        ax[1].set(
            title="Bland–Altman: volume (mL)",
            xlabel="mean of predicted and reference",
            ylabel="predicted − reference",
        )
        paths.append(_save(fig, out / "segmentation.png"))
    styles = getSampleStyleSheet()
    story: list[Any] = [Paragraph("medfusion — evaluation", styles["Title"])]
    seg_rows = [
        [
            "class",
            "cases",
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
                c,
                str(b["n_cases"]),
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
        table(seg_rows, [30, 14, 20, 28, 20, 20, 18, 20]),
    ]
    if "diagnosis" in summary:
        drows = [["score", "metric", "value", "95 % CI"]]
        for s, d in summary["diagnosis"]["per_score"].items():
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
