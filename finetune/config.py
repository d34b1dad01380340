"""Typed schemas for the config groups, registered with Hydra's ConfigStore.

Each YAML file in `conf/` starts from one of these schemas, so a misspelt key or a wrong type fails
when the config is composed — before any model is loaded — with a message naming the key.
"""

from __future__ import annotations

import datetime
import inspect
import os
import typing
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Literal, Union

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

# Absolute, so the console scripts find it whatever the working directory (Hydra would otherwise
# look for a Python package named `conf`).
PROJECT_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_DIR / "conf"


def slurm_job_id() -> str | None:
    """The SLURM job's id as `scontrol` names it (`<array job>_<task>` in a job array), or None."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def run_stamp() -> str:
    """The run folder's name: the job's id under SLURM or torchrun, so that every rank (and a
    requeued job) finds the same folder; else the start time."""
    job = slurm_job_id()
    if job:
        return f"slurm-{job}"
    elastic = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if elastic != "none":
        return f"torchrun-{elastic}"
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def bundled_path(relative: str) -> str:
    """`${bundled:data/tiny-sd}` in a config: a file shipped in the project's folder, from any cwd."""
    return str(PROJECT_DIR / relative)


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
    prediction_type: str | None = None
    gradient_checkpointing: bool = False
    # Speed: sdpa (PyTorch's fused attention) | xformers (when installed) | eager
    attention: str = "sdpa"
    # NHWC convolutions. Off: on an H200 the eager SD1.5 LoRA step was slower with it (GroupNorm).
    channels_last: bool = False
    tf32: bool = True  # TF32 matmuls for float32 work on Ampere and newer GPUs
    compile: bool = False  # torch.compile the U-Net / ControlNet (slow first steps, faster after)


@dataclass
class LoraMethodConfig:
    """LoRA adapters through peft (`method=lora`)."""

    name: str = "lora"
    rank: int = 8
    alpha: float | None = None  # null: alpha = rank (scale 1.0)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_text_encoder: bool = False
    text_encoder_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    init_weights: str = "gaussian"


@dataclass
class FullMethodConfig:
    """Full U-Net fine-tuning (`method=full`), with an exponential moving average of the weights."""

    name: str = "full"
    ema: bool = True
    ema_decay: float = 0.9999  # the ceiling; with warmup the decay starts low and rises towards it
    ema_warmup: bool = True
    ema_power: float = 0.6666667  # warmup: decay = 1 - (1 + step) ** -power
    save_single_file: bool = True  # also write model.safetensors in the original (A1111/ComfyUI) layout


@dataclass
class ControlNetMethodConfig:
    """A ControlNet beside the frozen base U-Net (`method=controlnet`)."""

    name: str = "controlnet"
    # null: initialise from the base U-Net's encoder; else a hub id, folder or single file to continue.
    pretrained: str | None = None
    pretrained_config: str | None = None  # a single file's architecture: a folder with its config.json
    conditioning_scale: float = 1.0
    lora_rank: int | None = None  # train a LoRA on the ControlNet instead of all its weights
    unet_lora_rank: int | None = None  # also train a LoRA on the base U-Net
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    save_single_file: bool = True  # also write controlnet.safetensors in the original (A1111/ComfyUI) layout


@dataclass
class SourceConfig:
    """Where captioned images come from: `source=folder` (path) or `source=hf` (name)."""

    source: str = "folder"
    path: str | None = None
    name: str | None = None  # hub id, save_to_disk folder, or .parquet / .arrow file(s)
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    # Column of metadata.jsonl / metadata.csv naming each image file (HF imagefolder convention).
    file_column: str = "file_name"
    caption_extensions: list[str] = field(default_factory=lambda: [".txt", ".caption"])
    # ControlNet conditioning images: a parallel folder (same relative names, any image extension), or
    # a metadata / dataset column holding them.
    conditioning_path: str | None = None
    conditioning_column: str | None = None
    # How often this source's images are shown per epoch, relative to their count (may be fractional);
    # it multiplies kohya folder repeats.
    weight: float = 1.0


@dataclass
class DataConfig(SourceConfig):
    """Captioned images: one source (the fields above) or several mixed (`sources`)."""

    sources: list[SourceConfig] = field(default_factory=list)
    streaming: bool = False  # hf only: read the dataset as a stream (too big for disk)
    resolution: int = 512
    crop: str = "center"  # center | random
    random_flip: bool = True
    # Aspect-ratio buckets: equal-area sizes around `resolution`, each batch from one bucket.
    buckets: bool = False
    bucket_step: int = 64  # side lengths are multiples of this
    bucket_min_side: int | None = None  # null: resolution / 2
    bucket_max_side: int | None = None  # null: resolution * 2
    bucket_max_ratio: float = 4.0  # longest / shortest side
    # Captions
    missing_caption: str = "empty"  # skip | empty | default | error
    default_caption: str = ""
    caption_prefix: str = ""  # e.g. a trigger word: "zkz style, "
    caption_suffix: str = ""
    shuffle_tags: bool = False  # shuffle comma-separated tags every time an image is shown
    keep_tokens: int = 0  # leading tags that stay in place when shuffling
    tag_separator: str = ","
    caption_dropout: float = 0.0
    # ControlNet: conditioning computed from each image by a preprocessor (canny), instead of read
    conditioning: str | None = None
    canny_low: int = 100
    canny_high: int = 200
    conditioning_dropout: float = 0.0  # share of samples trained with a blank conditioning image
    # Bad input
    max_pixels: int = 89_478_485  # larger images are refused (decompression bombs); PIL's own limit
    upscale_small: bool = True  # images smaller than their target size: upscale (noted) or skip
    verify: bool = False  # decode every image while scanning (slower; catches truncated files up front)
    # Caching of VAE latents and text-encoder outputs
    cache: str = "none"  # none | memory | disk
    cache_dir: str | None = None  # disk cache; null: ~/.cache/finetune/latents
    # Images kept out of training (chosen by seed) for the validation loss (`validation.loss_timesteps`)
    holdout: int = 0
    # Loading
    batch_size: int = 1
    # Decoding processes; null: 4 (at most half the CPUs) when training on a GPU, else 0 (in-process)
    num_workers: int | None = None
    shuffle: bool = True


@dataclass
class LossConfig:
    prediction_type: str | None = None  # null: the scheduler's (overrides model.prediction_type)
    snr_gamma: float | None = None  # min-SNR-gamma weighting; 5.0 is the paper's choice
    noise_offset: float = 0.0


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adamw_8bit (bitsandbytes) | adafactor (transformers) | prodigy (prodigyopt)
    fused: bool | None = None  # AdamW's fused kernel; null: on CUDA
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8
    scheduler: str = "constant"  # after `warmup_steps` of linear warmup: constant | cosine | linear …
    warmup_steps: int = 0
    # Steps with a NaN/inf loss or gradient are skipped; this many in a row stop the run.
    max_nonfinite_in_a_row: int = 5


@dataclass
class ValidationConfig:
    every_n_steps: int = 0  # 0: only at the end of training
    prompts: list[str] = field(default_factory=lambda: ["a photo"])
    negative_prompt: str = ""
    guidance_scale: float = 7.5
    num_inference_steps: int = 25
    seed: int = 0
    images_per_prompt: int = 1
    # Sampler for the validation images (the training noise schedule is unchanged).
    scheduler: str | None = "euler"
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


# Trainer arguments we construct ourselves rather than take from the config.
_TRAINER_ARGS_OWNED_BY_US = {"self", "logger", "callbacks", "plugins"}


def _trainer_schema() -> type:
    """A dataclass with one field per `lightning.Trainer` argument, defaults as Lightning's, typed
    from Lightning's own annotations where OmegaConf can check them (`trainer.max_steps=ten` then
    fails when the config is composed)."""
    import lightning as L

    fields = []
    for name, parameter in inspect.signature(L.Trainer.__init__).parameters.items():
        if name in _TRAINER_ARGS_OWNED_BY_US:
            continue
        default = parameter.default
        if not isinstance(default, (str, int, float, bool, type(None))):
            default = None
        fields.append((name, _config_type(parameter.annotation, default), field(default=default)))
    return make_dataclass("TrainerConfig", fields)


_PRIMITIVES = (bool, int, float, str)
# Values a config can give that no primitive type describes: such a field stays untyped (Any).
_UNTYPED = (list, dict, datetime.timedelta)


def _config_type(annotation: Any, default: Any) -> Any:
    """The type OmegaConf can check for a Trainer annotation: its primitive alternatives (a Literal
    counts as its values' types, a Path as str; objects such as an Accelerator cannot come from a
    config, so they drop out), or Any where a list of devices or a timedelta is one of them."""
    options = set()
    for option in typing.get_args(annotation) if typing.get_origin(annotation) is Union else (annotation,):
        if typing.get_origin(option) is Literal:
            options |= {type(value) for value in typing.get_args(option)}
        else:
            options.add(typing.get_origin(option) or option)
    if any(isinstance(option, type) and issubclass(option, _UNTYPED) for option in options):
        return Any
    if Path in options:
        options.add(str)
    kept = tuple(option for option in _PRIMITIVES if option in options)
    if not kept:
        return Any
    typed = Union[kept]  # noqa: UP007 (a type built at run time: Union[(int,)] is int)
    optional = type(None) in options or default is None
    return typing.Optional[typed] if optional else typed  # noqa: UP045


def register_configs() -> None:
    """Make the schemas available to `conf/` files as `<group>/schema`."""
    if not OmegaConf.has_resolver("bundled"):
        OmegaConf.register_new_resolver("bundled", bundled_path)
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
    store = ConfigStore.instance()
    store.store(group="model", name="schema", node=ModelConfig)
    store.store(group="method", name="lora_schema", node=LoraMethodConfig)
    store.store(group="method", name="full_schema", node=FullMethodConfig)
    store.store(group="method", name="controlnet_schema", node=ControlNetMethodConfig)
    store.store(group="data", name="schema", node=DataConfig)
    store.store(group="trainer", name="schema", node=_trainer_schema())
    store.store(name="loss_schema", node=LossConfig, package="loss")
    store.store(name="optim_schema", node=OptimConfig, package="optim")
    store.store(name="validation_schema", node=ValidationConfig, package="validation")
    store.store(name="checkpoint_schema", node=CheckpointConfig, package="checkpoint")
