"""The wheel on its own: it carries conf/, the shipped tiny model and the bundled datasets, and an install
of it apart from the checkout trains the embedded default from any directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, compose_config
from safetensors import safe_open

BUNDLED = "finetune/_bundled"  # where the wheel keeps conf/ and data/ (pyproject.toml)


def test_the_package_list_holds_every_package_and_bundled_folder() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    code = {
        ".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "finetune").rglob("__init__.py")
    }
    assert sorted(listed) == sorted(code | _bundled_packages("conf") | _bundled_packages("data"))


def _bundled_packages(folder: str) -> set[str]:
    """The importable names setuptools sees in a bundled folder: each subfolder named like a package."""
    root = REPO / folder
    folders = [root, *(path for path in root.rglob("*") if path.is_dir())]
    parts = [path.relative_to(root).parts for path in folders]
    return {".".join(["finetune._bundled", folder, *p]) for p in parts if all(x.isidentifier() for x in p)}


@pytest.mark.parametrize(("missing", "key"), [("tiny-sd", "model.pretrained"), ("style", "data.path")])
def test_a_missing_bundled_file_is_one_error_naming_the_key(
    missing: str,
    key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from finetune.config import store
    from finetune.config.errors import run_command
    from finetune.train import train

    install = tmp_path / "install"  # a broken install: one of the two bundled folders is gone
    for name in {"tiny-sd", "style"} - {missing}:
        (install / "data").mkdir(parents=True, exist_ok=True)
        (install / "data" / name).symlink_to(REPO / "data" / name)
    cfg = compose_config([f"run_dir={tmp_path / 'run'}", "trainer.accelerator=cpu"])
    monkeypatch.setattr(store, "PROJECT_DIR", install)
    with pytest.raises(SystemExit) as stopped:
        run_command(train, cfg)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert error.startswith(f"error: {key}: the bundled data/{missing} is missing from this install"), error


@pytest.mark.slow
def test_the_wheel_installed_apart_trains_the_embedded_default_from_any_directory(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")  # the build backend, used from this environment (no network)
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in ["conf", "data"]:  # every config and every bundled file, at the place store.py looks
        shipped = {
            f"{BUNDLED}/{p.relative_to(REPO).as_posix()}" for p in (REPO / source).rglob("*") if p.is_file()
        }
        assert shipped <= names, sorted(shipped - names)[:5]
    assert f"{BUNDLED}/data/tiny-sd/unet/diffusion_pytorch_model.safetensors" in names
    for reference in re.findall(r"\$\{bundled:([^}]+)\}", _all_configs()):
        assert any(name.startswith(f"{BUNDLED}/{reference}/") for name in names), reference

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**_env_without_pythonpath(), "PYTHONPATH": str(site)}
    where = _run(
        [sys.executable, "-c", "import finetune.config.store as s; print(s.__file__); print(s.CONF_DIR)"],
        cwd=elsewhere,
        env=env,
    ).stdout.split()
    assert where == [str(site / "finetune/config/store.py"), str(site / BUNDLED / "conf")]

    run_dir = tmp_path / "run"
    overrides = [
        "trainer.max_steps=2",
        "trainer.accelerator=cpu",
        "trainer.enable_model_summary=false",
        "validation.every_n_steps=0",
        "checkpoint.every_n_steps=0",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    ]
    _run([str(site / "bin" / "finetune-train"), *overrides], cwd=elsewhere, env=env)
    with safe_open(run_dir / "adapter" / "pytorch_lora_weights.safetensors", "pt") as handle:
        header = handle.metadata()
    assert header["steps"] == "2"
    assert header["base_model"] == str(site / BUNDLED / "data" / "tiny-sd")  # the wheel's own model
    assert header["num_train_images"] == "40"  # the wheel's bundled style set


def _build_wheel(tmp_path: Path) -> Path:
    """`pip wheel` of a copy of the sources, so no build/ or egg-info lands in the checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy2(REPO / name, source / name)
    for name in ["finetune", "conf", "data"]:
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    _run([*pip_wheel, "-w", str(dist), str(source)])
    (wheel,) = dist.glob("finetune-*.whl")
    return wheel


def _all_configs() -> str:
    return "\n".join(path.read_text() for path in sorted((REPO / "conf").rglob("*.yaml")))


def _env_without_pythonpath() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
