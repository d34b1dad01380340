"""`finetune-generate`: write PNGs from a base model plus an optional LoRA adapter.

finetune-generate model=sd15 adapter=outputs/<run>/adapter prompt="a castle, mystyle" count=4
"""

from __future__ import annotations

import itertools
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig

from finetune.config.command_line import expand_home_paths
from finetune.config.errors import ConfigError, FinetuneError, run_command
from finetune.config.files import save_png
from finetune.config.store import CONF_DIR, register_configs

log = logging.getLogger("finetune")
register_configs()

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _device_and_dtype(cfg: DictConfig):
    import torch

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.dtype == "auto":
        return device, torch.float16 if device.startswith("cuda") else torch.float32
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype: '{cfg.dtype}' is not one of auto, {', '.join(DTYPES)}")
    if cfg.dtype == "bfloat16" and device == "cpu":
        from finetune.models.speed import warn_about_bf16_on_this_cpu

        warn_about_bf16_on_this_cpu("dtype=bfloat16", "dtype=float32")
    return device, getattr(torch, cfg.dtype)


def _prompts(cfg: DictConfig) -> list[str]:
    prompts = list(cfg.prompt) if isinstance(cfg.prompt, ListConfig) else [cfg.prompt]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ConfigError("prompt: give a non-empty string or a list of them, e.g. prompt='a red circle'")
    return prompts


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def control_images(cfg: DictConfig) -> list[tuple[str, Any]]:
    """(name, image) for `control_image` (a file or a folder), fitted to the output size and, with a
    `preprocessor`, turned into its conditioning image (e.g. a photo into its edges)."""
    from finetune.data.buckets import choose_crop, fit_to
    from finetune.data.conditioning import preprocessor
    from finetune.data.images import IMAGE_EXTENSIONS, open_image

    if not cfg.control_image:
        raise ConfigError("control_image: a ControlNet needs a conditioning image (a file or a folder)")
    source = Path(cfg.control_image).expanduser()
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    else:
        files = [source] if source.is_file() else []
    if not files:
        raise ConfigError(f"control_image: no image at '{source}'")
    size = (int(cfg.width), int(cfg.height))
    out = []
    for file in files:
        image = open_image(file)
        image = fit_to(image, size, choose_crop(image.width, image.height, size, False), False).image
        if cfg.preprocessor:
            image = preprocessor(cfg.preprocessor)(image, cfg)
        out.append((_slug(file.stem), image))
    return out


def _fuse_if_lycoris(pipe: Any, adapter: Path, scale: float) -> bool:
    """A LoHa or LoKr adapter (a kohya-layout file, or a folder with only that file), which diffusers does
    not load, is fused into the pipeline's weights at `scale`; returns whether it was."""
    from safetensors import safe_open

    from finetune.export.lora import DEFAULT_KOHYA_NAME, DIFFUSERS_WEIGHT_NAME
    from finetune.export.lora_apply import fuse_file, pipeline_models
    from finetune.export.lora_file import read_lora_file

    if adapter.is_dir():
        if (adapter / DIFFUSERS_WEIGHT_NAME).exists() or not (adapter / DEFAULT_KOHYA_NAME).exists():
            return False
        adapter = adapter / DEFAULT_KOHYA_NAME
    if adapter.suffix != ".safetensors":
        return False
    with safe_open(adapter, "pt") as handle:
        if not any(".hada_" in key or ".lokr_" in key for key in handle.keys()):
            return False
    changed = fuse_file(pipeline_models(pipe), read_lora_file(adapter), scale, key="adapter")
    log.info("adapter: %d LoHa/LoKr layers of %s fused into the weights at scale %s", changed, adapter, scale)
    return True


@contextmanager
def text_lora_scale(pipe: Any, scale: float) -> Iterator[None]:
    """The pipeline's text encoders' LoRA layers at `scale` for a block (diffusers' own helpers)."""
    from diffusers.utils import scale_lora_layers, unscale_lora_layers

    encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    for encoder in encoders:
        scale_lora_layers(encoder, scale)
    try:
        yield
    finally:
        for encoder in encoders:
            unscale_lora_layers(encoder, scale)


def _prompt_encoder(pipe: Any, cfg: DictConfig) -> Any:
    """The pipeline's text side read as training read it: `model.clip_skip`, `max_token_length`."""
    from finetune.config.values import TOKEN_LENGTHS
    from finetune.models.prompts import pipeline_prompt_encoder

    if cfg.max_token_length is not None and not TOKEN_LENGTHS[0](cfg.max_token_length):
        raise ConfigError(f"max_token_length: {cfg.max_token_length} {TOKEN_LENGTHS[1]}")
    return pipeline_prompt_encoder(pipe, cfg.model.clip_skip, cfg.max_token_length)


def generate(cfg: DictConfig) -> list[Path]:
    """Generate `count` images per prompt; returns the PNG paths (existing files are never replaced)."""
    import torch

    from finetune.models.loading import load_pipeline, with_controlnet
    from finetune.models.prompts import pipeline_text_inputs
    from finetune.models.schedules import with_schedule_options
    from finetune.tiny.builder import ensure_tiny_model
    from finetune.validation.samples import sampler_from

    prompts = _prompts(cfg)
    device, dtype = _device_and_dtype(cfg)
    ensure_tiny_model(cfg.model)
    pipe = load_pipeline(cfg.model, dtype, allow_unsafe_pickle=bool(cfg.allow_unsafe_pickle))
    # The sampler first, then the model's schedule options on it (the pipeline's own may not take them).
    pipe.scheduler = with_schedule_options(sampler_from(pipe.scheduler, cfg.scheduler), cfg.model)
    extra = {}
    if cfg.adapter:
        adapter = Path(cfg.adapter).expanduser()
        if not adapter.exists():
            raise ConfigError(
                f"adapter: '{adapter}' does not exist — give an adapter folder or .safetensors file"
            )
        if not _fuse_if_lycoris(pipe, adapter, float(cfg.adapter_scale)):
            pipe.load_lora_weights(str(adapter))
            extra["cross_attention_kwargs"] = {"scale": float(cfg.adapter_scale)}
    controls: list[tuple[str, object]] = [("", None)]
    if cfg.controlnet:
        from finetune.export.controlnet_file import read_controlnet

        controlnet = read_controlnet(str(cfg.controlnet), cfg.controlnet_config).to(dtype)
        pipe = with_controlnet(pipe, controlnet)
        pipe.set_progress_bar_config(disable=True)
        controls = control_images(cfg)
        extra["controlnet_conditioning_scale"] = float(cfg.controlnet_scale)
    elif cfg.control_image:
        raise ConfigError("control_image: set controlnet=<folder or file> to use it")
    pipe.to(device)
    prompt_encoder = _prompt_encoder(pipe, cfg)

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (control_name, control), (p_index, prompt) in itertools.product(controls, enumerate(prompts)):
        generators = [torch.Generator("cpu").manual_seed(cfg.seed + i) for i in range(cfg.count)]
        if control is not None:
            extra["image"] = [control] * cfg.count
        negative = [cfg.negative_prompt] * cfg.count if cfg.negative_prompt else None
        # A text-encoder LoRA at adapter_scale, as the pipeline's own prompt encoding would apply it
        lora_scale = extra.get("cross_attention_kwargs", {}).get("scale", 1.0)
        with text_lora_scale(pipe, lora_scale):
            text = pipeline_text_inputs(prompt_encoder, [prompt] * cfg.count, negative, pipe)
        images = pipe(
            **text,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            height=cfg.height,
            width=cfg.width,
            generator=generators,
            **extra,
        ).images
        for i, image in enumerate(images):
            name = f"{control_name}_" if control_name else ""
            path = out_dir / f"{name}{p_index:02d}_{_slug(prompt)}_seed{cfg.seed + i}.png"
            if path.exists():
                raise FinetuneError(f"{path} already exists — choose another out_dir")
            save_png(image, path)
            written.append(path)
    log.info("wrote %d images to %s", len(written), out_dir)
    return written


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def _hydra_main(cfg: DictConfig) -> None:
    run_command(generate, cfg)


def main() -> None:
    sys.argv[1:] = expand_home_paths(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
