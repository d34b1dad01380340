"""Where the configs live, and the schemas and resolvers Hydra composes them with."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from finetune.config.runs import run_stamp
from finetune.config.schema import (
    CheckpointConfig,
    ControlNetMethodConfig,
    DataConfig,
    FullMethodConfig,
    LoraMethodConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ValidationConfig,
)
from finetune.config.trainer import trainer_schema

# Absolute, so the console scripts find it whatever the working directory (Hydra would otherwise
# look for a Python package named `conf`).
PROJECT_DIR = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_DIR / "conf"


def bundled_path(relative: str) -> str:
    """`${bundled:data/tiny-sd}` in a config: a file shipped in the project's folder, from any cwd."""
    return str(PROJECT_DIR / relative)


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
    store.store(group="trainer", name="schema", node=trainer_schema())
    store.store(name="loss_schema", node=LossConfig, package="loss")
    store.store(name="optim_schema", node=OptimConfig, package="optim")
    store.store(name="validation_schema", node=ValidationConfig, package="validation")
    store.store(name="checkpoint_schema", node=CheckpointConfig, package="checkpoint")
