"""The settings of a training run (`medfusion train --config RECIPE.yaml`), validated on load: unknown keys
and impossible combinations are refused with a one-line reason. The recipes in `pipelines/train_*.yaml`
are instances of `TrainConfig`.

Examples:
    >>> cfg = TrainConfig.model_validate({"data": {"patients": "c/patients", "labels": "c/labels"}})
    >>> cfg.crop_size, cfg.class_names[1], cfg.score_names
    ([48, 48, 48], 'tumour_core', ['malignant'])
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from medfusion.config import PreprocessConfig, StrictModel
from medfusion.labels import CLASS_NAMES, SCORE_NAMES
from medfusion.models.domain import DEFAULT_FLAG_RATE, MAX_SITUATION_ECE
from medfusion.models.network import NetConfig


class DataConfig(StrictModel):
    """Where the training cohort and its preprocessing cache are, and how it is split.

    Attributes:
        patients: folder of patient folders (`DIR/patients` of `medfusion synth`).
        labels: labels folder: `<patient_id>/segmentation.nii.gz` and `labels.csv` (one 0/1 column per
            score name).
        cache: folder of the preprocessed cases (`<patient_id>.npz` + `.json`), reused while the
            preprocessing settings are unchanged.
        registration_from: another cache folder, or a `medfusion run` output folder, whose stored
            registrations are reused when their registration settings equal this run's.
        val_fraction: share of patients held out for validation, in (0, 1); at least one patient.
        limit: use only the first `limit` patient folders (sorted by name); None: all.
        val_per_epoch: per-epoch model selection scores only this many validation cases (None: all);
            the diagnosis stage and the temperature always use the whole validation split.
    """

    patients: str
    labels: str
    cache: str = "runs/cache"
    registration_from: str | None = None
    val_fraction: float = Field(0.2, gt=0, lt=1)
    limit: int | None = None
    val_per_epoch: int | None = None


class AugmentConfig(StrictModel):
    """Training-batch augmentation (train/batches.py), image side and note side.

    Attributes:
        flip: mirror crops left-right with probability 0.5.
        rotate_deg: random rotation up to ± this many degrees about each axis (with ± 5 % scaling),
            probability 0.5; 0 turns it off.
        noise: standard deviation of added Gaussian noise, in units of the normalised intensities
            (CT windows in [0, 1], MR z-scores), probability 0.5.
        intensity_scale: intensities multiplied by 1 + u, u uniform in ± this, probability 0.5.
        sentence_shuffle: shuffle the note's sentences after the first.
        sentence_drop: probability, per sentence after the first, of dropping it.
        modality_dropout: probability of hiding the MR (when present) and, independently, the note.
        lesion_crop_prob: probability that a crop is centred on a lesion voxel (else on background).
        class_crop_ratios: crop-centre class weights, one per class, background first; a class absent
            from a case is skipped. None: `lesion_crop_prob` decides.
        slice_blur: (low, high) Gaussian σ, in voxels of the crop's first (slice, z) axis, drawn
            uniformly and applied along that axis only, to the CT and to the MR independently, each with
            probability `slice_blur_prob`: thicker slices than the training cohort's, in the SynthSeg
            spirit of randomised resolution (Billot et al., Med Image Anal 2023). A box slice profile
            of width w has σ = w / √12, so on a 2 mm grid σ 0.6-0.75 voxel stands for 4-5 mm slices.
            None: off, as every shipped model was trained.
        slice_blur_prob: probability per image of `slice_blur`, in [0, 1].
    """

    flip: bool = True
    rotate_deg: float = 8.0
    noise: float = 0.03
    intensity_scale: float = 0.1
    sentence_shuffle: bool = True
    sentence_drop: float = 0.1
    modality_dropout: float = 0.1
    lesion_crop_prob: float = 0.75
    class_crop_ratios: list[float] | None = None
    slice_blur: tuple[float, float] | None = None
    slice_blur_prob: float = Field(default=0.5, ge=0.0, le=1.0)

    @field_validator("slice_blur")
    @classmethod
    def _blur_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0.0 <= v[0] <= v[1] <= 5.0:
            msg = f"slice_blur must be (low, high) with 0 <= low <= high <= 5 (voxels), got {v}"
            raise ValueError(msg)
        return v


class DomainFitConfig(StrictModel):
    """The domain guard fitted after training (models/domain.py, train/domain.py).

    Attributes:
        fit: fit it at the end of `medfusion train` (else `medfusion domain fit` can do it later).
        flag_rate: share of held-out in-domain cases the feature-distance threshold flags, in (0, 1).
        max_ece: an input situation's scores count as calibrated at or below this validation ECE
            (issue #25: 0.08).
    """

    fit: bool = True
    flag_rate: float = Field(default=DEFAULT_FLAG_RATE, gt=0, lt=1)
    max_ece: float = Field(default=MAX_SITUATION_ECE, gt=0)


class DiagnosisConfig(StrictModel):
    """The diagnosis stage after segmentation training (train/diagnosis.py): note pre-training, score-head
    refit, measurement term, stacking and the temperature's folds. All off by default (the jointly
    trained score head is packaged as it is).

    Attributes:
        note_corpus: CSV with a `note` column and one 0/1 column per score name (`medfusion synth
            --notes-only`) to pre-train the note head on.
        note_epochs: epochs of note pre-training (0: none).
        note_batch: notes per step of note pre-training.
        note_lr: AdamW learning rate of note pre-training.
        note_val_fraction: share of the corpus held out to pick the best note epoch.
        head_epochs: refit the score head on frozen image features for this many epochs (0: keep the
            jointly trained one).
        head_windows: windows per training case for the refit.
        head_jitter: voxels the refit's window centre moves at random (each axis, uniform ±).
        head_lr: AdamW learning rate of the refit.
        head_batch: inputs per step of the refit.
        stack: combine the image-side logit and the note logit by a logistic regression on the validation
            split (two gains and a bias): three parameters fitted out of sample, where a refit of the
            whole head on training-case features overfits (the trunk has memorised those cases).
        stack_c: inverse L2 strength of that regression (scikit-learn's C), > 0.
        measures: fit the measurement term (network.measures, measure/features.py): a logistic regression
            of the labels on the note logit and the measurements of the training cases' reference label
            maps; the stacking then weighs it beside the image-side and note logits.
        measures_c: inverse L2 strength of that regression (standardised features), > 0.
        temperature_folds: with `stack`, the temperature is fitted on out-of-fold stacked logits (the
            stacking refitted on the other folds of the validation split) instead of the in-sample
            ones, which are over-confident by construction; 0: in-sample, as before 0.7.0.
    """

    note_corpus: str | None = None
    note_epochs: int = 0
    note_batch: int = 64
    note_lr: float = 2e-3
    note_val_fraction: float = 0.1
    head_epochs: int = 0
    head_windows: int = 4
    head_jitter: int = 8
    head_lr: float = 1e-3
    head_batch: int = 32
    stack: bool = False
    stack_c: float = 1.0
    measures: bool = False
    measures_c: float = 1.0
    temperature_folds: int = Field(default=8, ge=0)


class TrainConfig(StrictModel):
    """One training run: data, network, preprocessing, augmentation, optimisation, packaging.

    Attributes:
        name, version: the model package's name and version (`model.json`).
        data, network, preprocess, augment, diagnosis, domain: the sections above and
            `models.network.NetConfig` / `config.PreprocessConfig` (the preprocessing is recorded in the
            package, so inference prepares cases the same way).
        epochs: epochs at most (early stopping after `patience` epochs without a better selection score).
        steps_per_epoch: optimiser steps per epoch; None: training cases // (batch_size × processes).
        batch_size: crops per step and process.
        crop_size: training crop and validation window, voxels (z, y, x); each divisible by
            2 ** (len(network.channels) - 1) (8 for the default four levels: the encoder's down-samplings).
        val_window_overlap: validation windows overlap by this fraction in [0, 1): as inference does
            (`infer.window_overlap`), so the checkpoint selection, the stacking and the temperature see
            what `medfusion run` sees. The shipped model's recipes pin 0.25, the value their selections
            were made with (before session 9).
        lr: peak AdamW learning rate (linear warm-up over the first 10 % of steps, then cosine decay to
            2 % of the peak).
        weight_decay: AdamW weight decay.
        seg_weight: weight of the segmentation loss (0: train the scores only).
        dice_batch: Dice over the whole batch, so rare classes are not lost in empty crops.
        dice_smooth: Dice's smoothing (numerator and denominator), > 0. MONAI's 1e-5 makes a class
            absent from the batch cost ≈ 1 as soon as any probability goes to it, so a rare class learns
            to be never predicted; 1.0 makes that cost ≈ the predicted voxel count instead.
        reinit_classes: on --resume, give these classes' rows of the segmentation head a fresh
            initialisation. A rare class whose logit has collapsed (never predicted, probability ≈ 1e-6)
            cannot come back under Adam, whose steps are bounded by the learning rate.
        dice_present_only: Dice only over the foreground classes the reference has (in the batch with
            `dice_batch`, else per crop); an absent class is left to the cross-entropy
            (train/losses.PresentDiceCELoss).
        init_from: fine-tuning: start from this model package's weights and word list (its network
            settings must be this config's), with a fresh optimiser and schedule. Ignored when --resume
            finds a checkpoint in OUT.
        trainable: train only the parameters whose names start with one of these prefixes (e.g.
            ["decoder.", "seg_head."]); the rest keep their starting values. None: everything.
        distill_from: knowledge distillation ("learning without forgetting", Li & Hoiem 2016): a frozen
            teacher package sees every training batch, and the mean squared difference between its
            score logits and the network's, times `distill_weight`, joins the loss. The teacher must
            read the same inputs (preprocessing).
        distill_weight: weight of that term, ≥ 0; > 0 needs `distill_from`.
        ce_class_weights: cross-entropy weight per class (background first); None: equal.
        empty_topk_weight: weight of a false-positive term on crops whose reference has no foreground
            (train/losses.EmptyCropTopK: the cross-entropy of their `empty_topk_voxels` most foreground-
            looking voxels), ≥ 0; 0: off, as every shipped model was trained. Dice sees nothing on an
            empty reference and the mean cross-entropy dilutes a few bright voxels among 110 k, so
            normal anatomy that looks like a lesion is otherwise barely charged (#26).
        empty_topk_voxels: how many voxels per empty crop that term reads, ≥ 1.
        score_weight: weight of the diagnosis BCE loss.
        patience: epochs without a better selection score before stopping.
        selection: which epoch is packaged: the best by the validation selection score (mean Dice +
            mean AUROC), or the last one (for runs whose selection score cannot see what they change).
        seed: the run's seed; the same seed, data and settings give the same run on the CPU.
        workers: processes preprocessing the cache.
        threads: torch CPU threads per training process.
        loader_workers: processes making the training batches ahead of the steps, ≥ 0. 0: in the training
            process, between steps, as every shipped model was trained. On a GPU the steps are ≈ 10 ms
            and making a batch ≈ 100-150 ms (benchmarks/RESULTS.md, "GPU"). Deterministic for a given seed
            and count, but other random draws than 0 makes.
        channels_last: channels_last_3d tensors (faster 3-D convolutions on CPU and GPU).
        device: "auto", "cpu", "cuda", "cuda:N" or "mps" (medfusion.device.pick_device).
        amp: bf16 autocast for the training steps on a GPU (1.40-1.49× the fp32 step on an H200, peak
            memory × 0.6; benchmarks/RESULTS.md, "GPU"); ignored on the CPU.
        class_names, score_names: the segmentation classes (label code order) and diagnostic scores;
            default the product's (medfusion.labels). Score names are columns of `labels.csv`.

    Raises:
        pydantic.ValidationError: an unknown key, a value out of range, `distill_weight` > 0 without
            `distill_from`, or `diagnosis.measures` without the network and stacking it needs.
    """

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
    val_window_overlap: float = Field(default=0.5, ge=0.0, lt=1.0)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seg_weight: float = 1.0
    dice_batch: bool = True
    dice_smooth: float = Field(default=1e-5, gt=0)
    reinit_classes: list[int] = []
    dice_present_only: bool = False
    init_from: str | None = None
    trainable: list[str] | None = None
    distill_from: str | None = None
    distill_weight: float = Field(default=0.0, ge=0)
    ce_class_weights: list[float] | None = None
    empty_topk_weight: float = Field(default=0.0, ge=0)
    empty_topk_voxels: int = Field(default=64, ge=1)
    score_weight: float = 0.5
    patience: int = 8
    selection: Literal["best", "last"] = "best"
    seed: int = 0
    workers: int = 2
    threads: int = 2
    loader_workers: int = Field(default=0, ge=0)
    channels_last: bool = True
    device: str = "auto"
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
