"""Config mistakes fail fast, with one line naming the key, before any model loads."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, compose_config, fast_overrides
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from finetune.config.errors import ConfigError, DataError
from finetune.config.trainer import record_arguments, recorded_arguments, trainer_arguments
from finetune.train import train
from finetune.training.checks import check_config


def run_cli(*args: str, cwd: Path, import_times: bool = False) -> subprocess.CompletedProcess:
    """`finetune-train args…` in a fresh process (with `import_times`, its imports listed on stderr)."""
    python = [sys.executable, "-X", "importtime"] if import_times else [sys.executable]
    return subprocess.run(
        [*python, "-m", "finetune.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )


def test_misspelt_key_on_command_line_names_the_key_and_loads_nothing(tmp_path: Path) -> None:
    never_built = tmp_path / "model"
    result = run_cli(f"model.pretrained={never_built}", "data.batchsize=4", cwd=tmp_path, import_times=True)
    assert result.returncode != 0
    assert "data.batchsize" in result.stderr
    assert not never_built.exists()  # the tiny model would have been built had loading started
    assert not (tmp_path / "outputs").exists()
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "hydra" in imported  # -X importtime listed the imports
    if recorded_arguments() is not None:  # Lightning's arguments recorded for the installed version
        assert "torch" not in imported  # so the error came without torch's seconds of imports


def test_trainer_arguments_recorded_for_the_installed_lightning_read_back_the_same(tmp_path: Path) -> None:
    record_arguments(tmp_path / "args.json")
    assert recorded_arguments(tmp_path / "args.json") == trainer_arguments()
    shipped = recorded_arguments()  # None: another Lightning version, whose arguments are read from it
    assert shipped is None or shipped == trainer_arguments()


def test_trainer_arguments_of_another_lightning_version_are_read_from_lightning(monkeypatch) -> None:
    from finetune.config import trainer

    monkeypatch.setattr(trainer, "lightning_version", lambda: "2.0.0")
    assert trainer.recorded_arguments() is None
    schema = trainer.trainer_schema()
    assert [f.name for f in dataclasses.fields(schema)] == [a.name for a in trainer_arguments()]


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.batch_size=lots", "data.batch_size"),
        ("method.rnak=4", "method.rnak"),
        ("trainer.max_step=3", "max_step"),
    ],
)
def test_bad_keys_and_types_fail_at_compose_time(override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_config([override])
    assert key in str(error.value) + str(error.value.__cause__)


def test_every_lightning_trainer_argument_is_a_config_key() -> None:
    import inspect

    import lightning as L

    cfg = compose_config(["trainer.deterministic=true", "trainer.gradient_clip_val=1.0"])
    ours = {"self", "logger", "callbacks", "plugins"}
    assert set(inspect.signature(L.Trainer.__init__).parameters) - ours == set(cfg.trainer)
    assert cfg.trainer.deterministic is True and cfg.trainer.gradient_clip_val == 1.0


@pytest.mark.parametrize(
    "override, key, choices",
    [
        ("data.crop=middle", "data.crop", "[center, random]"),
        ("optim.scheduler=steep", "optim.scheduler", "[constant, cosine, linear, cosine_with_restarts, poly"),
        ("data.source=s3", "data.source", "[folder, hf]"),
        ("data.cache=ram", "data.cache", "[auto, none, memory, disk]"),
        ("data.missing_caption=drop", "data.missing_caption", "[skip, empty, default, error]"),
        ("model.attention=flash", "model.attention", "[sdpa, xformers, eager]"),
        ("model.prediction_type=x0", "model.prediction_type", "[epsilon, v_prediction]"),
        ("optim.name=sgd", "optim.name", "[adamw, adamw_8bit, adafactor, prodigy]"),
        ("validation.scheduler=heun", "validation.scheduler", "[euler, euler_a, ddim, dpmpp_2m]"),
    ],
)
def test_a_word_that_is_not_a_choice_fails_when_the_config_is_composed(
    override: str, key: str, choices: str
) -> None:
    """Choices are Enum fields of the schema: OmegaConf refuses any other word, naming the key and the
    choices, before anything runs."""
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["model.build_tiny=true", override])
    message = str(error.value) + str(error.value.__cause__)
    assert f"full_key: {key}" in message and f"expected one of {choices}" in message


def test_choices_read_and_print_as_their_words() -> None:
    cfg = compose_config(["data.crop=random", "validation.scheduler=null"])
    assert cfg.data.crop == "random" and f"{cfg.data.crop}" == "random" and str(cfg.data.crop) == "random"
    assert cfg.validation.scheduler is None
    assert OmegaConf.to_container(cfg.data, enum_to_str=True)["crop"] == "random"


def test_a_bad_precision_is_a_one_line_config_error(tiny_model: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        fast_overrides(tmp_path / "never", tmp_path / "run")
        + ["model.build_tiny=true", "trainer.precision=16-mixed"]
    )
    with pytest.raises(ConfigError) as error:
        train(cfg)
    message = str(error.value)
    assert message.startswith("trainer.precision") and "\n" not in message
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["trainer=fsdp", "trainer.precision=16-mixed"], "trainer.precision"),
        (["trainer=fsdp", "model.compile=true"], "model.compile"),
        (["trainer=fsdp", "method=full", "method.ema=true"], "method.ema"),
        # Here deepspeed is missing, and this machine has no GPU: either way a one-line refusal.
        (["trainer=deepspeed"], "trainer.strategy"),
    ],
)
def test_what_a_strategy_cannot_do_is_named_before_anything_loads(overrides: list[str], key: str) -> None:
    cfg = compose_config(["model.build_tiny=true", *overrides])
    with pytest.raises(ConfigError) as error:
        check_config(cfg)
    assert str(error.value).startswith(key) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["data.path=/does/not/exist"], ["data.path", "/does/not/exist"]),
        (["data=hf", "data.name=/no/such/dataset"], ["data.name"]),
    ],
)
def test_data_errors_come_before_the_model_loads(
    tmp_path: Path, overrides: list[str], words: list[str]
) -> None:
    cfg = compose_config(
        fast_overrides(tmp_path / "never", tmp_path / "run") + ["model.build_tiny=true", *overrides]
    )
    with pytest.raises(DataError) as error:
        train(cfg)
    assert all(word in str(error.value) for word in words) and "\n" not in str(error.value)
    assert not (tmp_path / "never").exists()


def test_empty_dataset_and_missing_caption_column(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = compose_config(fast_overrides(tmp_path / "never", tmp_path / "run") + [f"data.path={empty}"])
    with pytest.raises(DataError, match="no usable images"):
        train(cfg)

    from PIL import Image

    folder = tmp_path / "meta"
    folder.mkdir()
    Image.new("RGB", (32, 32), "red").save(folder / "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "caption": "a red square"}\n')
    cfg = compose_config(fast_overrides(tmp_path / "never", tmp_path / "run") + [f"data.path={folder}"])
    with pytest.raises(DataError) as error:
        train(cfg)
    assert "text" in str(error.value) and "caption" in str(error.value)  # names missing and available


@pytest.mark.parametrize(
    "model, overrides, message",
    [
        (
            "tiny",
            ["data.resolution=33"],
            "data.resolution: 33 is not a multiple of the VAE factor 2 — use 32 or 34",
        ),
        ("tiny", ["data.buckets=true", "data.bucket_step=5"], "data.bucket_step: 5 is not a multiple"),
        # A hub model not downloaded yet: every SD VAE's factor, 8.
        ("someone/sd-model", ["data.resolution=100"], "of the VAE factor 8 — use 96 or 104"),
    ],
)
def test_sizes_that_are_not_whole_latents_fail_before_the_model_loads(
    tiny_model: Path, tmp_path: Path, model: str, overrides: list[str], message: str
) -> None:
    pretrained = tiny_model if model == "tiny" else model
    cfg = compose_config(
        fast_overrides(tiny_model, tmp_path / "run") + [f"model.pretrained={pretrained}", *overrides]
    )
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_negative_rank_is_one_line_naming_the_key_before_the_model_loads(tmp_path: Path) -> None:
    never_built = tmp_path / "model"
    result = run_cli(
        f"model.pretrained={never_built}", "model.build_tiny=true", "method.rank=-3", cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: method.rank: -3 must be greater than 0"
    assert not never_built.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.rank=0"], "method.rank: 0 must be greater than 0"),
        (["method.alpha=-1"], "method.alpha: -1.0 must be greater than 0"),
        (["method.dropout=1.5"], "method.dropout: 1.5 must be between 0 and 1"),
        (["method=controlnet", "data.conditioning=canny", "method.lora_rank=0"], "method.lora_rank: 0"),
        (["method=full", "method.ema_decay=2"], "method.ema_decay: 2.0 must be between 0 and 1"),
        (["optim.lr=0"], "optim.lr: 0.0 must be greater than 0"),
        (["optim.lr=-1e-4"], "optim.lr: -0.0001 must be greater than 0"),
        (["optim.betas=[0.9,1.0]"], "optim.betas: 1.0 must be at least 0 and below 1"),
        (["data.caption_dropout=-0.1"], "data.caption_dropout: -0.1 must be between 0 and 1"),
        (["data.conditioning_dropout=1.1"], "data.conditioning_dropout: 1.1 must be between 0 and 1"),
        (["data.batch_size=0"], "data.batch_size: 0 must be at least 1"),
        (["data.sources=[{path: x, weight: 0}]"], "data.sources[0].weight: 0.0 must be greater than 0"),
        (["trainer.max_steps=0"], "trainer.max_steps: 0 must be at least 1"),
        (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches: 0 must be at least 1"),
        (["validation.num_inference_steps=0"], "validation.num_inference_steps: 0 must be at least 1"),
        (["data.max_token_length=100"], "data.max_token_length: 100 must be 75, 150 or 225"),
        (["validation.prompts_file=/no/such/prompts.txt"], "validation.prompts_file: '/no/such/prompts.txt'"),
        (["model.clip_skip=0"], "model.clip_skip: 0 must be at least 1"),
        (
            ["model.zero_terminal_snr=true", "loss.prediction_type=epsilon"],
            "loss.prediction_type: epsilon cannot be learnt with model.zero_terminal_snr=true",
        ),
        (["trainer.precision=17-mixed"], "trainer.precision: '17-mixed' is not one of"),
        (["trainer.precision=16-true"], "trainer.precision: '16-true' trains the weights themselves"),
        (
            ["trainer=ddp", "trainer.strategy=deepspeed_stage_3"],
            "trainer.strategy: 'deepspeed_stage_3' (ZeRO-3)",
        ),
    ],
)
def test_values_out_of_range_are_one_line_errors_before_anything_loads(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    cfg = compose_config(
        fast_overrides(tmp_path / "never", tmp_path / "run") + ["model.build_tiny=true", *overrides]
    )
    with pytest.raises(ConfigError) as error:
        train(cfg)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "never").exists()


def test_the_data_module_checks_its_own_values_too() -> None:
    """`finetune-data` and library users build a data module from a data config alone."""
    from finetune.data import CaptionedImageDataModule

    cfg = compose_config(["data.caption_dropout=3"]).data
    with pytest.raises(ConfigError, match="data.caption_dropout: 3.0 must be between 0 and 1"):
        CaptionedImageDataModule(cfg).scan()


@pytest.mark.parametrize(
    "override",
    [
        "trainer.max_steps=ten",
        "trainer.accumulate_grad_batches=two",
        "trainer.gradient_clip_val=high",
        "trainer.enable_progress_bar=maybe",
        "trainer.precision=[16]",
    ],
)
def test_a_wrong_type_for_a_trainer_field_fails_at_compose_time(override: str) -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_config([override])
    assert override.split("=")[0].removeprefix("trainer.") in str(error.value) + str(error.value.__cause__)


def test_trainer_fields_keep_lightning_meanings() -> None:
    """An int is a count and a float a fraction for Lightning's limit_* fields: neither is converted."""
    cfg = compose_config(["trainer.limit_train_batches=2", "trainer.limit_val_batches=0.5"])
    assert cfg.trainer.limit_train_batches == 2 and isinstance(cfg.trainer.limit_train_batches, int)
    assert cfg.trainer.limit_val_batches == 0.5
    cfg = compose_config(["trainer.devices=[0,1]", "trainer.precision=16", "trainer.deterministic=warn"])
    assert list(cfg.trainer.devices) == [0, 1] and cfg.trainer.precision == 16
