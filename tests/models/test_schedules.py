"""The schedule a model trains and samples with: prediction type and zero terminal SNR survive into
every sampler made from it, also for scheduler files that leave those keys out (as SD 1.5's does)."""

from __future__ import annotations

import pytest
from diffusers import DDPMScheduler, PNDMScheduler

from finetune.config.errors import ConfigError
from finetune.config.schema import ModelConfig
from finetune.models.schedules import with_schedule_options
from finetune.validation.samples import sampler_from

# SD 1.5's scheduler file: no prediction_type, rescale_betas_zero_snr or timestep_spacing key.
SD15_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim", "dpmpp_2m"])
def test_every_sampler_inherits_the_prediction_type_and_zero_terminal_snr(sampler: str) -> None:
    training = DDPMScheduler.from_config(SD15_SCHEDULER)
    v = with_schedule_options(training, ModelConfig(prediction_type="v_prediction"))
    assert sampler_from(v, sampler).config.prediction_type == "v_prediction"
    ztsnr = with_schedule_options(training, ModelConfig(zero_terminal_snr=True))
    assert ztsnr.alphas_cumprod[-1] == 0 and ztsnr.config.prediction_type == "v_prediction"
    made = sampler_from(ztsnr, sampler).config
    assert made.prediction_type == "v_prediction" and made.rescale_betas_zero_snr
    assert made.timestep_spacing == "trailing"


def test_a_sampler_that_cannot_take_zero_terminal_snr_is_named() -> None:
    with pytest.raises(ConfigError, match="model.zero_terminal_snr: PNDMScheduler cannot sample it"):
        with_schedule_options(PNDMScheduler.from_config(SD15_SCHEDULER), ModelConfig(zero_terminal_snr=True))
