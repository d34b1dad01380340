"""`finetune-data`: scan the configured data and print its report; fill the latent cache ahead of training.

    finetune-data data=folder data.path=~/my_style data.buckets=true     # the report
    finetune-data data=folder data.path=~/my_style data.verify=true      # also decode every image
    finetune-data data=folder data.path=~/my_style data.cache=disk       # and fill the cache

It takes the same config as `finetune-train`, so what it reports is what training will see.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from finetune.config import CONF_DIR, check_config, register_configs
from finetune.errors import run_command

log = logging.getLogger("finetune")
register_configs()


def data_report(cfg: DictConfig) -> dict[str, Any]:
    """Scan `cfg.data`, print the report (every skipped file listed) and return it."""
    from finetune.data import CaptionedImageDataModule
    from finetune.data.report import build_report, format_report, write_report

    check_config(cfg)
    datamodule = CaptionedImageDataModule(cfg.data, seed=cfg.seed)
    datamodule.scan()
    assert datamodule.scan_result is not None
    report = build_report(datamodule.scan_result, datamodule.sizes, load_tokenizer(cfg.model))
    print(format_report(report))
    if cfg.get("report"):
        print(f"report written to {write_report(report, Path(cfg.report))}")
    return report


def load_tokenizer(model_cfg: Any) -> Any:
    """The model's tokenizer alone (for caption lengths in tokens), or None if it cannot be loaded."""
    from transformers import AutoTokenizer

    from finetune.models import resolve_source

    try:
        source = resolve_source(model_cfg)
        return AutoTokenizer.from_pretrained(source, subfolder="tokenizer", revision=model_cfg.revision)
    except Exception as error:  # a single-file checkpoint, no network …: lengths in words still work
        log.info("caption lengths in words only: no tokenizer from %s (%s)", model_cfg.pretrained, error)
        return None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="data_tool")
def main(cfg: DictConfig) -> None:
    run_command(data_report, cfg)


if __name__ == "__main__":
    main()
