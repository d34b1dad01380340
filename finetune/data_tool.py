"""`finetune-data`: scan the configured data and print its report; fill the latent cache ahead of training.

    finetune-data data=folder data.path=~/my_style data.buckets=true     # the report
    finetune-data data=folder data.path=~/my_style data.verify=true      # also decode every image
    finetune-data data=folder data.path=~/my_style data.cache=disk       # and fill the cache

It takes the same config as `finetune-train`, so what it reports is what training will see.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from finetune.config.command_line import expand_home_paths
from finetune.config.errors import run_command
from finetune.config.store import CONF_DIR, register_configs
from finetune.training.checks import check_config

log = logging.getLogger("finetune")
register_configs()


def data_report(cfg: DictConfig) -> dict[str, Any]:
    """Scan `cfg.data`, print the report (every skipped file listed) and return it."""
    from finetune.data.report import build_report, format_report, write_report
    from finetune.data.scan import scan_data
    from finetune.data.source_settings import regularisation_sources

    check_config(cfg)
    if cfg.prior.path and Path(cfg.prior.path).expanduser().is_dir():  # the class images there so far
        from finetune.training.class_images import with_class_images

        cfg.data = with_class_images(cfg.data, cfg.prior)
    scan = scan_data(cfg.data, cfg.seed)
    if cfg.data.cache == "disk":
        fill_disk_cache(cfg, scan)  # images that fail to decode leave the scan, with their reason
    elif cfg.data.cache in ("memory", "auto"):
        log.info(
            "data.cache=%s is decided and filled in the training process; use data.cache=disk to fill ahead",
            cfg.data.cache,
        )
    tokenizer = load_tokenizer(cfg.model)
    reg = regularisation_sources(cfg.data)
    report = build_report(scan.result, scan.sizes, tokenizer, cfg.data.max_token_length, reg)
    print(format_report(report))
    if cfg.get("report"):
        print(f"report written to {write_report(report, Path(cfg.report))}")
    return report


def fill_disk_cache(cfg: DictConfig, scan: Any) -> None:
    """Encode every image and caption the cache lacks, on the GPU when there is one."""
    import dataclasses

    import torch

    from finetune.data import CaptionedImageDataModule
    from finetune.models.loading import load_components, weight_dtype_for
    from finetune.tiny.builder import ensure_tiny_model

    ensure_tiny_model(cfg.model)
    components = load_components(cfg.model, weight_dtype_for(cfg.trainer.precision))
    components = dataclasses.replace(components, max_token_length=cfg.data.max_token_length)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for model in (components.vae, *components.text_encoders):
        model.to(device)
    datamodule = CaptionedImageDataModule(cfg.data, components.prompts.captions, cfg.seed, scan=scan)
    cache = datamodule.prepare_cache(components.vae, components.prompts)
    print(f"cache: {cache.computed} entries computed, {cache.reused} already there ({cache.store.directory})")


def load_tokenizer(model_cfg: Any) -> Any:
    """The model's tokenizer alone (for caption lengths in tokens), or None if it cannot be loaded."""
    from transformers import AutoTokenizer

    from finetune.models.loading import resolve_source
    from finetune.tiny.builder import ensure_tiny_model

    try:
        ensure_tiny_model(model_cfg)
        source = resolve_source(model_cfg)
        return AutoTokenizer.from_pretrained(source, subfolder="tokenizer", revision=model_cfg.revision)
    except Exception as error:  # a single-file checkpoint, no network …: lengths in words still work
        log.info("caption lengths in words only: no tokenizer from %s (%s)", model_cfg.pretrained, error)
        return None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="data_tool")
def _hydra_main(cfg: DictConfig) -> None:
    run_command(data_report, cfg)


def main() -> None:
    sys.argv[1:] = expand_home_paths(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
