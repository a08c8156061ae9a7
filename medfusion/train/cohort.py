"""What a training run trains on: its cohort cached (train/data.py), split by patient into training and
validation cases with their 0/1 score labels, and the run's word list for the note encoder, stored in
OUT/vocabulary.json so that a resumed or re-packaged run keeps the word ids its weights learned."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.io.atomic import write_json
from medfusion.models.meta import PackageMeta, package_vocabulary
from medfusion.text.encoders import Vocabulary
from medfusion.train import distributed
from medfusion.train.config import TrainConfig
from medfusion.train.data import build_cache, load_cached, read_labels_csv, split_patients
from medfusion.train.diagnosis import read_note_corpus
from medfusion.train.distributed import rank


def training_cases(cfg: TrainConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Cache the cohort `cfg.data` names (rank 0; a case that cannot be prepared is skipped with a
    printed reason; the other ranks wait), split the cached, labelled patients into training and
    validation (`cfg.data.val_fraction`, seeded by `cfg.seed`), and load both.

    Returns:
        (training cases, validation cases): each case as `load_cached` gives it plus "scores", float32
        (n_scores,) 0/1 in `cfg.score_names` order.

    Raises:
        InputError: labels.csv is missing, lacks a score column or holds a value other than 0/1.
        FileNotFoundError: the patients folder does not exist.
    """
    patients = Path(cfg.data.patients)
    folders = sorted(p for p in patients.iterdir() if p.is_dir())
    if cfg.data.limit:
        folders = folders[: cfg.data.limit]
    labels = read_labels_csv(Path(cfg.data.labels) / "labels.csv", cfg.score_names)
    cache = Path(cfg.data.cache)
    if rank() == 0:
        recs = build_cache(
            folders,
            Path(cfg.data.labels),
            cfg.preprocess,
            cache,
            cfg.workers,
            Path(cfg.data.registration_from) if cfg.data.registration_from else None,
        )
        failed = [r for r in recs if "error" in r]
        for r in failed:
            print(f"skipped {r['patient_id']}: {r['error']}")
    distributed.barrier()
    pids = [f.name for f in folders if (cache / f"{f.name}.npz").exists() and f.name in labels]
    train_ids, val_ids = split_patients(pids, cfg.data.val_fraction, cfg.seed)

    def load(pid: str) -> dict[str, Any]:
        return {
            **load_cached(cache, pid),
            "scores": np.array([labels[pid][s] for s in cfg.score_names], np.float32),
        }

    return [load(p) for p in train_ids], [load(p) for p in val_ids]


def run_vocabulary(
    cfg: TrainConfig,
    out: Path,
    train: list[dict[str, Any]],
    source_meta: Callable[[], PackageMeta],
) -> Vocabulary:
    """The run's word list: OUT/vocabulary.json when there is one; else the `init_from` package's
    (`source_meta` gives its typed model.json, called only then), or one fitted on the training cases' notes.
    A fresh run with a note corpus fits it on the corpus too (words the image cohort's notes never use
    would otherwise all be unknown). Rank 0 stores a new word list in OUT/vocabulary.json."""
    path = out / "vocabulary.json"
    if path.exists():
        rec = json.loads(path.read_text())
        return Vocabulary(rec["words"], negation=rec["negation"], numbers=rec["numbers"])
    if cfg.init_from:
        vocab = package_vocabulary(source_meta())
    else:
        notes = [r["note"] for r in train]
        d = cfg.diagnosis
        fresh = not (out / "checkpoint" / "state.json").exists() and not (out / "best.safetensors").exists()
        if fresh and d.note_corpus and d.note_epochs > 0 and cfg.network.note_head:
            notes += read_note_corpus(d.note_corpus, cfg.score_names)[0]
        vocab = Vocabulary.fit(notes)
    if rank() == 0:
        write_json(path, {"words": vocab.words[2:], "negation": vocab.negation, "numbers": vocab.numbers})
    return vocab
