"""Value checks: each number whose range is known (the keys that take one of a few words are Enum
fields of the schema, which OmegaConf checks when the config is composed).

`data.masks`, which names a folder, is checked here too: it must exist.

They run before anything heavy (`checks.check_config`), and the data module runs the `data` ones on
its own config, so a bad value is one line naming the key, whichever command reads it.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, ValidationError

from finetune.config.errors import ConfigError

Rule = tuple[Callable[[Any], bool], str]
ABOVE_ZERO: Rule = (lambda value: value > 0, "must be greater than 0")
AT_LEAST_ONE: Rule = (lambda value: value >= 1, "must be at least 1")
NOT_NEGATIVE: Rule = (lambda value: value >= 0, "must be 0 or more")
PROBABILITY: Rule = (lambda value: 0 <= value <= 1, "must be between 0 and 1")
TOKEN_LENGTHS: Rule = (lambda value: value in (75, 150, 225), "must be 75, 150 or 225 (75-token windows)")
# Numbers whose range is known: checked before anything loads. An unset (null) value passes.
VALUE_RULES: dict[str, Rule] = {
    "method.rank": ABOVE_ZERO,
    "method.alpha": ABOVE_ZERO,
    "method.dropout": PROBABILITY,
    "method.conv_rank": ABOVE_ZERO,
    "method.conv_alpha": ABOVE_ZERO,
    "method.rank_dropout": PROBABILITY,
    "method.module_dropout": PROBABILITY,
    "method.lora_rank": ABOVE_ZERO,
    "method.unet_lora_rank": ABOVE_ZERO,
    "method.conditioning_scale": NOT_NEGATIVE,
    "method.ema_decay": PROBABILITY,
    "method.ema_power": ABOVE_ZERO,
    "optim.lr": ABOVE_ZERO,
    "optim.text_encoder_lr": ABOVE_ZERO,
    "optim.loraplus_ratio": ABOVE_ZERO,
    "optim.eps": ABOVE_ZERO,
    "optim.weight_decay": NOT_NEGATIVE,
    "optim.warmup_steps": NOT_NEGATIVE,
    "optim.max_nonfinite_in_a_row": AT_LEAST_ONE,
    "model.clip_skip": AT_LEAST_ONE,
    "model.compile": (lambda value: value in (True, False, "auto"), "must be true, false or auto"),
    "loss.snr_gamma": ABOVE_ZERO,
    "loss.noise_offset": NOT_NEGATIVE,
    "loss.huber_c": (lambda value: 0 < value <= 1, "must be above 0 and at most 1"),
    "loss.input_perturbation": NOT_NEGATIVE,
    "loss.min_timestep": NOT_NEGATIVE,
    "loss.max_timestep": AT_LEAST_ONE,
    "loss.logit_std": ABOVE_ZERO,
    "loss.unmasked_weight": PROBABILITY,
    "loss.unmasked_probability": PROBABILITY,
    "data.resolution": AT_LEAST_ONE,
    "data.batch_size": AT_LEAST_ONE,
    "data.bucket_step": AT_LEAST_ONE,
    "data.bucket_min_side": AT_LEAST_ONE,
    "data.bucket_max_side": AT_LEAST_ONE,
    "data.bucket_max_ratio": AT_LEAST_ONE,
    "data.max_pixels": AT_LEAST_ONE,
    "data.caption_dropout": PROBABILITY,
    "data.conditioning_dropout": PROBABILITY,
    "data.keep_tokens": NOT_NEGATIVE,
    "data.cache_budget_gib": NOT_NEGATIVE,
    "data.max_token_length": TOKEN_LENGTHS,
    "data.holdout": NOT_NEGATIVE,
    "data.num_workers": NOT_NEGATIVE,
    "data.weight": ABOVE_ZERO,
    "validation.every_n_steps": NOT_NEGATIVE,
    "validation.num_inference_steps": AT_LEAST_ONE,
    "validation.images_per_prompt": AT_LEAST_ONE,
    "validation.guidance_scale": NOT_NEGATIVE,
    "checkpoint.every_n_steps": NOT_NEGATIVE,
    "prior.num_images": NOT_NEGATIVE,
    "prior.loss_weight": NOT_NEGATIVE,
    "prior.guidance_scale": NOT_NEGATIVE,
    "prior.num_inference_steps": AT_LEAST_ONE,
    "prior.batch_size": AT_LEAST_ONE,
    "checkpoint.keep_last": (lambda value: value >= -1, "must be -1 (keep all) or more"),
    "trainer.accumulate_grad_batches": AT_LEAST_ONE,
    "trainer.num_nodes": AT_LEAST_ONE,
    # -1: no step limit (then max_epochs ends the run), as in Lightning
    "trainer.max_steps": (lambda value: value >= 1 or value == -1, "must be at least 1 (or -1: no limit)"),
    "trainer.max_epochs": (lambda value: value >= 1 or value == -1, "must be at least 1 (or -1: no limit)"),
}


def check_values(cfg: Any, section: str | None = None) -> None:
    """Number ranges: of a whole config, or of one section given on its own
    (`check_values(cfg.data, "data")`, as the data module and `finetune-data` have it)."""
    if not OmegaConf.is_config(cfg):  # e.g. a DataConfig built in code: its types are checked here
        try:
            cfg = OmegaConf.structured(cfg)
        except ValidationError as error:
            key = f"{section}.{error.full_key}" if section else error.full_key
            raise ConfigError(f"{key}: {str(error.msg).splitlines()[0]}") from None
    for key, (holds, words) in VALUE_RULES.items():
        value = _select(cfg, key, section)
        if value is not _ABSENT and value is not None and not holds(value):
            raise ConfigError(f"{key}: {value} {words}")
    for number, source in enumerate(_present(_select(cfg, "data.sources", section))):
        if source.weight is not None and source.weight <= 0:
            raise ConfigError(f"data.sources[{number}].weight: {source.weight} must be greater than 0")
    low, high = _select(cfg, "loss.min_timestep", section), _select(cfg, "loss.max_timestep", section)
    if high not in (None, _ABSENT) and low not in (None, _ABSENT) and low >= high:
        raise ConfigError(f"loss.min_timestep: {low} must be below loss.max_timestep ({high})")
    for beta in _present(_select(cfg, "optim.betas", section)):
        if not 0 <= beta < 1:
            raise ConfigError(f"optim.betas: {beta} must be at least 0 and below 1")
    check_masks(_select(cfg, "data.masks", section))
    check_mask_options(cfg, section)


def check_masks(value: Any) -> None:
    """data.masks: `alpha`, or a folder that exists (so a typo fails now, not after the models load)."""
    if value is _ABSENT or not value or str(value) == "alpha":
        return
    folder = Path(str(value)).expanduser()
    if not folder.is_dir():
        problem = (
            "is not a folder" if folder.exists() else f"does not exist (relative paths start at {Path.cwd()})"
        )
        raise ConfigError(
            f"data.masks: '{value}' {problem} — give alpha (each image's alpha channel) or a folder of masks"
        )


# The loss's masked-training options and their "off" values: set to anything else, they need data.masks.
MASK_OPTIONS = {
    "loss.unmasked_weight": 0.0,
    "loss.unmasked_probability": 0.0,
    "loss.normalize_masked_area": False,
}


def check_mask_options(cfg: Any, section: str | None) -> None:
    """The masked-training options of `loss` without `data.masks` would silently do nothing: refused."""
    if section is not None or _select(cfg, "data.masks", section) not in (None, _ABSENT, ""):
        return  # a section alone cannot tell, or masks are on
    for key, off in MASK_OPTIONS.items():
        value = _select(cfg, key, section)
        if value not in (_ABSENT, None) and value != off:
            raise ConfigError(
                f"{key}: weighs the loss masks, which are off — set data.masks=alpha or data.masks=<folder>, "
                f"or leave {key}={str(off).lower()}"
            )


_ABSENT = object()


def _select(cfg: Any, key: str, section: str | None) -> Any:
    """`key`'s value in `cfg` (the whole config, or the `section` node itself), or _ABSENT."""
    if section is not None:
        if not key.startswith(f"{section}."):
            return _ABSENT
        key = key.removeprefix(f"{section}.")
    return OmegaConf.select(cfg, key, default=_ABSENT)


def _present(value: Any) -> Any:
    return () if value is _ABSENT or value is None else value


def lightning_precisions() -> list[str]:
    """Every value `lightning.Trainer(precision=...)` accepts, as text."""
    import lightning as L

    annotation = inspect.signature(L.Trainer.__init__).parameters["precision"].annotation
    options = typing.get_args(annotation)
    literals = [option for option in options if typing.get_origin(option) is typing.Literal]
    return list(dict.fromkeys(str(value) for literal in literals for value in typing.get_args(literal)))


def config_value(cfg: Any, key: str) -> Any:
    """`cfg.key`, with an unset Hydra value (`???`) read as None so we can explain it ourselves."""
    try:
        return getattr(cfg, key)
    except MissingMandatoryValue:
        return None
