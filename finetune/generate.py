"""`finetune-generate`: write PNGs from a base model plus an optional LoRA adapter.

finetune-generate model=sd15 adapter=outputs/<run>/adapter prompt="a castle, mystyle" count=4
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig

from finetune.config import CONF_DIR, register_configs
from finetune.errors import ConfigError, FinetuneError, run_command
from finetune.files import save_png

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
    return device, getattr(torch, cfg.dtype)


def _prompts(cfg: DictConfig) -> list[str]:
    prompts = list(cfg.prompt) if isinstance(cfg.prompt, ListConfig) else [cfg.prompt]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ConfigError("prompt: give a non-empty string or a list of them, e.g. prompt='a red circle'")
    return prompts


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def generate(cfg: DictConfig) -> list[Path]:
    """Generate `count` images per prompt; returns the PNG paths (existing files are never replaced)."""
    import torch

    from finetune.callbacks import sampler_from
    from finetune.models import load_pipeline

    prompts = _prompts(cfg)
    device, dtype = _device_and_dtype(cfg)
    pipe = load_pipeline(cfg.model, dtype)
    pipe.scheduler = sampler_from(pipe.scheduler, cfg.scheduler)
    extra = {}
    if cfg.adapter:
        adapter = Path(cfg.adapter).expanduser()
        if not adapter.exists():
            raise ConfigError(
                f"adapter: '{adapter}' does not exist — give an adapter folder or .safetensors file"
            )
        pipe.load_lora_weights(str(adapter))
        extra["cross_attention_kwargs"] = {"scale": float(cfg.adapter_scale)}
    pipe.to(device)

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for p_index, prompt in enumerate(prompts):
        generators = [torch.Generator("cpu").manual_seed(cfg.seed + i) for i in range(cfg.count)]
        images = pipe(
            [prompt] * cfg.count,
            negative_prompt=[cfg.negative_prompt] * cfg.count if cfg.negative_prompt else None,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            height=cfg.height,
            width=cfg.width,
            generator=generators,
            **extra,
        ).images
        for i, image in enumerate(images):
            path = out_dir / f"{p_index:02d}_{_slug(prompt)}_seed{cfg.seed + i}.png"
            if path.exists():
                raise FinetuneError(f"{path} already exists — choose another out_dir")
            save_png(image, path)
            written.append(path)
    log.info("wrote %d images to %s", len(written), out_dir)
    return written


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def main(cfg: DictConfig) -> None:
    run_command(generate, cfg)


if __name__ == "__main__":
    main()
