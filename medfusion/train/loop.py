"""The training loop: one run from a `TrainConfig` to a model package.

`train` starts (or joins, under torchrun) the process group and runs a `Trainer`: the cohort is cached
and split by patient (train/data.py), batches are made from crops (train/batches.py), each step adds the
segmentation loss (train/losses.py) and the diagnosis BCE (and, with a teacher, a distillation term);
every epoch is validated the way inference runs, checkpointed, and the best one kept (early stopping,
resume, a graceful STOP file). At the end rank 0 runs the diagnosis stage (train/diagnosis.py), fits the
temperature (train/temperature.py), writes the package and fits its domain guard (train/domain.py).
Configs are in train/config.py, DDP helpers in train/distributed.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.utils import set_determinism
from safetensors.torch import load_file, save_file

from medfusion.evaluate.segmentation import dice
from medfusion.infer.windowed import default_sw_batch_size, forward_case
from medfusion.io.atomic import atomic_path, write_json
from medfusion.measure.features import grid_spacing_zyx, lesion_features
from medfusion.models.network import MedFusionNet, channels_last
from medfusion.models.package import load_package, package_vocabulary, save_package
from medfusion.text.encoders import Vocabulary
from medfusion.train import distributed
from medfusion.train.batches import (
    BatchStream,
    batch_loader,
    epoch_plan,
    image_augment,
    make_batch,
    to_tensor,
)
from medfusion.train.config import TrainConfig
from medfusion.train.data import build_cache, load_cached, read_labels_csv, split_patients
from medfusion.train.diagnosis import (
    fit_measure_model,
    fit_score_head,
    mean_auroc,
    mean_brier,
    pretrain_note_head,
    read_note_corpus,
    stack_logits,
    training_heads,
)
from medfusion.train.distributed import process_device, rank, world_size
from medfusion.train.losses import segmentation_loss
from medfusion.train.temperature import fit_temperature

# `medfusion.cli` imports these from here
__all__ = ["ARRAYS", "LATE_FUSION_KEYS", "TrainConfig", "Trainer", "process_device", "train"]

# state keys fitted by the diagnosis stage (network.note_head, network.measures), absent from checkpoints
# made without them
LATE_FUSION_KEYS = ("note_text.", "note_logit.", "note_scale", "head_gain", "head_bias", "measure_")


def dice_per_class(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> list[float]:
    """`evaluate.segmentation.dice` (2|P∩R| / (|P| + |R|)) per foreground class 1 … n_classes − 1 of two
    label maps of the same shape, but NaN where both are empty (evaluate scores that 1, for a cohort
    report), so that the selection score's mean leaves such a class out rather than rewarding it."""
    out = []
    for k in range(1, n_classes):
        a, b = pred == k, ref == k
        out.append(dice(a, b) if a.any() or b.any() else float("nan"))
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


# --- Loop ---


# validation outputs that are arrays (kept out of the logged metrics)
ARRAYS = ("logits", "heads", "note_logits", "measures", "calibration_logits")


class Trainer:
    """One training run of `cfg` into the folder `out` (one rank of it under torchrun).

    `out` receives train.jsonl (one record per epoch and per diagnosis-stage step, rank 0 only),
    vocabulary.json, best.safetensors, checkpoint/ (model, optimiser, state), diagnosis_inputs.npz,
    summary.json, ddp_check.json (several ranks) and package/ (the model package). A file STOP in `out`
    ends training after the current epoch, and the best checkpoint so far is packaged.

    Raises (at construction): what `process_device` raises for `cfg.device`.
    """

    def __init__(self, cfg: TrainConfig, out: Path) -> None:
        self.cfg = cfg
        self.out = out
        self.device = process_device(cfg.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        torch.set_num_threads(max(1, cfg.threads))
        self._source: tuple[MedFusionNet, dict[str, Any]] | None = None
        self.spacing_zyx = grid_spacing_zyx(cfg.preprocess.target_spacing_mm)

    def log(self, rec: dict[str, Any]) -> None:
        """Append `rec` as one JSON line to OUT/train.jsonl (rank 0 only)."""
        if rank() != 0:
            return
        with open(self.out / "train.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def prepare(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Vocabulary]:
        """Cache the cohort (rank 0; a case that cannot be prepared is skipped with a printed reason),
        split the cached, labelled patients into training and validation, and load both.

        Returns:
            (training cases, validation cases, word list): each case as `load_cached` gives it plus
            "scores", float32 (n_scores,) 0/1 in `score_names` order.

        Raises:
            InputError: labels.csv is missing, lacks a score column or holds a value other than 0/1.
        """
        cfg = self.cfg
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

        train = [load(p) for p in train_ids]
        val = [load(p) for p in val_ids]
        return train, val, self._vocabulary(train)

    def _vocabulary(self, train: list[dict[str, Any]]) -> Vocabulary:
        """The run's word list: stored in OUT/vocabulary.json when first fitted, so that a resumed or
        re-packaged run uses the ids its weights were trained with. A fresh run with a note corpus fits it
        on the corpus too (words the image cohort's notes never use would otherwise all be unknown)."""
        path = self.out / "vocabulary.json"
        if path.exists():
            rec = json.loads(path.read_text())
            return Vocabulary(rec["words"], negation=rec["negation"], numbers=rec["numbers"])
        if self.cfg.init_from:
            vocab = package_vocabulary(self._source_package()[1])
        else:
            notes = [r["note"] for r in train]
            d = self.cfg.diagnosis
            fresh = (
                not (self.out / "checkpoint" / "state.json").exists()
                and not (self.out / "best.safetensors").exists()
            )
            if fresh and d.note_corpus and d.note_epochs > 0 and self.cfg.network.note_head:
                notes += read_note_corpus(d.note_corpus, self.cfg.score_names)[0]
            vocab = Vocabulary.fit(notes)
        if rank() == 0:
            write_json(path, {"words": vocab.words[2:], "negation": vocab.negation, "numbers": vocab.numbers})
        return vocab

    def run(self, *, resume: bool = False, package_only: bool = False) -> dict[str, Any]:
        """Train, then package the best checkpoint with a temperature fitted on the validation split.

        Args:
            resume: continue from OUT/checkpoint when there is one (else start afresh).
            package_only: skip training and (re)package OUT/best.safetensors.

        Returns:
            On rank 0 the summary written to OUT/summary.json: {"validation": final validation metrics
            ("dice" per foreground class, "auroc", "brier" after the temperature), "temperature": one per
            score, "package": its folder}; on other ranks the last epoch's record or {}.

        Raises:
            FileNotFoundError: `package_only` without OUT/best.safetensors.
            ValueError: `init_from`/`distill_from` packages that do not fit the config, unknown
                `trainable` prefixes.
            RuntimeError: a checkpoint that does not fit the network.
        """
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        # MONAI's set_determinism seeds Python, NumPy and torch and puts cuDNN in deterministic mode; the
        # augmentation's MONAI transforms keep a random state of their own, seeded in image_augment
        set_determinism(seed=cfg.seed)
        train, val, vocab = self.prepare()
        model = MedFusionNet(cfg.network, vocab).to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        trained = self._trainable(model)
        teacher = self._teacher() if cfg.distill_weight > 0 and not package_only else None
        ddp_model: torch.nn.Module = model
        if world_size() > 1:
            ddp_model = torch.nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.steps_per_epoch or max(1, len(train) // (cfg.batch_size * world_size()))
        total_steps = cfg.epochs * steps
        warm = max(1, total_steps // 10)

        def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 2 % of the peak
            if step < warm:
                return (step + 1) / warm
            frac = min(1.0, (step - warm) / max(1, total_steps - warm))
            return float(0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * frac)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        seg_loss = segmentation_loss(cfg, self.device)
        bce = torch.nn.BCEWithLogitsLoss()
        start_epoch, best, bad = 0, -np.inf, 0
        ckpt = self.out / "checkpoint"
        if cfg.init_from and not (resume and (ckpt / "state.json").exists()) and not package_only:
            self._init_from(model, cfg.init_from)
            # the starting weights are the first candidate: fine-tuning never ships a model that
            # validates worse than the one it started from
            if rank() == 0:
                metrics = self.validate(model, val[: cfg.data.val_per_epoch])
                best = self._selection_score(metrics)
                self._save_weights(model, self.out / "best.safetensors")
                rec = {"epoch": -1, "init_from": cfg.init_from, "dice": metrics["dice"]}
                self.log({**rec, "auroc": metrics["auroc"], "brier": metrics["brier"]})
        if resume and (ckpt / "state.json").exists():
            self._load_weights(model, ckpt / "model.safetensors")
            state = json.loads((ckpt / "state.json").read_text())
            try:
                opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
            except ValueError:  # the network gained parameters (a note head) since the checkpoint
                print(f"{ckpt}: optimizer state does not fit the network; its moments start afresh")
            start_epoch, best, bad = state["epoch"] + 1, state["best"], state["bad"]
            if cfg.reinit_classes:
                self._reinit_seg_rows(model, cfg.reinit_classes, cfg.seed)
            # the schedule is a function of the step: recompute it for this run's length
            for group in opt.param_groups:
                group.setdefault("initial_lr", cfg.lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor, last_epoch=start_epoch * steps - 1)
        aug = image_augment(cfg.crop_size, cfg.augment, cfg.seed + rank())
        rng = np.random.default_rng(cfg.seed + 1000 * rank())
        use_amp = cfg.amp and self.device.type == "cuda"
        summary: dict[str, Any] = {}
        if package_only:
            if not (self.out / "best.safetensors").exists():
                msg = f"{self.out}: no best.safetensors to package"
                raise FileNotFoundError(msg)
            start_epoch = cfg.epochs
        for epoch in range(start_epoch, cfg.epochs):
            set_determinism(seed=cfg.seed + epoch * 7919 + rank())
            model.train()
            t0 = time.perf_counter()
            losses: list[float] = []
            gaps: list[float] = []  # squared score-logit gap to the teacher
            plan = epoch_plan(rng, len(train), steps, cfg.batch_size, rank(), world_size())
            if cfg.loader_workers > 0:
                stream_seed = [cfg.seed, rank(), epoch]
                batches: Any = self._loader(train, plan, aug, stream_seed)
            else:
                batches = (make_batch([train[i] for i in idx], aug, rng, cfg.augment) for idx in plan)
            for step, cpu_batch in enumerate(batches):
                batch = self._to_device(cpu_batch)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
                    seg, sc = ddp_model(batch["ct"], batch["mr"], batch["has_mr"], batch["notes"])
                    loss = cfg.score_weight * bce(sc.float(), batch["scores"])
                    if cfg.seg_weight > 0:
                        loss = loss + cfg.seg_weight * seg_loss(seg.float(), batch["label"])
                    if teacher is not None:
                        with torch.no_grad():
                            _, target = teacher(batch["ct"], batch["mr"], batch["has_mr"], batch["notes"])
                        gap = F.mse_loss(sc.float(), target.float())
                        gaps.append(float(gap.detach()))
                        loss = loss + cfg.distill_weight * gap
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trained, 5.0)
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                self._progress(epoch, step, steps, float(np.mean(losses)))
            metrics = self.validate(model, val[: cfg.data.val_per_epoch]) if rank() == 0 else {}
            rec = {
                "epoch": epoch,
                "loss": float(np.mean(losses)),
                "seconds": round(time.perf_counter() - t0, 1),
                **({"distill_mse": round(float(np.mean(gaps)), 4)} if gaps else {}),
                **{k: v for k, v in metrics.items() if k not in ARRAYS},
            }
            self.log(rec)
            if rank() == 0:
                print(json.dumps(rec))
                score = self._selection_score(metrics)
                if cfg.selection == "last" or score > best:
                    best, bad = score, 0
                    self._save_weights(model, self.out / "best.safetensors")
                else:
                    bad += 1
                self._checkpoint(model, opt, sched, epoch, best, bad)
                summary = rec
            bad = distributed.broadcast_int(bad, self.device)
            if bad >= cfg.patience:
                break
            if (self.out / "STOP").exists():  # a graceful stop: package the best checkpoint so far
                break
        if world_size() > 1:
            # every rank must hold the same parameters after DDP; rank 0 records the check
            sums = distributed.parameter_sums(model)
            if rank() == 0:
                write_json(self.out / "ddp_check.json", {"parameter_sums": sums})
        if rank() == 0:
            summary = self.package(model, train, val)
        return summary

    def package(
        self, model: MedFusionNet, train: list[dict[str, Any]], val: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Package the best checkpoint (rank 0): load OUT/best.safetensors, run the diagnosis stage, fit
        the temperature on the validation split, write OUT/package (and its domain guard when
        `domain.fit`) and OUT/summary.json.

        Returns:
            The summary: {"validation": metrics, "temperature": one per score, "package": its folder}.
        """
        cfg = self.cfg
        self._load_weights(model, self.out / "best.safetensors")
        final = self.diagnosis_stage(model, train, val)
        # out of fold where the stacking made them (in-sample stacked logits are over-confident);
        # in-sample for a score without them (temperature_folds 0, or too few cases of a class)
        cal = final.get("calibration_logits")
        cal = final["logits"] if cal is None else np.where(np.isnan(cal), final["logits"], cal)
        y_val = np.stack([v["scores"] for v in val])
        # `final`'s logits are the network's own (before any temperature: an `init_from` source's
        # would otherwise divide them twice), so this is the package's temperature itself
        temps = fit_temperature(cal, y_val)
        model.temperature.copy_(torch.from_numpy(temps))
        # temperature changes neither the segmentation nor the ranking: only the Brier score moves
        p_cal = _sigmoid(final["logits"] / temps)
        metrics_out = {k: v for k, v in final.items() if k not in (*ARRAYS, "stage")}
        metrics_out["brier"] = mean_brier(y_val, p_cal)
        save_package(
            model.cpu(),
            self.out / "package",
            cfg.preprocess,
            name=cfg.name,
            version=cfg.version,
            class_names=cfg.class_names,
            score_names=cfg.score_names,
            training={
                "config": cfg.model_dump(),
                "n_train": len(train),
                "n_val": len(val),
                "temperature": temps.tolist(),
                "diagnosis_stage": final.get("stage", {}),
            },
            metrics={"validation": metrics_out},
        )
        if cfg.domain.fit:
            from medfusion.train.domain import fit_training_domain

            fit_training_domain(
                model.to(self.device),
                self.out / "package",
                train,
                val,
                Path(cfg.data.patients),
                cfg.crop_size,
                val_probabilities=p_cal,
                val_labels=y_val,
                flag_rate=cfg.domain.flag_rate,
                max_ece=cfg.domain.max_ece,
                overlap=cfg.val_window_overlap,
                sw_batch_size=default_sw_batch_size(self.device),
            )
        summary = {
            "validation": metrics_out,
            "temperature": temps.tolist(),
            "package": str(self.out / "package"),
        }
        write_json(self.out / "summary.json", summary)
        return summary

    @staticmethod
    def _reinit_seg_rows(model: MedFusionNet, classes: list[int], seed: int) -> None:
        """Give the segmentation head's rows of `classes` a fresh uniform initialisation (PyTorch's
        default bound 1/√fan_in, seeded) and each class's bias the mean of the lower foreground classes'."""
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / np.sqrt(model.seg_head.in_channels)
        with torch.no_grad():
            for k in classes:
                w = torch.empty_like(model.seg_head.weight[k]).uniform_(-bound, bound, generator=gen)
                model.seg_head.weight[k].copy_(w)
                # start the class level with the other foreground classes, not above them
                bias = model.seg_head.bias
                assert bias is not None
                bias[k].copy_(bias[1:k].mean() if k > 1 else torch.zeros(()))
        print(f"segmentation head rows {classes} re-initialised")

    @staticmethod
    def _selection_score(metrics: dict[str, Any]) -> float:
        """Mean Dice over foreground classes + mean AUROC (a NaN AUROC counts 0), in [0, 2]."""
        return float(np.nanmean(metrics["dice"])) + float(np.nan_to_num(metrics["auroc"]))

    def _source_package(self) -> tuple[MedFusionNet, dict[str, Any]]:
        """The `init_from` package, loaded once (word list and weights both come from it)."""
        if self._source is None:
            assert self.cfg.init_from
            self._source = load_package(self.cfg.init_from)
        return self._source

    def _init_from(self, model: MedFusionNet, package: str) -> None:
        """Copy a package's weights (SHA-256 checked by load_package) into the freshly built network."""
        source, meta = self._source_package()
        ours, theirs = self.cfg.network.model_dump(), source.cfg.model_dump()
        # the measurement term has no trained weights: a package without it can start one that has it
        differ = sorted(k for k in ours if ours[k] != theirs.get(k) and k != "measures")
        if differ:
            msg = f"{package}: init_from needs the package's network settings; these differ: " + ", ".join(
                f"{k} (config {ours[k]!r}, package {theirs.get(k)!r})" for k in differ
            )
            raise ValueError(msg)
        missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
        if unexpected or [k for k in missing if not k.startswith("measure_")]:
            msg = f"{package}: weights do not fit the network (missing {missing[:3]}, unexpected {unexpected[:3]})"
            raise ValueError(msg)
        print(f"weights from {meta.get('name')} {meta.get('version')} ({package})")

    def _trainable(self, model: MedFusionNet) -> list[torch.nn.Parameter]:
        """The parameters the optimiser moves (`trainable` prefixes); the others get requires_grad False."""
        prefixes = self.cfg.trainable
        if prefixes is None:
            return list(model.parameters())
        names = [n for n, _ in model.named_parameters()]
        unknown = [p for p in prefixes if not any(n.startswith(p) for n in names)]
        if unknown:
            msg = f"trainable: no parameter name starts with {unknown}; names start with e.g. " + ", ".join(
                sorted({n.split(".")[0] + "." for n in names})
            )
            raise ValueError(msg)
        params = []
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(tuple(prefixes)))
            if p.requires_grad:
                params.append(p)
        frozen = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in params)
        print(f"training {sum(p.numel() for p in params)} parameters, {frozen} held")
        return params

    def _teacher(self) -> MedFusionNet:
        """The `distill_from` package (SHA-checked), frozen, in eval mode, on the training device."""
        assert self.cfg.distill_from
        teacher, meta = load_package(self.cfg.distill_from)
        if list(meta.get("score_names", [])) != list(self.cfg.score_names):
            msg = f"{self.cfg.distill_from}: its scores {meta.get('score_names')} are not {self.cfg.score_names}"
            raise ValueError(msg)
        teacher = teacher.to(self.device).eval()
        if self.cfg.channels_last:
            teacher = teacher.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        for p in teacher.parameters():
            p.requires_grad_(False)
        print(f"distilling the scores of {meta.get('name')} {meta.get('version')} ({self.cfg.distill_from})")
        return teacher

    def _load_weights(self, model: MedFusionNet, path: Path) -> None:
        """Load a checkpoint; a note head or measurement term absent from it (a run from before
        `network.note_head` / `network.measures`) keeps its fresh initialisation and is fitted by the
        diagnosis stage."""
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
        absent = [k for k in missing if not k.startswith(LATE_FUSION_KEYS)]
        if absent or unexpected:
            msg = (
                f"{path}: weights do not fit the network (missing {absent[:3]}, unexpected {unexpected[:3]})"
            )
            raise RuntimeError(msg)
        if missing:
            print(
                f"{path}: no {'note head' if any(k.startswith('note_') for k in missing) else 'measurement term'} stored; it starts fresh"
            )

    def diagnosis_stage(
        self, model: MedFusionNet, train: list[dict[str, Any]], val: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Note pre-training, score-head refit and stacking (train/diagnosis.py) as configured, then the
        final validation metrics with the resulting logits."""
        cfg, d = self.cfg, self.cfg.diagnosis
        stage: dict[str, Any] = {}
        if d.note_epochs > 0 and d.note_corpus:
            notes, y = read_note_corpus(d.note_corpus, cfg.score_names)
            a = cfg.augment
            stage["note"] = pretrain_note_head(
                model,
                notes,
                y,
                d,
                shuffle=a.sentence_shuffle,
                drop=a.sentence_drop,
                seed=cfg.seed,
                log=self._log_stage,
            )
        final = self.validate(model, val)
        model.eval()  # validate() leaves the model training: no dropout in what is fitted below
        y_val = np.stack([v["scores"] for v in val])
        inputs = {"val_heads": final["heads"], "val_note_logits": final["note_logits"], "val_y": y_val}
        if d.head_epochs > 0:
            fitted = training_heads(
                model, train, cfg.crop_size, d.head_windows, d.head_jitter, cfg.seed, self._layout
            )
            inputs.update(train_heads=fitted[0], train_note_logits=fitted[1], train_y=fitted[2])
            stage["head"] = fit_score_head(
                model, fitted, (final["heads"], final["note_logits"], y_val), d, cfg.seed, self._log_stage
            )
        if d.measures:
            feats = np.array([lesion_features(r["target"], self.spacing_zyx, cfg.class_names) for r in train])
            with torch.inference_mode():
                notes_tr = np.concatenate(
                    [model.note_logits([r["note"]]).float().cpu().numpy() for r in train]
                )
            y_tr = np.stack([r["scores"] for r in train])
            stage["measures"] = fit_measure_model(model, feats, notes_tr, y_tr, d.measures_c)
            self._log_stage({"stage": "measures", **stage["measures"]})
            inputs.update(
                train_measures=feats,
                train_note_logits_all=notes_tr,
                train_y_all=y_tr,
                val_measures=final["measures"],
            )
        if d.stack:
            stage["stack"] = stack_logits(
                model,
                final["heads"],
                final["note_logits"],
                y_val,
                d.stack_c,
                final.get("measures"),
                stage.get("measures"),
                d.temperature_folds,
            )
            final["calibration_logits"] = stage["stack"].pop("out_of_fold_logits")  # NaN: not computed
            self._log_stage({"stage": "stack", **stage["stack"]})
        if d.head_epochs > 0 or d.stack:
            with torch.no_grad():
                dev = self.device
                meas = final.get("measures")
                z = model.score_logits(
                    torch.from_numpy(final["heads"]).to(dev),
                    torch.from_numpy(final["note_logits"]).to(dev),
                    None if meas is None else torch.from_numpy(meas).to(dev),
                )
            final["logits"] = z.cpu().numpy()
            final.update(self._score_metrics(final["logits"], y_val))
        if rank() == 0 and stage:
            # the stage's inputs, to study other ways of combining them without re-running inference
            with atomic_path(self.out / "diagnosis_inputs.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, **inputs)
        final["stage"] = stage
        return final

    def _log_stage(self, rec: dict[str, Any]) -> None:
        self.log(rec)
        if rank() == 0 and os.environ.get("MEDFUSION_QUIET") is None:
            print(json.dumps(rec))

    @staticmethod
    def _score_metrics(lg: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Mean AUROC and Brier score of logits `lg` (n_cases, n_scores) for outcomes `y`."""
        return {"auroc": mean_auroc(y, lg), "brier": mean_brier(y, _sigmoid(lg))}

    def _progress(self, epoch: int, step: int, steps: int, loss: float) -> None:
        """One status line per epoch, rewritten each step: step, loss, elapsed and remaining time."""
        if step == 0 or not hasattr(self, "_epoch_started"):
            self._epoch_started = time.perf_counter()
        if rank() == 0 and os.environ.get("MEDFUSION_QUIET") is None:
            elapsed = time.perf_counter() - self._epoch_started
            eta = elapsed / max(step, 1) * (steps - step - 1)  # timed from the end of the first step
            print(
                f"\repoch {epoch} step {step + 1}/{steps} loss {loss:.4f} "
                f"{elapsed:5.0f} s elapsed, ETA {eta:4.0f} s for the epoch",
                end="",
                flush=True,
            )
            if step + 1 == steps:
                print()

    def _to_device(self, b: dict[str, Any]) -> dict[str, Any]:
        """A `make_batch` batch on the training device, images in the configured memory layout."""
        dev = self.device
        nb = dev.type == "cuda"  # from pinned memory when a loader made the batch
        return {
            "ct": self._layout(b["ct"].to(dev, non_blocking=nb)),
            "mr": self._layout(b["mr"].to(dev, non_blocking=nb)),
            "label": b["label"].to(dev, non_blocking=nb),
            "has_mr": b["has_mr"].to(dev),
            "notes": b["notes"],
            "scores": b["scores"].to(dev, non_blocking=nb),
        }

    def _loader(
        self, recs: list[dict[str, Any]], plan: list[list[int]], aug: Any, seed: list[int]
    ) -> torch.utils.data.DataLoader:
        """`loader_workers` processes making the epoch's batches in step order (worker w makes steps w,
        w + n, …; the loader takes from the workers in turn). Forked, so the cached arrays are shared."""
        stream = BatchStream(recs, plan, aug, seed, self.cfg.augment)
        return batch_loader(stream, workers=self.cfg.loader_workers, pin_memory=self.device.type == "cuda")

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in channels_last_3d order when the config asks for it."""
        return channels_last(x) if self.cfg.channels_last else x

    @torch.inference_mode()
    def validate(self, model: MedFusionNet, val: list[dict[str, Any]]) -> dict[str, Any]:
        """Validation the way inference runs: windows of the crop size, the score from the
        lesion-centred window (infer/windowed.py), no test-time flips.

        Returns:
            "dice": mean Dice per foreground class (classes empty in both maps left out); "auroc",
            "brier": of the model's current probabilities, sigmoid(logit / temperature); and arrays
            (`ARRAYS`, n = len(val)): "logits" (n, n_scores) the network's score logits *before* the
            temperature, "heads" (n, D) score-head inputs, "note_logits" (n, n_scores), and with
            `network.measures` "measures" (n, F) the predicted label maps' lesion features.
            Leaves the model in training mode.
        """
        model.eval()
        dices, logits, ys, heads_out, notes = [], [], [], [], []
        measures: list[np.ndarray] = []
        for r in val:
            ct = self._layout(to_tensor(r["ct"])[None].to(self.device))
            mr = self._layout(to_tensor(r["mr"])[None].to(self.device))
            has = torch.tensor([bool(r["has_mr"])], device=self.device)
            probs, heads = forward_case(
                model,
                ct,
                mr,
                has,
                r["note"],
                self.cfg.crop_size,
                [()],
                overlap=self.cfg.val_window_overlap,
                sw_batch_size=default_sw_batch_size(self.device),
            )
            pred = probs.argmax(1)[0].cpu().numpy()
            dices.append(dice_per_class(pred, r["target"], self.cfg.network.n_classes))
            note = model.note_logits([r["note"]]).float()
            meas = None
            if model.cfg.measures:
                feats = lesion_features(pred, self.spacing_zyx, self.cfg.class_names)
                measures.append(feats)
                meas = torch.from_numpy(feats)[None].to(self.device)
            logits.append(model.score_logits(heads[0], note, meas).float().cpu().numpy()[0])
            heads_out.append(heads[0].cpu().numpy()[0])
            notes.append(note.cpu().numpy()[0])
            ys.append(r["scores"])
        model.train()
        d = np.array(dices)
        lg, y = np.array(logits), np.array(ys)
        temperature = model.temperature.detach().float().cpu().numpy()
        return {
            "dice": [float(x) for x in np.nanmean(d, 0)],
            **self._score_metrics(lg / temperature, y),
            "logits": lg,
            "heads": np.array(heads_out, np.float32),
            "note_logits": np.array(notes, np.float32),
            **({"measures": np.array(measures, np.float32)} if measures else {}),
        }

    def _save_weights(self, model: MedFusionNet, path: Path) -> None:
        """The model's whole state (parameters and buffers) as safetensors, written atomically."""
        with atomic_path(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))

    def _checkpoint(
        self, model: MedFusionNet, opt: torch.optim.Optimizer, sched: Any, epoch: int, best: float, bad: int
    ) -> None:
        """OUT/checkpoint: weights, optimiser state and {epoch, best, bad} for --resume."""
        ckpt = self.out / "checkpoint"
        ckpt.mkdir(exist_ok=True)
        self._save_weights(model, ckpt / "model.safetensors")
        with atomic_path(ckpt / "optimizer.pt") as tmp:
            torch.save(opt.state_dict(), tmp)
        write_json(ckpt / "state.json", {"epoch": epoch, "best": best, "bad": bad})


def train(
    cfg: TrainConfig, out: str | Path, resume: bool = False, package_only: bool = False
) -> dict[str, Any]:
    """Train (in this process, or as one rank of a torchrun job) and write the package to OUT/package.

    Args:
        cfg: the run's settings.
        out: the run's folder (created); see `Trainer` for what it receives.
        resume: continue from OUT/checkpoint when there is one.
        package_only: skip training and (re)package OUT/best.safetensors.

    Returns:
        `Trainer.run`'s summary.

    Raises:
        What `Trainer.run` raises; ValueError for more processes per node than GPUs.
    """
    distributed.start(cfg.device)
    try:
        summary = Trainer(cfg, Path(out)).run(resume=resume, package_only=package_only)
        # leave together: a gloo rank that exited while rank 0 was still packaging aborted once at
        # exit ("terminate called without an active exception"; a known gloo shutdown race)
        distributed.barrier()
        return summary
    finally:
        distributed.stop()
