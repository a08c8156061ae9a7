"""The training loop: Dice+CE segmentation loss and BCE diagnosis loss, validation by patient,
best-checkpoint selection, early stopping, resume, temperature calibration, DDP through torchrun."""

from __future__ import annotations

import datetime
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file

from medfusion.config import PreprocessConfig, StrictModel
from medfusion.infer.windowed import default_sw_batch_size, forward_case
from medfusion.io.atomic import atomic_path, write_json
from medfusion.models.domain import DEFAULT_FLAG_RATE, MAX_SITUATION_ECE
from medfusion.models.measures import grid_spacing_zyx, lesion_features
from medfusion.models.network import MedFusionNet, NetConfig, channels_last
from medfusion.models.package import load_package, package_vocabulary, pick_device, save_package
from medfusion.synth.notes import SCORE_NAMES
from medfusion.synth.phantom import CLASS_NAMES
from medfusion.text.encoders import Vocabulary
from medfusion.train.data import (
    build_cache,
    image_augment,
    load_cached,
    note_augment,
    read_labels_csv,
    to_tensor,
)
from medfusion.train.diagnosis import (
    DiagnosisConfig,
    fit_measure_model,
    fit_score_head,
    mean_auroc,
    pretrain_note_head,
    read_note_corpus,
    stack_logits,
    training_heads,
)

# state keys fitted by the diagnosis stage (network.note_head, network.measures), absent from checkpoints
# made without them
LATE_FUSION_KEYS = ("note_text.", "note_logit.", "note_scale", "head_gain", "head_bias", "measure_")

# --- Config ---


class DataConfig(StrictModel):
    patients: str
    labels: str
    cache: str = "runs/cache"
    # another cache folder whose stored registrations may be reused (same registration settings)
    registration_from: str | None = None
    val_fraction: float = Field(0.2, gt=0, lt=1)
    limit: int | None = None
    # per-epoch model selection scores this many validation cases (None: all); the temperature is
    # always fitted on the whole validation split
    val_per_epoch: int | None = None


class AugmentConfig(StrictModel):
    flip: bool = True
    rotate_deg: float = 8.0
    noise: float = 0.03
    intensity_scale: float = 0.1
    sentence_shuffle: bool = True
    sentence_drop: float = 0.1
    modality_dropout: float = 0.1
    lesion_crop_prob: float = 0.75
    # crop-centre class weights (background first); None: lesion_crop_prob decides
    class_crop_ratios: list[float] | None = None


class DomainFitConfig(StrictModel):
    """The domain guard fitted after training (models/domain.py, train/domain.py)."""

    fit: bool = True
    # share of held-out in-domain cases the feature-distance threshold flags
    flag_rate: float = Field(default=DEFAULT_FLAG_RATE, gt=0, lt=1)
    # an input situation's scores count as calibrated at or below this validation ECE (issue #25: 0.08)
    max_ece: float = Field(default=MAX_SITUATION_ECE, gt=0)


class TrainConfig(StrictModel):
    name: str = "medfusion-default"
    version: str = "0.1.0"
    data: DataConfig
    network: NetConfig = NetConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    augment: AugmentConfig = AugmentConfig()
    diagnosis: DiagnosisConfig = DiagnosisConfig()
    domain: DomainFitConfig = DomainFitConfig()
    epochs: int = 30
    steps_per_epoch: int | None = None
    batch_size: int = 2
    crop_size: list[int] = [48, 48, 48]
    # validation windows overlap by this fraction: as inference does (`infer.window_overlap`), so the
    # checkpoint selection, the stacking and the temperature see what `medfusion run` sees. The shipped
    # model's recipes pin 0.25, the value their selections were made with (before session 9)
    val_window_overlap: float = Field(default=0.5, ge=0.0, lt=1.0)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seg_weight: float = 1.0
    dice_batch: bool = True  # Dice over the whole batch: rare classes are not lost in empty crops
    # Dice's smoothing (numerator and denominator). MONAI's 1e-5 makes a class absent from the batch cost
    # ≈ 1 as soon as any probability goes to it, so a rare class learns to be never predicted; 1.0 makes
    # that cost ≈ the predicted voxel count instead
    dice_smooth: float = Field(default=1e-5, gt=0)
    # on --resume: give these classes' rows of the segmentation head a fresh initialisation. A rare
    # class whose logit has collapsed (never predicted, probability ≈ 1e-6) cannot come back under Adam,
    # whose steps are bounded by the learning rate whatever the gradient
    reinit_classes: list[int] = []
    # Dice only over the foreground classes the reference has (in the batch with `dice_batch`, else per
    # crop); an absent class is then left to the cross-entropy. With plain Dice, a class missing from
    # most crops (a calcification in 1 of 5) is pushed to probability 0 everywhere long before the
    # network can tell where it is, and stays there
    dice_present_only: bool = False
    # fine-tuning: start from this model package's weights and word list (its network settings must be
    # this config's), with a fresh optimiser and learning-rate schedule. Ignored when --resume finds a
    # checkpoint in OUT
    init_from: str | None = None
    # train only the parameters whose names start with one of these prefixes (e.g. ["decoder.",
    # "seg_head."]); the rest keep their starting values. None: train everything
    trainable: list[str] | None = None
    # knowledge distillation ("learning without forgetting", Li & Hoiem 2016): a frozen teacher package
    # sees every training batch, and the squared difference between its score logits and the network's,
    # times `distill_weight`, joins the loss. Lets a fine-tune change the segmentation while the
    # diagnosis keeps what the teacher learned. The teacher must read the same inputs (preprocessing)
    distill_from: str | None = None
    distill_weight: float = Field(default=0.0, ge=0)
    ce_class_weights: list[float] | None = None
    score_weight: float = 0.5
    patience: int = 8
    # which epoch is packaged: the best by the validation selection score, or the last one (for runs whose
    # selection score cannot see what they change, e.g. a score-head distillation judged on 24 patients)
    selection: Literal["best", "last"] = "best"
    seed: int = 0
    workers: int = 2
    threads: int = 2
    # processes that make the training batches (crops, augmentation) ahead of the steps. 0: in the
    # training process, between steps, as every shipped model was trained. On a GPU the steps are
    # ≈ 10 ms and making a batch ≈ 100-150 ms (benchmarks/RESULTS.md, "GPU"), so the GPU waits without
    # them. Deterministic for a given seed and count, but other random draws than 0 makes.
    loader_workers: int = Field(default=0, ge=0)
    channels_last: bool = True  # channels_last_3d tensors: faster 3-D convolutions on CPU and GPU
    device: str = "auto"
    # bf16 autocast for the training steps on a GPU (1.40-1.49x the fp32 step on an H200, peak memory
    # x 0.6; benchmarks/RESULTS.md, "GPU"); ignored on the CPU
    amp: bool = True
    class_names: list[str] = list(CLASS_NAMES)
    score_names: list[str] = list(SCORE_NAMES)

    @model_validator(mode="after")
    def _distillation_needs_a_teacher(self) -> TrainConfig:
        if self.distill_weight > 0 and not self.distill_from:
            msg = "distill_weight > 0 needs distill_from (the teacher package)"
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _measures_need_their_network(self) -> TrainConfig:
        d, n = self.diagnosis, self.network
        if d.measures and not (n.measures and n.note_head and d.stack):
            msg = "diagnosis.measures needs network.measures: true, network.note_head: true and diagnosis.stack: true (the stacking fits the measurement term's gain)"
            raise ValueError(msg)
        return self


# --- Helpers ---


class PresentDiceCELoss(torch.nn.Module):
    """Soft Dice over the foreground classes present in the reference, plus (weighted) cross-entropy."""

    def __init__(self, batch: bool, smooth: float, weight: torch.Tensor | None) -> None:
        super().__init__()
        self.batch = batch
        self.dice = DiceLoss(
            to_onehot_y=True,
            softmax=True,
            include_background=False,
            batch=batch,
            smooth_nr=smooth,
            smooth_dr=smooth,
            reduction="none",
        )
        self.weight = weight

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        per_class = self.dice(logits, label).reshape(-1 if self.batch else logits.shape[0], k - 1)
        ref = label[:, 0]
        # (crops, classes): which foreground classes each crop's reference holds
        present = torch.stack([(ref == c).flatten(1).any(1) for c in range(1, k)], 1)
        if self.batch:
            present = present.any(0, keepdim=True)
        pres = present.to(per_class.dtype)
        dice = (per_class * pres).sum() / pres.sum().clamp(min=1.0)
        ce = F.cross_entropy(logits, ref.long(), weight=self.weight)
        return dice + ce


def segmentation_loss(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    weight = torch.tensor(cfg.ce_class_weights, device=device) if cfg.ce_class_weights else None
    if cfg.dice_present_only:
        return PresentDiceCELoss(cfg.dice_batch, cfg.dice_smooth, weight)
    return DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        include_background=False,
        batch=cfg.dice_batch,
        smooth_nr=cfg.dice_smooth,
        smooth_dr=cfg.dice_smooth,
        weight=weight,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def process_device(
    requested: str, local_rank: int | None = None, local_world: int | None = None
) -> torch.device:
    """The device of one training process: with several processes on CUDA, GPU number LOCAL_RANK.
    `local_rank` / `local_world` default to torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE (0 / 1 without it).

    NCCL refuses two ranks on one GPU, so a node with fewer GPUs than processes is refused here with a
    one-line reason rather than deep inside the first collective.
    """
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_world is None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    dev = pick_device(requested)
    if dev.type != "cuda" or local_world <= 1:
        return dev
    n = torch.cuda.device_count()
    if local_world > n:
        msg = (
            f"{local_world} training processes per node but {n} CUDA device(s): "
            f"use --nproc-per-node {n} or device: cpu (gloo)"
        )
        raise ValueError(msg)
    return torch.device("cuda", local_rank)


def split_patients(pids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    order = sorted(pids)
    rng.shuffle(order)  # type: ignore[arg-type]
    n_val = max(1, int(round(len(order) * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def dice_per_class(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> list[float]:
    """Dice per foreground class; NaN when both are empty (left out of means, and counted)."""
    out = []
    for k in range(1, n_classes):
        a, b = pred == k, ref == k
        den = a.sum() + b.sum()
        out.append(float(2 * (a & b).sum() / den) if den else float("nan"))
    return out


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-score temperature minimising the validation negative log-likelihood (grid + refine)."""
    temps = []
    for s in range(logits.shape[1]):
        z, y = logits[:, s], labels[:, s]
        grid = np.exp(np.linspace(np.log(0.25), np.log(8.0), 200))

        def nll(t: float, z: np.ndarray = z, y: np.ndarray = y) -> float:
            p = 1 / (1 + np.exp(-z / t))
            p = np.clip(p, 1e-7, 1 - 1e-7)
            return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

        temps.append(float(min(grid, key=nll)))
    return np.asarray(temps, np.float32)


# --- Batches ---


def _plain(x: Any) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (same values; nothing to pickle but the data)."""
    t = torch.as_tensor(x)
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def make_batch(
    recs: list[dict[str, Any]], aug: Any, rng: np.random.Generator, a: AugmentConfig
) -> dict[str, Any]:
    """One training batch on the CPU: augmented crops, modality dropout, note augmentation."""
    cts, mrs, labels, has, notes, scores = [], [], [], [], [], []
    for r in recs:
        out = aug({"ct": r["ct"], "mr": r["mr"], "label": r["target"][None]})
        out = out[0] if isinstance(out, list) else out
        img = _plain(out["image"]).float()
        nct = r["ct"].shape[0]
        cts.append(img[:nct])
        mrs.append(img[nct:])
        labels.append(_plain(out["label"]).round().long())
        present = bool(r["has_mr"]) and rng.random() >= a.modality_dropout
        has.append(present)
        note = note_augment(r["note"], rng, a.sentence_shuffle, a.sentence_drop)
        notes.append("" if rng.random() < a.modality_dropout else note)
        scores.append(to_tensor(r["scores"]))
    return {
        "ct": torch.stack(cts),
        "mr": torch.stack(mrs),
        "label": torch.stack(labels),
        "has_mr": torch.tensor(has),
        "notes": notes,
        "scores": torch.stack(scores),
    }


class _BatchStream(torch.utils.data.IterableDataset):
    """An epoch's batches, shared out among the loader's workers; each worker's random state (MONAI's
    and the numpy generator) is seeded from (seed, worker)."""

    def __init__(
        self, recs: list[dict[str, Any]], plan: list[list[int]], aug: Any, seed: list[int], a: AugmentConfig
    ) -> None:
        self.recs, self.plan, self.aug, self.seed, self.a = recs, plan, aug, seed, a

    def __iter__(self) -> Any:
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([*self.seed, wid])
        self.aug.set_random_state(seed=int(rng.integers(2**31)))
        for step in range(wid, len(self.plan), n):
            yield make_batch([self.recs[i] for i in self.plan[step]], self.aug, rng, self.a)


# --- Loop ---


# validation outputs that are arrays (kept out of the logged metrics)
ARRAYS = ("logits", "heads", "note_logits", "measures", "calibration_logits")


class Trainer:
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
        if _rank() != 0:
            return
        with open(self.out / "train.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def prepare(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Vocabulary]:
        cfg = self.cfg
        patients = Path(cfg.data.patients)
        folders = sorted(p for p in patients.iterdir() if p.is_dir())
        if cfg.data.limit:
            folders = folders[: cfg.data.limit]
        labels = read_labels_csv(Path(cfg.data.labels) / "labels.csv", cfg.score_names)
        cache = Path(cfg.data.cache)
        if _rank() == 0:
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
        if _world() > 1:
            dist.barrier()
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
            return Vocabulary(rec["words"], rec["negation"], rec["numbers"])
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
        if _rank() == 0:
            write_json(path, {"words": vocab.words[2:], "negation": vocab.negation, "numbers": vocab.numbers})
        return vocab

    def run(self, resume: bool = False, package_only: bool = False) -> dict[str, Any]:
        """Train, then package the best checkpoint with a temperature fitted on the validation split.
        `package_only`: skip training and (re)package OUT/best.safetensors."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        train, val, vocab = self.prepare()
        model = MedFusionNet(cfg.network, vocab).to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        trained = self._trainable(model)
        teacher = self._teacher() if cfg.distill_weight > 0 and not package_only else None
        ddp_model: torch.nn.Module = model
        if _world() > 1:
            ddp_model = torch.nn.parallel.DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.steps_per_epoch or max(1, len(train) // (cfg.batch_size * _world()))
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
            if _rank() == 0:
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
        aug = image_augment(
            cfg.crop_size,
            cfg.augment.flip,
            cfg.augment.rotate_deg,
            cfg.augment.noise,
            cfg.augment.intensity_scale,
            cfg.augment.lesion_crop_prob,
            cfg.seed + _rank(),
            cfg.augment.class_crop_ratios,
        )
        rng = np.random.default_rng(cfg.seed + 1000 * _rank())
        use_amp = cfg.amp and self.device.type == "cuda"
        summary: dict[str, Any] = {}
        if package_only:
            if not (self.out / "best.safetensors").exists():
                msg = f"{self.out}: no best.safetensors to package"
                raise FileNotFoundError(msg)
            start_epoch = cfg.epochs
        for epoch in range(start_epoch, cfg.epochs):
            seed_everything(cfg.seed + epoch * 7919 + _rank())
            model.train()
            t0 = time.perf_counter()
            losses: list[float] = []
            gaps: list[float] = []  # squared score-logit gap to the teacher
            order = rng.permutation(len(train))
            order = order[_rank() :: _world()]
            plan = [
                [int(order[(step * cfg.batch_size + b) % len(order)]) for b in range(cfg.batch_size)]
                for step in range(steps)
            ]
            if cfg.loader_workers > 0:
                stream_seed = [cfg.seed, _rank(), epoch]
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
            metrics = self.validate(model, val[: cfg.data.val_per_epoch]) if _rank() == 0 else {}
            rec = {
                "epoch": epoch,
                "loss": float(np.mean(losses)),
                "seconds": round(time.perf_counter() - t0, 1),
                **({"distill_mse": round(float(np.mean(gaps)), 4)} if gaps else {}),
                **{k: v for k, v in metrics.items() if k not in ARRAYS},
            }
            self.log(rec)
            if _rank() == 0:
                print(json.dumps(rec))
                score = self._selection_score(metrics)
                if cfg.selection == "last" or score > best:
                    best, bad = score, 0
                    self._save_weights(model, self.out / "best.safetensors")
                else:
                    bad += 1
                self._checkpoint(model, opt, sched, epoch, best, bad)
                summary = rec
            if _world() > 1:
                flag = torch.tensor([bad], dtype=torch.long, device=self.device)  # NCCL: GPU tensors only
                dist.broadcast(flag, 0)
                bad = int(flag.item())
            if bad >= cfg.patience:
                break
            if (self.out / "STOP").exists():  # a graceful stop: package the best checkpoint so far
                break
        if _world() > 1:
            # every rank must hold the same parameters after DDP; rank 0 records the check
            total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
            sums = [torch.zeros(1, dtype=torch.float64, device=total.device) for _ in range(_world())]
            dist.all_gather(sums, total)
            if _rank() == 0:
                write_json(self.out / "ddp_check.json", {"parameter_sums": [float(x) for x in sums]})
        if _rank() == 0:
            self._load_weights(model, self.out / "best.safetensors")
            final = self.diagnosis_stage(model, train, val)
            # out of fold where the stacking made them (in-sample stacked logits are over-confident);
            # in-sample for a score without them (temperature_folds 0, or too few cases of a class)
            cal = final.get("calibration_logits")
            cal = final["logits"] if cal is None else np.where(np.isnan(cal), final["logits"], cal)
            y_val = np.stack([v["scores"] for v in val])
            temps = fit_temperature(cal, y_val)
            model.temperature.copy_(torch.from_numpy(temps))
            # temperature changes neither the segmentation nor the ranking: only the Brier score moves
            p_cal = 1 / (1 + np.exp(-final["logits"] / temps))
            metrics_out = {k: v for k, v in final.items() if k not in (*ARRAYS, "stage")}
            metrics_out["brier"] = float(np.mean((p_cal - y_val) ** 2))
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
                model, notes, y, d, a.sentence_shuffle, a.sentence_drop, cfg.seed, self._log_stage
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
        if _rank() == 0 and stage:
            # the stage's inputs, to study other ways of combining them without re-running inference
            with atomic_path(self.out / "diagnosis_inputs.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, **inputs)
        final["stage"] = stage
        return final

    def _log_stage(self, rec: dict[str, Any]) -> None:
        self.log(rec)
        if _rank() == 0 and os.environ.get("MEDFUSION_QUIET") is None:
            print(json.dumps(rec))

    @staticmethod
    def _score_metrics(lg: np.ndarray, y: np.ndarray) -> dict[str, float]:
        p = 1 / (1 + np.exp(-lg))
        return {"auroc": mean_auroc(y, lg), "brier": float(np.mean((p - y) ** 2))}

    def _progress(self, epoch: int, step: int, steps: int, loss: float) -> None:
        """One status line per epoch, rewritten each step: step, loss, elapsed and remaining time."""
        if step == 0 or not hasattr(self, "_epoch_started"):
            self._epoch_started = time.perf_counter()
        if _rank() == 0 and os.environ.get("MEDFUSION_QUIET") is None:
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
        ctx = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None
        return torch.utils.data.DataLoader(
            _BatchStream(recs, plan, aug, seed, self.cfg.augment),
            batch_size=None,
            num_workers=self.cfg.loader_workers,
            pin_memory=self.device.type == "cuda",
            multiprocessing_context=ctx,
            prefetch_factor=2,
        )

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return channels_last(x) if self.cfg.channels_last else x

    @torch.inference_mode()
    def validate(self, model: MedFusionNet, val: list[dict[str, Any]]) -> dict[str, Any]:
        """Validation the way inference runs: windows of the crop size, the score from the
        lesion-centred window (infer/windowed.py), no test-time flips."""
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
            logits.append((model.score_logits(heads[0], note, meas) / model.temperature).cpu().numpy()[0])
            heads_out.append(heads[0].cpu().numpy()[0])
            notes.append(note.cpu().numpy()[0])
            ys.append(r["scores"])
        model.train()
        d = np.array(dices)
        lg, y = np.array(logits), np.array(ys)
        return {
            "dice": [float(x) for x in np.nanmean(d, 0)],
            **self._score_metrics(lg, y),
            "logits": lg,
            "heads": np.array(heads_out, np.float32),
            "note_logits": np.array(notes, np.float32),
            **({"measures": np.array(measures, np.float32)} if measures else {}),
        }

    def _save_weights(self, model: MedFusionNet, path: Path) -> None:
        with atomic_path(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))

    def _checkpoint(
        self, model: MedFusionNet, opt: torch.optim.Optimizer, sched: Any, epoch: int, best: float, bad: int
    ) -> None:
        ckpt = self.out / "checkpoint"
        ckpt.mkdir(exist_ok=True)
        self._save_weights(model, ckpt / "model.safetensors")
        with atomic_path(ckpt / "optimizer.pt") as tmp:
            torch.save(opt.state_dict(), tmp)
        write_json(ckpt / "state.json", {"epoch": epoch, "best": best, "bad": bad})


def train(
    cfg: TrainConfig, out: str | Path, resume: bool = False, package_only: bool = False
) -> dict[str, Any]:
    """Train (in this process, or as one rank of a torchrun job) and write the package to OUT/package."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dev = process_device(cfg.device)
        # NCCL for GPU tensors; gloo for CPU ones (also on a machine that has a GPU but was told cpu). The
        # other ranks wait at the end while rank 0 runs the diagnosis stage and packages (minutes): a
        # timeout well above that
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    try:
        summary = Trainer(cfg, Path(out)).run(resume, package_only)
        if _world() > 1:
            # leave together: a gloo rank that exited while rank 0 was still packaging aborted once at
            # exit ("terminate called without an active exception"; a known gloo shutdown race)
            dist.barrier()
        return summary
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
