"""The noise schedule a model trains and samples with: its prediction type, and zero terminal SNR
(Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed"), through diffusers'
own scheduler options."""

from __future__ import annotations

from typing import Any

from finetune.config.schema import ModelConfig, PredictionType


def with_schedule_options(scheduler: Any, cfg: ModelConfig) -> Any:
    """`scheduler` (training's DDPM, or a pipeline's sampler) with `model.prediction_type`, and with
    `model.zero_terminal_snr` its betas rescaled so that the last timestep is pure noise (ᾱ_T = 0),
    timesteps spaced from the end, and v-prediction (epsilon cannot be learnt at zero SNR). Samplers
    made `from_config` of the result inherit all three."""
    if cfg.zero_terminal_snr:
        scheduler = type(scheduler).from_config(
            scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
        )
        set_prediction_type(scheduler, cfg.prediction_type or PredictionType.v_prediction)
    elif cfg.prediction_type is not None:
        set_prediction_type(scheduler, cfg.prediction_type)
    return scheduler


def set_prediction_type(scheduler: Any, prediction_type: str) -> None:
    """Override what the U-Net predicts (the scheduler config is the source of truth)."""
    kind = PredictionType.of(prediction_type, "prediction_type")
    scheduler.register_to_config(prediction_type=kind.value)
