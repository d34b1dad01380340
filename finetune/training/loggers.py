"""Experiment loggers (TensorBoard, CSV, Weights & Biases) and the config they are given."""

from __future__ import annotations

import logging
import netrc
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from finetune.config.secrets import mask_secrets, masked_argv

log = logging.getLogger(__name__)


def build_loggers(cfg: DictConfig | None, resuming: bool = False) -> list[Logger]:
    """Instantiate every logger selected with `logger=...` (none, one or several)."""
    if not cfg:
        return []
    loggers = []
    for node in cfg.values():
        if not node:
            continue
        continues = resuming and node.get("_target_") == f"{__name__}.wandb_logger"
        loggers.append(instantiate(node, continue_run=True) if continues else instantiate(node))
    return loggers


def previous_wandb_run(save_dir: Path) -> tuple[str, Path] | None:
    """(id, folder) of the newest W&B run recorded under `<save_dir>/wandb` (`[offline-]run-<time>-<id>`)."""
    runs = sorted((save_dir / "wandb").glob("*run-*-*"), key=lambda p: p.name.split("run-", 1)[1])
    return (runs[-1].name.rsplit("-", 1)[1], runs[-1]) if runs else None


def log_config(loggers: list[Logger], cfg: DictConfig) -> None:
    """Send the resolved config, secrets masked, to every logger."""
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    masked = mask_secrets(plain)
    # The first call starts each logger's run; W&B records the command line then, which may hold a token.
    with masked_argv():
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


def wandb_logger(save_dir: str, continue_run: bool = False, **kwargs: Any) -> WandbLogger:
    """A WandbLogger that never prompts: online when logged in, offline otherwise.

    `continue_run` (a resumed training run): log into the run folder's previous W&B run, by its id.
    """
    mode = os.environ.get("WANDB_MODE")
    offline = mode in ("offline", "dryrun") or (mode != "disabled" and not wandb_logged_in())
    if offline and mode not in ("offline", "dryrun"):
        log.warning(
            "wandb: not logged in — logging offline under %s/wandb; upload later with "
            "`wandb sync %s/wandb/offline-run-*` (or run `wandb login` first next time)",
            save_dir,
            save_dir,
        )
    previous = previous_wandb_run(Path(save_dir)) if continue_run and not kwargs.get("id") else None
    if previous and offline:
        # W&B cannot reopen an offline run; the resumed part becomes its own, joined at upload.
        log.warning(
            "wandb: offline runs cannot be resumed, so this part logs to a new offline run; upload it "
            "into the first with `wandb sync --id %s %s/wandb/offline-run-<newest>`",
            previous[0],
            save_dir,
        )
    elif previous:
        log.info("wandb: continuing run %s", previous[0])
        kwargs.update(id=previous[0], resume="allow")
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(save_dir=save_dir, offline=offline, **kwargs)


def log_exports(loggers: list[Logger], exported: dict[str, Path], run_name: str, step: int) -> None:
    """The exported files as a W&B model artifact of the run (uploaded with it, or by `wandb sync`)."""
    import wandb

    for logger in loggers:
        if not isinstance(logger, WandbLogger) or not exported:
            continue
        name = re.sub(r"[^\w.-]", "_", run_name) + "-export"  # W&B artifact names: letters, digits, - _ .
        artifact = wandb.Artifact(name, type="model", metadata={"step": step})
        for path in exported.values():
            if path.is_dir():
                artifact.add_dir(str(path), name=path.name)
            else:
                artifact.add_file(str(path), name=f"{path.parent.name}/{path.name}")
        logger.experiment.log_artifact(artifact)
