"""Where the configs live, and the schemas and resolvers Hydra composes them with."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from hydra.core.config_loader import ConfigLoader
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from finetune.config.errors import ConfigError
from finetune.config.lora_tool import LoraToolConfig
from finetune.config.methods import ControlNetMethodConfig, FullMethodConfig, LoraMethodConfig
from finetune.config.prior import PriorConfig
from finetune.config.runs import run_stamp
from finetune.config.schema import (
    CheckpointConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ValidationConfig,
)
from finetune.config.trainer import trainer_schema


def _project_dir() -> Path:
    """The folder holding conf/ and data/. A wheel carries its own copy inside the package
    (finetune/_bundled, mapped in pyproject.toml); a checkout or an editable install has none there and
    uses the repository's own folders."""
    packaged = Path(str(resources.files("finetune") / "_bundled"))
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2]


# Absolute, so the console scripts find it whatever the working directory (Hydra would otherwise
# look for a Python package named `conf`).
PROJECT_DIR = _project_dir()
CONF_DIR = PROJECT_DIR / "conf"


class BundledFileMissing(ConfigError, InterpolationResolutionError):
    """A `${bundled:…}` file this install lacks. As an OmegaConf resolution error it reaches the caller
    unwrapped, with the key it was resolved for; as a ConfigError it is printed without a traceback."""

    def __str__(self) -> str:
        # OmegaConf re-raises it with the key being resolved in `full_key`, also appended to the message
        # on lines of its own: one line, the key first, as our other config errors read.
        reason = super().__str__().splitlines()[0]
        return f"{self.full_key}: {reason}" if self.full_key else reason


def bundled_path(relative: str) -> str:
    """`${bundled:data/tiny-sd}` in a config: a file shipped with finetune, from any cwd."""
    path = PROJECT_DIR / relative
    if not path.exists():
        raise BundledFileMissing(
            f"the bundled {relative} is missing from this install (no {path}) — reinstall finetune, "
            "or set it to a copy of your own"
        )
    return str(path)


def config_groups() -> str:
    """`--help`'s config groups (`${config_groups:}` in `hydra.help.template`), one `group: a, b` line
    each. Hydra's own list also names the schemas stored in the groups, which the YAML choices extend but
    which are no choice themselves."""
    loader = GlobalHydra.instance().config_loader()
    lines = []
    for group in sorted(_app_groups(loader)):
        choices = set(loader.get_group_options(group)) - _stored_schemas(group)
        if choices:
            lines.append(f"{group}: {', '.join(sorted(choices))}")
    return "\n".join(lines)


def _app_groups(loader: ConfigLoader, parent: str = "") -> Iterator[str]:
    """Every config group below `parent`, nested ones too, except Hydra's own (`hydra/…`)."""
    for name in loader.list_groups(parent):
        group = f"{parent}/{name}" if parent else name
        if group != "hydra":
            yield group
            yield from _app_groups(loader, group)


def _stored_schemas(group: str) -> set[str]:
    """The names register_configs stored in `group`: every config our ConfigStore holds there is a schema."""
    try:
        return {name.removesuffix(".yaml") for name in ConfigStore.instance().list(group)}
    except OSError:  # nothing stored in this group
        return set()


def register_configs() -> None:
    """Make the schemas available to `conf/` files as `<group>/schema`, and the resolvers they use."""
    if not OmegaConf.has_resolver("bundled"):
        OmegaConf.register_new_resolver("bundled", bundled_path)
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
        OmegaConf.register_new_resolver("config_groups", config_groups)
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
    store.store(name="prior_schema", node=PriorConfig, package="prior")
    store.store(name="lora_tool_schema", node=LoraToolConfig)
