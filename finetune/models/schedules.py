"""The noise schedule a model trains and samples with: its prediction type, and zero terminal SNR
(Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed"), through diffusers'
own scheduler options."""

from __future__ import annotations

import inspect
from typing import Any

from finetune.config.errors import ConfigError
from finetune.config.schema import PredictionType


def with_schedule_options(scheduler: Any, cfg: Any, prediction_type: str | None = None) -> Any:
    """`scheduler` (training's DDPM, or a sampler) rebuilt with the prediction type (`prediction_type`,
    else `model.prediction_type`), and with `model.zero_terminal_snr` its betas rescaled so that the
    last timestep is pure noise (ᾱ_T = 0), timesteps spaced from the end, and v-prediction (epsilon
    cannot be learnt at zero SNR). Samplers made `from_config` of the result inherit all three.

    Rebuilt, not edited in place: a key the model's scheduler file leaves out stays marked as a default
    when set in place, and the next `from_config` would quietly drop it again."""
    options: dict[str, Any] = {}
    kind = prediction_type or cfg.prediction_type
    if cfg.zero_terminal_snr:
        if "rescale_betas_zero_snr" not in inspect.signature(type(scheduler).__init__).parameters:
            raise ConfigError(
                f"model.zero_terminal_snr: {type(scheduler).__name__} cannot sample it — choose a sampler "
                "that can: euler, euler_a, ddim or dpmpp_2m"
            )
        options = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
        kind = kind or PredictionType.v_prediction
    return predicting(scheduler, kind, **options)


def predicting(scheduler: Any, prediction_type: str | None, **options: Any) -> Any:
    """`scheduler` rebuilt to say the U-Net predicts `prediction_type` (as it was if None), with any
    other config `options`."""
    if prediction_type is not None:
        options["prediction_type"] = PredictionType.of(prediction_type, "prediction_type").value
    return type(scheduler).from_config(scheduler.config, **options) if options else scheduler
