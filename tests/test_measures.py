"""Measurements of a label map that the diagnosis reads, and the fit of their logistic term."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medfusion.measure.features import FEATURES, grid_spacing_zyx, lesion_features
from medfusion.models.network import MedFusionNet, NetConfig
from medfusion.text.encoders import Vocabulary
from medfusion.train.diagnosis import fit_measure_model, stack_logits

NAMES = ["background", "tumour_core", "oedema", "calcification"]


def _ball(shape: tuple[int, int, int], centre: tuple[int, int, int], r: float) -> np.ndarray:
    z, y, x = np.indices(shape)
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= r * r


def _f(lab: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict[str, float]:
    return dict(zip(FEATURES, (float(v) for v in lesion_features(lab, spacing, NAMES)), strict=True))


def test_lesion_features_measure_the_lesion_with_most_core() -> None:
    shape = (40, 40, 40)
    lab = np.zeros(shape, np.uint8)
    lab[_ball(shape, (12, 12, 12), 8)] = 2  # lesion A: core radius 4, oedema radius 8
    lab[_ball(shape, (12, 12, 12), 4)] = 1
    lab[_ball(shape, (28, 28, 28), 7)] = 2  # lesion B: core radius 6 with a calcification
    lab[_ball(shape, (28, 28, 28), 6)] = 1
    lab[28, 28, 28] = 3
    lab[2, 38, 2] = 2  # an oedema island with no core: not a lesion
    f = _f(lab)
    assert f["lesion_present"] == 1 and f["lesion_count"] == 2 and f["calcification_present"] == 1
    assert f["core_diameter_mm"] == pytest.approx(12.0, abs=0.6)  # B's core, not A's
    assert f["oedema_radius_ratio"] == pytest.approx(7 / 6, abs=0.06)  # B's ratio, not A's (2.0)
    # anisotropic spacing scales the diameter along that axis only
    assert _f(lab, (2.0, 1.0, 1.0))["core_diameter_mm"] == pytest.approx(24.0, abs=1.0)
    assert np.exp(f["log_core_ml"]) - 1 == pytest.approx((lab == 1).sum() / 1000 + 0.001, rel=1e-6)
    # nothing found: zeros, ratio 1
    empty = _f(np.where(lab == 2, 2, 0).astype(np.uint8))
    assert empty["lesion_present"] == 0 and empty["oedema_radius_ratio"] == 1 and empty["lesion_count"] == 0
    assert grid_spacing_zyx([1.6, 1.7, 2.0]) == (2.0, 1.7, 1.6) and grid_spacing_zyx(2.5) == (2.5,) * 3


def test_measure_term_learns_the_signs_and_the_stacking_weighs_it() -> None:
    """Labels drawn from a known logistic model of two features and the note: the fitted measurement
    term gets those features' signs, and stacking gives it a gain beside a useless image-side logit."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = NetConfig(channels=[4, 8, 16, 32], note_head=True, measures=True)
    model = MedFusionNet(cfg, Vocabulary.fit(["a note"]))
    n = 600
    feats = rng.normal(size=(n, len(FEATURES))).astype(np.float32) * 3 + 10
    note = rng.normal(size=(n, 1)).astype(np.float32)
    z = 1.2 * (feats[:, 1] - 10) / 3 - 1.0 * (feats[:, 3] - 10) / 3 + note[:, 0]
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.float32)[:, None]
    fit = fit_measure_model(model, feats[:400], note[:400], y[:400], c=1.0)
    coef = fit["coef"][0]
    assert (
        coef[1] > 0.5 and coef[3] < -0.4 and max(abs(c) for i, c in enumerate(coef) if i not in (1, 3)) < 0.3
    )
    m = model.measure_logits(torch.from_numpy(feats[400:])).detach().numpy()[:, 0]
    assert roc_auc_score(y[400:, 0], m + note[400:, 0]) > 0.75
    heads = rng.normal(size=(200, model.score_head[0].in_features)).astype(np.float32)
    mfit = fit
    fit = stack_logits(model, heads, note[400:], y[400:], c=100.0, measures=feats[400:], measure_fit=mfit)
    # the stacking weighs the whole measurement model (its note coefficient included) against the image
    assert fit["measure_gain"][0] > 0.5 and fit["head_gain"][0] < 0.3
    assert fit["note_scale"][0] == pytest.approx(fit["measure_gain"][0] * mfit["note_coef"][0], rel=1e-5)
    assert 0.7 < mfit["note_coef"][0] < 1.4  # the note's true coefficient is 1
    assert float(model.measure_gain[0]) == pytest.approx(fit["measure_gain"][0])
    with torch.no_grad():
        h, nt, f = (torch.from_numpy(a) for a in (heads[:3], note[400:403], feats[400:403]))
        assert not torch.allclose(model.score_logits(h, nt, f), model.score_logits(h, nt))
