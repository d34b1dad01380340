"""Load the components of a Stable Diffusion pipeline for training.

`model.pretrained` may be a hub id, a local diffusers folder or a single-file checkpoint
(.safetensors / .ckpt, as A1111 and ComfyUI use). Everything goes through diffusers'
`from_pretrained` / `from_single_file`, so the tiny model and real models share one path.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import SingleFileComponentError
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from finetune.config.errors import ConfigError
from finetune.config.schema import ModelConfig
from finetune.models.layout import index_is_sdxl, vae_scale_factor
from finetune.models.prompts import PromptEncoder, check_clip_skip
from finetune.models.schedules import with_schedule_options

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class Components:
    """The parts of an SD or SDXL pipeline that training needs. Frozen: a method that adds a model
    returns new components (`dataclasses.replace`), so what a run trains is what `prepare` returned."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    source: str
    controlnet: Any = None  # a ControlNetModel when method=controlnet adds one
    text_encoder_2: Any = None  # SDXL's second text encoder (CLIPTextModelWithProjection)
    tokenizer_2: Any = None
    clip_skip: int = 1  # model.clip_skip
    max_token_length: int | None = None  # data.max_token_length: the caption length the encoders read

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def prompts(self) -> PromptEncoder:
        """The text side: what tokenizes and encodes captions for this model."""
        return PromptEncoder(
            self.text_encoder,
            self.tokenizer,
            self.text_encoder_2,
            self.tokenizer_2,
            clip_skip=self.clip_skip,
            max_token_length=self.max_token_length,
        )

    @property
    def vae_factor(self) -> int:
        """How many pixels one latent spans per side."""
        return vae_scale_factor(self.vae.config)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return self.prompts.models

    def pipeline(self, scheduler: Any = None) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
        """An SD or SDXL pipeline over these (live, not copied) models, without a safety checker; with
        the ControlNet when there is one."""
        scheduler = scheduler if scheduler is not None else self.noise_scheduler
        if self.is_sdxl:
            pipe = StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.unet,
                scheduler=scheduler,
            )
        else:
            pipe = StableDiffusionPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                unet=self.unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        return pipe if self.controlnet is None else with_controlnet(pipe, self.controlnet)


def with_controlnet(pipe: Any, controlnet: Any) -> Any:
    """`pipe`'s models with `controlnet` steering them: the SD or SDXL ControlNet pipeline."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        return StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=controlnet)
    return StableDiffusionControlNetPipeline(
        **pipe.components, controlnet=controlnet, requires_safety_checker=False
    )


def resolve_source(cfg: ModelConfig) -> str:
    """Where to load from: a local path when it exists, else the hub id as given."""
    if not cfg.pretrained:
        raise ConfigError(
            "model.pretrained is not set — give a hub id, a diffusers folder or a .safetensors file"
        )
    path = Path(cfg.pretrained).expanduser()
    if path.suffix in SINGLE_FILE_SUFFIXES and not path.is_file():
        raise ConfigError(f"model.pretrained: checkpoint file '{path}' does not exist")
    return str(path) if path.exists() else cfg.pretrained


def load_pipeline(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32, allow_unsafe_pickle: bool = False
) -> StableDiffusionPipeline:
    """The whole pipeline, for sampling (`finetune-generate`) and single-file checkpoints.

    A `.ckpt` is read with `torch.load(weights_only=True)`; one that needs more is refused unless
    `allow_unsafe_pickle`, which unpickles it fully (it can run code) into a temporary .safetensors.
    """
    source = resolve_source(cfg)
    common = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if source.endswith(".ckpt") and allow_unsafe_pickle:
        with tempfile.TemporaryDirectory() as folder:
            tensors = _unpickled_tensors(source, Path(folder) / "weights.safetensors")
            return _load_single_file(str(tensors), resolve_single_file_config(cfg), common)
    if source.endswith(SINGLE_FILE_SUFFIXES):
        return _load_single_file(source, resolve_single_file_config(cfg), common)
    if is_sdxl_folder(source, cfg.revision):  # SDXL pipelines have no safety checker to switch off
        return StableDiffusionXLPipeline.from_pretrained(
            source, revision=cfg.revision, variant=cfg.variant, torch_dtype=dtype
        )
    return StableDiffusionPipeline.from_pretrained(
        source, revision=cfg.revision, variant=cfg.variant, **common
    )


def _unpickled_tensors(ckpt: str, out: Path) -> Path:
    """The tensors of a `.ckpt` that needs full unpickling, as a .safetensors file (the opt-in path)."""
    log.warning("allow_unsafe_pickle: unpickling %s fully — only do this with files you trust", ckpt)
    content = torch.load(ckpt, map_location="cpu", weights_only=False)
    state = content.get("state_dict", content) if isinstance(content, dict) else {}
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConfigError(f"model.pretrained: {ckpt} holds no tensors")
    safetensors.torch.save_file(tensors, out)
    return out


def resolve_single_file_config(cfg: ModelConfig) -> str | None:
    """`model.single_file_config` as diffusers' `config=` wants it: an existing folder, or a hub id."""
    if not cfg.single_file_config:
        return None
    path = Path(cfg.single_file_config).expanduser()
    if path.is_dir():
        return str(path)
    # diffusers would take a missing local path for a hub id and fail with a network error instead.
    if path.exists() or path.is_absolute() or cfg.single_file_config.startswith((".", "~")):
        raise ConfigError(
            f"model.single_file_config: '{path}' is not a diffusers folder (one with model_index.json)"
        )
    return cfg.single_file_config


def _load_single_file(source: str, config: str | None, common: dict) -> StableDiffusionPipeline:
    """`from_single_file`, with its failures turned into one line that says what to set.

    With `config` (a diffusers folder or hub id of the same architecture) diffusers reads only that
    folder's configs and tokenizer and takes the weights from the file. Without it, diffusers guesses
    a standard model from a few keys (SD 1.5 for anything it does not recognise) and fetches that
    model's configs from the hub; HF_HUB_OFFLINE=1 is honoured by huggingface_hub either way.
    """
    try:
        return StableDiffusionPipeline.from_single_file(source, config=config, **common)
    except (OSError, ValueError, RuntimeError, KeyError, SingleFileComponentError) as error:
        raise _single_file_error(source, config, error) from error


def _single_file_error(source: str, config: str | None, error: Exception) -> ConfigError:
    text = str(getattr(error, "message", None) or error).strip()
    detail = text.splitlines()[0] if text else type(error).__name__
    setting = "model.single_file_config=<diffusers folder or hub id of the same architecture>"
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError)):
        key = "model.single_file_config" if config else "model.pretrained"
        hint = f"the configs it needs are not available (offline?); set {setting}"
    elif source in text:  # diffusers names the file when it cannot read it
        key = "model.pretrained"
        hint = (
            "not a readable .safetensors file, or a .ckpt holding more than tensors (read only with "
            "torch.load(weights_only=True)); re-save it as .safetensors"
        )
    elif isinstance(error, (SingleFileComponentError, NotImplementedError)):  # weights left on "meta"
        key, hint = "model.pretrained", "the file lacks the weights of a whole part or some layers"
    elif config:
        key, hint = "model.single_file_config", f"'{config}' does not match the checkpoint's architecture"
    else:
        key, hint = "model.pretrained", f"diffusers could not work out its architecture; set {setting}"
    return ConfigError(f"{key}: cannot load single-file checkpoint '{source}': {hint} ({detail})")


def load_components(
    cfg: ModelConfig, dtype: torch.dtype = torch.float32, allow_unsafe_pickle: bool = False
) -> Components:
    """Load unet, vae, text encoder, tokenizer and the DDPM training scheduler, frozen, in `dtype`."""
    source = resolve_source(cfg)
    text_encoder_2 = tokenizer_2 = None
    if source.endswith(SINGLE_FILE_SUFFIXES):
        pipe = load_pipeline(cfg, dtype, allow_unsafe_pickle)
        unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    else:
        kwargs = dict(revision=cfg.revision)
        weights = dict(kwargs, variant=cfg.variant, torch_dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights)
        if is_sdxl_folder(source, cfg.revision):
            tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **kwargs)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", **weights
            )
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **weights)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    if dtype == torch.float16 and vae.config.get("force_upcast"):
        vae.to(torch.float32)  # SDXL's VAE overflows in float16 (its config says so), as diffusers knows
    scheduler = with_schedule_options(scheduler, cfg)
    check_clip_skip(cfg.clip_skip, text_encoder, text_encoder_2 is not None)
    for model in (unet, vae, text_encoder, text_encoder_2):
        if model is not None:
            model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return Components(
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        source,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        clip_skip=cfg.clip_skip,
    )


def is_sdxl_folder(source: str, revision: str | None = None) -> bool:
    """Whether a diffusers folder or hub id holds an SDXL pipeline (a second text encoder), from its
    `model_index.json`."""
    return index_is_sdxl(DiffusionPipeline.load_config(source, revision=revision))


def weight_dtype_for(precision: str | int | None) -> torch.dtype:
    """Dtype for the frozen weights under a Lightning precision setting (trainables stay fp32)."""
    text = str(precision)
    if text.startswith("bf16"):
        return torch.bfloat16
    if text.startswith("16"):
        return torch.float16
    return torch.float32
