"""The training loop: one run from a `TrainConfig` to a model package.

`train` starts (or joins, under torchrun) the process group and runs a `Trainer`: the cohort is cached
and split by patient (train/cohort.py, train/data.py), batches are made from crops (train/batches.py), each step adds the
segmentation loss (train/losses.py) and the diagnosis BCE (and, with a teacher, a distillation term);
every epoch is validated the way inference runs (train/validate.py), checkpointed (train/checkpoint.py),
and the best one kept (early stopping, resume, a graceful STOP file). A fine-tune starts from a package's
weights, trains named parts, or distils a teacher (train/finetune.py). At the end rank 0 packages the best
checkpoint (train/packaging.py: the diagnosis stage of train/diagnosis.py, the temperature of
train/temperature.py, the package and its domain guard of train/domain.py). Configs are in
train/config.py, DDP helpers in train/distributed.py.
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

from medfusion.io.atomic import write_json
from medfusion.models.network import MedFusionNet
from medfusion.package import PackageMeta, load_package
from medfusion.text.encoders import Vocabulary
from medfusion.train import distributed, finetune, packaging
from medfusion.train.batches import (
    BatchStream,
    batch_loader,
    epoch_plan,
    image_augment,
    make_batch,
    to_device,
)
from medfusion.train.checkpoint import LATE_FUSION_KEYS, load_checkpoint, save_checkpoint, save_weights
from medfusion.train.cohort import run_vocabulary, training_cases
from medfusion.train.config import TrainConfig
from medfusion.train.distributed import process_device, rank, world_size
from medfusion.train.losses import segmentation_loss
from medfusion.train.validate import ARRAYS, dice_per_class, selection_score, validate

# ARRAYS, dice_per_class (now train/validate.py) and LATE_FUSION_KEYS (now train/checkpoint.py) are
# re-exported from their old home while a training run started before the split (#29) may still
# import them from here; drop them when the lead says so. TrainConfig and process_device are imported
# from their homes (train/config.py, train/distributed.py).
__all__ = [
    "ARRAYS",
    "LATE_FUSION_KEYS",
    "Trainer",
    "dice_per_class",
    "train",
]

# --- Loop ---


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
        self._source: tuple[MedFusionNet, PackageMeta] | None = None

    def log(self, rec: dict[str, Any]) -> None:
        """Append `rec` as one JSON line to OUT/train.jsonl (rank 0 only)."""
        if rank() != 0:
            return
        with open(self.out / "train.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def prepare(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Vocabulary]:
        """(training cases, validation cases, word list) of this run: `train/cohort.training_cases`
        (which caches the cohort on rank 0) and `train/cohort.run_vocabulary`.

        Raises:
            InputError: labels.csv is missing, lacks a score column or holds a value other than 0/1.
        """
        train, val = training_cases(self.cfg)
        return train, val, run_vocabulary(self.cfg, self.out, train, lambda: self._source_package()[1])

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
        trained = finetune.trainable_parameters(model, cfg.trainable)
        teacher = (
            finetune.load_teacher(cfg, self.device) if cfg.distill_weight > 0 and not package_only else None
        )
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
            finetune.init_from(model, *self._source_package(), cfg.init_from)
            # the starting weights are the first candidate: fine-tuning never ships a model that
            # validates worse than the one it started from
            if rank() == 0:
                metrics = self.validate(model, val[: cfg.data.val_per_epoch])
                best = selection_score(metrics)
                save_weights(model, self.out / "best.safetensors")
                rec = {"epoch": -1, "init_from": cfg.init_from, "dice": metrics["dice"]}
                self.log({**rec, "auroc": metrics["auroc"], "brier": metrics["brier"]})
        if resume and (ckpt / "state.json").exists():
            start_epoch, best, bad = load_checkpoint(ckpt, model, opt)
            if cfg.reinit_classes:
                finetune.reinit_seg_rows(model, cfg.reinit_classes, cfg.seed)
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
                batch = to_device(cpu_batch, self.device, cfg.channels_last)
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
                score = selection_score(metrics)
                if cfg.selection == "last" or score > best:
                    best, bad = score, 0
                    save_weights(model, self.out / "best.safetensors")
                else:
                    bad += 1
                save_checkpoint(ckpt, model, opt, epoch, best, bad)
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

    def validate(self, model: MedFusionNet, val: list[dict[str, Any]]) -> dict[str, Any]:
        """`train/validate.validate` of `model` on the cases `val` with this run's settings and device
        (leaves the model in training mode)."""
        return validate(model, val, self.cfg, self.device)

    def diagnosis_stage(
        self, model: MedFusionNet, train: list[dict[str, Any]], val: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """`train/packaging.diagnosis_stage` with this run's settings, device, folder and log."""
        return packaging.diagnosis_stage(
            model, train, val, self.cfg, device=self.device, out=self.out, log=self._log_stage
        )

    def package(
        self, model: MedFusionNet, train: list[dict[str, Any]], val: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """`train/packaging.package` (rank 0): the best checkpoint, its diagnosis stage and temperature,
        written to OUT/package and OUT/summary.json; returns the summary."""
        return packaging.package(
            model, train, val, self.cfg, device=self.device, out=self.out, log=self._log_stage
        )

    def _source_package(self) -> tuple[MedFusionNet, PackageMeta]:
        """The `init_from` package, loaded once (word list and weights both come from it)."""
        if self._source is None:
            assert self.cfg.init_from
            self._source = load_package(self.cfg.init_from)
        return self._source

    def _log_stage(self, rec: dict[str, Any]) -> None:
        """`log` `rec`, and print it as a JSON line on rank 0 unless MEDFUSION_QUIET is set."""
        self.log(rec)
        if rank() == 0 and os.environ.get("MEDFUSION_QUIET") is None:
            print(json.dumps(rec))

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

    def _loader(
        self, recs: list[dict[str, Any]], plan: list[list[int]], aug: Any, seed: list[int]
    ) -> torch.utils.data.DataLoader:
        """`loader_workers` processes making the epoch's batches in step order (worker w makes steps w,
        w + n, …; the loader takes from the workers in turn). Forked, so the cached arrays are shared."""
        stream = BatchStream(recs, plan, aug, seed, self.cfg.augment)
        return batch_loader(stream, workers=self.cfg.loader_workers, pin_memory=self.device.type == "cuda")


def train(
    cfg: TrainConfig, out: str | Path, *, resume: bool = False, package_only: bool = False
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
