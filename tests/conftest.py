"""Shared fixtures: the real Hydra config, shrunk for fast CPU tests, and a tiny model on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs pytest-xdist workers side by side: each gets its share of the cores (and passes it
# on to the training processes it starts), so workers do not fight over the same cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
STYLE_DATA = REPO / "data" / "style"


def compose_config(overrides: list[str]):
    """Compose `conf/train.yaml` exactly as `finetune-train` does, with overrides."""
    from hydra import compose, initialize_config_dir

    import finetune.train  # noqa: F401  (registers the config schemas)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD pipeline saved as a diffusers folder, built once per test session."""
    from finetune.tiny.builder import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL pipeline (two text encoders, size conditioning) as a diffusers folder."""
    from finetune.tiny.builder import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def fast_overrides(tiny_model: Path, run_dir: Path, steps: int = 4) -> list[str]:
    """A few CPU steps on the tiny model, short validation, CSV logs."""
    return [
        f"model.pretrained={tiny_model}",
        f"run_dir={run_dir}",
        f"data.path={STYLE_DATA}",
        # Images straight from disk: the suite's ~150 runs skip the cache pre-pass (seconds each in CI).
        # data.cache=auto, the default, has its own tests (tests/data/test_cache_policy.py, test_prior.py).
        "data.cache=none",
        "data.batch_size=2",
        f"trainer.max_steps={steps}",
        "trainer.accelerator=cpu",
        "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1",
        "validation.every_n_steps=2",
        "validation.num_inference_steps=2",
        "validation.prompts=[a red circle]",
        "checkpoint.every_n_steps=2",
        "logger=csv",
    ]


def strategy_args(
    tiny_model: Path, run_dir: Path, strategy: str, steps: int, accelerator: str = "cpu", devices: int = 2
) -> list[str]:
    """A short LoRA run with `trainer=<strategy>`, a checkpoint every 2 steps, CSV logs."""
    return [
        f"trainer={strategy}",
        f"trainer.accelerator={accelerator}",
        f"trainer.devices={devices}",
        f"trainer.max_steps={steps}",
        "trainer.enable_model_summary=false",
        f"model.pretrained={tiny_model}",
        f"data.path={STYLE_DATA}",
        "data.batch_size=2",
        "validation.every_n_steps=0",
        "validation.num_inference_steps=2",
        "validation.prompts=[a red circle]",
        "checkpoint.every_n_steps=2",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    ]


def logged_metric(run_dir: Path, name: str) -> dict[int, float]:
    """step -> value of one metric, as the CSV logger wrote it under `<run_dir>/csv/`."""
    import csv

    with open(run_dir / "csv" / "metrics.csv") as handle:
        return {int(row["step"]): float(row[name]) for row in csv.DictReader(handle) if row.get(name)}


def run_module(module: str, args: list[str], cwd: Path = REPO, returncode: int | None = 0, **env: str):
    """Run `python -m <module> <args>` as a user would (no network, one thread); assert it exited with
    `returncode` (None: any)."""
    import subprocess
    import sys

    environment = dict(
        os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"
    )
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert returncode is None or done.returncode == returncode, done.stderr[-3000:]
    return done


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip, with the reason shown, where CUDA is missing. The long end-to-end runs
    (`slow`) go first: `make test` hands whole files to its xdist workers as they free up
    (`--dist loadfile`, so a module's fixtures are built once), files with long tests first, so the
    workers finish together."""
    import torch

    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bench_models():
    """`scripts/bench_models.py`: full-size SD architectures with random weights (scripts/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_models", REPO / "scripts" / "bench_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
