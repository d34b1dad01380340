"""Experiment loggers (TensorBoard, CSV, Weights & Biases) and the config they are given."""

from __future__ import annotations

import logging
import netrc
import os
from typing import Any
from urllib.parse import urlparse

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from finetune.secrets import mask_secrets

log = logging.getLogger(__name__)


def build_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Instantiate every logger selected with `logger=...` (none, one or several)."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if node]


def log_config(loggers: list[Logger], cfg: DictConfig) -> None:
    """Send the resolved config, secrets masked, to every logger."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    masked = mask_secrets(plain)
    for logger in loggers:
        logger.log_hyperparams(masked)


def wandb_logged_in() -> bool:
    """Whether W&B has credentials (env var or ~/.netrc), checked without any prompt."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(save_dir: str, **kwargs: Any) -> WandbLogger:
    """A WandbLogger that never prompts: online when logged in, offline otherwise."""
    mode = os.environ.get("WANDB_MODE")
    offline = mode in ("offline", "dryrun") or (mode != "disabled" and not wandb_logged_in())
    if offline and mode not in ("offline", "dryrun"):
        log.warning(
            "wandb: not logged in — logging offline under %s/wandb; upload later with "
            "`wandb sync %s/wandb/offline-run-*` (or run `wandb login` first next time)",
            save_dir,
            save_dir,
        )
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(save_dir=save_dir, offline=offline, **kwargs)
