"""Typed schemas for the config groups (registered with Hydra's ConfigStore by `config.store`).

Each YAML file in `conf/` starts from one of these schemas, so a misspelt key or a wrong type fails
when the config is composed — before any model is loaded — with a message naming the key. The data
group's schemas live in `config.data_schema`; they are named here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune.config.choices import Choice
from finetune.config.data_schema import (  # noqa: F401 (the data group's schemas, named here too)
    CacheMode,
    Crop,
    DataConfig,
    MissingCaption,
    Source,
    SourceConfig,
)


class PredictionType(Choice):
    epsilon = "epsilon"
    v_prediction = "v_prediction"


class Attention(Choice):
    sdpa = "sdpa"  # PyTorch's fused attention
    xformers = "xformers"  # when installed
    eager = "eager"


class CompileScope(Choice):
    """What `model.compile` compiles."""

    blocks = "blocks"  # each transformer block, one compile per block shape (regional compilation)
    full = "full"  # the whole U-Net / ControlNet as one graph: longest start-up


class LossType(Choice):
    l2 = "l2"
    huber = "huber"  # pseudo-Huber: 2c(sqrt(d² + c²) - c)
    smooth_l1 = "smooth_l1"  # 2(sqrt(d² + c²) - c)


class HuberSchedule(Choice):
    constant = "constant"
    exponential = "exponential"  # from 1 at t=0 down to huber_c at the last timestep
    snr = "snr"  # huber_c + (1 - huber_c) / (1 + sigma_t)²


class TimestepSampling(Choice):
    uniform = "uniform"
    logit_normal = "logit_normal"  # more steps in the middle of the range


class Optimizer(Choice):
    adamw = "adamw"
    adamw_8bit = "adamw_8bit"  # bitsandbytes
    adafactor = "adafactor"  # transformers
    prodigy = "prodigy"  # prodigyopt


class LRSchedule(Choice):
    """After `optim.warmup_steps` of linear warmup."""

    constant = "constant"
    cosine = "cosine"
    linear = "linear"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"


class Sampler(Choice):
    """Samplers for validation images and finetune-generate (the training noise schedule is DDPM)."""

    euler = "euler"
    euler_a = "euler_a"
    ddim = "ddim"
    dpmpp_2m = "dpmpp_2m"


@dataclass
class ModelConfig:
    """What to load: `pretrained` is a hub id, a local diffusers folder or a single-file checkpoint."""

    pretrained: str | None = None
    revision: str | None = None
    variant: str | None = None
    # Only for single-file checkpoints: a diffusers folder or hub id holding the matching configs.
    single_file_config: str | None = None
    # Build the tiny random model at `pretrained` when that folder does not exist (model=tiny only).
    build_tiny: bool = False
    resolution: int = 512
    # null: take it from the scheduler config (epsilon for SD 1.x, v_prediction for SD 2.x 768).
    prediction_type: PredictionType | None = None
    gradient_checkpointing: bool = False
    attention: Attention = Attention.sdpa
    # NHWC convolutions. Off: on an H200 the eager SD1.5 LoRA step was slower with it (GroupNorm).
    channels_last: bool = False
    tf32: bool = True  # TF32 matmuls for float32 work on Ampere and newer GPUs
    # torch.compile the U-Net / ControlNet (slow first steps, faster after): true, false, or auto: on for
    # GPU runs long enough for the compile's start-up to pay (models.speed.compiles)
    compile: Any = "auto"
    compile_scope: CompileScope = CompileScope.blocks
    # Text encoder layer the U-Net reads, counted from the end as kohya and A1111 do: 2 = penultimate
    # (what many SD 1.x anime models were trained with). SD 1.x / 2.x only.
    clip_skip: int = 1
    # Rescale the betas so the last timestep is pure noise, space timesteps from the end and predict v
    # (the zero-terminal-SNR recipe); samplers and single-file exports follow.
    zero_terminal_snr: bool = False


@dataclass
class LossConfig:
    prediction_type: PredictionType | None = None  # null: the scheduler's (overrides model.prediction_type)
    snr_gamma: float | None = None  # min-SNR-gamma weighting; 5.0 is the paper's choice
    noise_offset: float = 0.0
    # kohya's names: l2, or pseudo-Huber (`huber`) and `smooth_l1` with threshold huber_c, constant or
    # shrinking with the noise level (exponential in the timestep, or by the SNR)
    type: LossType = LossType.l2
    huber_c: float = 0.1
    huber_schedule: HuberSchedule = HuberSchedule.snr
    debiased_estimation: bool = False  # weight 1/sqrt(SNR) (1/(SNR+1) for v-prediction), SNR at most 1000
    input_perturbation: float = 0.0  # extra noise on the model's input only (0.1 in the paper)
    min_timestep: int = 0
    max_timestep: int | None = None  # null: the scheduler's number of training timesteps (exclusive)
    timestep_sampling: TimestepSampling = TimestepSampling.uniform
    logit_mean: float = 0.0  # logit_normal: timesteps = sigmoid(normal(mean, std)) of the range
    logit_std: float = 1.0
    # With data.masks (OneTrainer's masked-training options): the least weight any latent element gets
    # (0: what lies outside the mask trains nothing), the share of samples drawn each step to train
    # on the whole image instead, and whether each sample's loss is divided by its mask's mean weight
    # (a small masked area then counts as much as a large one).
    unmasked_weight: float = 0.0
    unmasked_probability: float = 0.0
    normalize_masked_area: bool = False


@dataclass
class OptimConfig:
    name: Optimizer = Optimizer.adamw
    fused: bool | None = None  # AdamW's fused kernel; null: on CUDA
    lr: float = 1e-4
    text_encoder_lr: float | None = None  # null: optim.lr; the text encoders' rate when their LoRA trains
    # LoRA+: LoRA's B (up) matrices learn at lr times this (16 is the paper's choice); null: off
    loraplus_ratio: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8
    scheduler: LRSchedule = LRSchedule.constant
    warmup_steps: int = 0
    # Steps with a NaN/inf loss or gradient are skipped; this many in a row stop the run.
    max_nonfinite_in_a_row: int = 5


@dataclass
class ValidationConfig:
    every_n_steps: int = 0  # 0: only at the end of training
    prompts: list[str] = field(default_factory=lambda: ["a photo"])
    # A prompt library instead of `prompts`: a text file, one prompt per line with kohya's flags (--n
    # negative prompt, --w / --h size, --d seed, --l guidance, --s steps), or a yaml / json list of
    # records with the keys below. Settings a prompt leaves out come from the keys below.
    prompts_file: str | None = None
    negative_prompt: str = ""
    guidance_scale: float = 7.5
    num_inference_steps: int = 25
    seed: int = 0
    images_per_prompt: int = 1
    # Sampler for the validation images (the training noise schedule is unchanged).
    scheduler: Sampler | None = Sampler.euler
    # Validation loss on the `data.holdout` images: the same timesteps and noise every time, so that
    # runs and steps compare; logged as val/loss at every sample step.
    loss_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    # CLIP score of the samples against their prompts (val/clip_score): a CLIP model folder or a hub
    # id already downloaded, e.g. openai/clip-vit-large-patch14. Skipped with a notice if it won't load.
    clip_model: str | None = None
    # FID and KID, at the end of training, of samples from the data.holdout captions against those
    # images: the Inception weights file torch-fidelity uses (pt_inception-2015-12-05), on disk.
    inception_weights: str | None = None
    # ControlNet: conditioning images for the samples (prompt i uses image i, cycling); raw photos
    # when data.conditioning names a preprocessor. Empty: those of the first training samples.
    conditioning_images: list[str] = field(default_factory=list)


@dataclass
class CheckpointConfig:
    every_n_steps: int = 500
    keep_last: int = -1  # -1: keep every checkpoint
