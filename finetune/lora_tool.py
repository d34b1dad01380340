"""`finetune-lora <command> key=value …`: LoRA files without training (see conf/lora_tool.yaml).

finetune-lora inspect file=outputs/<run>/adapter/lora_kohya.safetensors
finetune-lora convert file=a.safetensors to=diffusers model=<base model> out=a_diffusers.safetensors
finetune-lora resize file=a.safetensors rank=8 out=a_r8.safetensors        # or dynamic=0.9
finetune-lora merge model=<base model> loras=[a.safetensors:0.8,b.safetensors:0.5] out=merged
finetune-lora combine loras=[a.safetensors:0.8,b.safetensors:0.5] rank=16 out=ab.safetensors
finetune-lora extract base=<base model> tuned=<fine-tuned model> rank=32 out=extracted.safetensors
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from finetune.config.command_line import expand_home_paths
from finetune.config.errors import ConfigError, run_command
from finetune.config.files import atomic_dir
from finetune.config.schema import ModelConfig
from finetune.config.store import CONF_DIR, register_configs

log = logging.getLogger("finetune")
register_configs()


def run(cfg: DictConfig) -> Any:
    """Carry out `cfg.command`; returns what it printed, as data (for tests and scripts)."""
    # Here, not at the top: `--help` and config errors come without importing torch and peft.
    from finetune.export import lora_tools
    from finetune.export.lora_file import check_output

    command = str(cfg.command)
    if command == "inspect":
        result = lora_tools.inspect(_given(cfg, "file"))
        print(json.dumps(result, indent=2))
        return result
    if command == "convert":
        model = _base_pipeline(cfg.model) if str(cfg.to) == "diffusers" else None
        written = lora_tools.convert(_given(cfg, "file"), str(cfg.to), _given(cfg, "out"), model)
        print(f"written: {written}")
        return written
    if command == "resize":
        result = lora_tools.resize(_given(cfg, "file"), _given(cfg, "out"), cfg.rank, cfg.dynamic)
        for name, (before, after, kept) in result["layers"].items():
            print(f"{name}: rank {before} -> {after}, keeps {kept:.1%} of its change")
        print(f"written: {result['out']}")
        return result
    if command == "combine":
        loras = lora_tools.parse_weighted(cfg.loras)
        result = lora_tools.combine(loras, cfg.rank, _given(cfg, "out"))
        print(f"{len(result['layers'])} layers combined at rank {cfg.rank}; written: {result['out']}")
        return result
    if command == "extract":
        out = check_output(_given(cfg, "out"), [])
        if cfg.rank is None:
            raise ConfigError("rank: extract needs the rank of the LoRA, e.g. rank=32")
        base, tuned = _pipeline(_given(cfg, "base")), _pipeline(_given(cfg, "tuned"))
        result = lora_tools.extract(
            base, tuned, cfg.rank, out, str(cfg.to), conv_rank=cfg.conv_rank, min_diff=cfg.min_diff
        )
        kept = sum(result["layers"].values()) / len(result["layers"])
        print(f"{len(result['layers'])} layers extracted, {kept:.1%} of the change kept on average")
        print(f"written: {result['out']}")
        return result
    return merge(cfg.model, lora_tools.parse_weighted(cfg.loras), _given(cfg, "out"))


def merge(model: Any, loras: list[tuple[str, float]], out: str) -> dict[str, Path]:
    """Fuse weighted LoRA-family files into the base model: a diffusers folder `out`, and for
    SD 1.x / 2.x the original-layout single file `out.safetensors` beside it."""
    from finetune.export.lora_apply import fuse_file, pipeline_models
    from finetune.export.lora_file import read_lora_file

    folder = Path(out).with_suffix("") if Path(out).suffix == ".safetensors" else Path(out)
    single = folder.with_name(f"{folder.name}.safetensors")
    inputs = [Path(path).resolve() for path, _ in loras] + [Path(str(model.pretrained)).resolve()]
    for target in (folder, single):
        if target.exists() or target.resolve() in inputs:
            raise ConfigError(f"out: {target} already exists or is an input; choose a new name")
    pipe = _base_pipeline(model)
    for path, weight in loras:
        changed = fuse_file(pipeline_models(pipe), read_lora_file(path), weight, key="loras")
        log.info("merged %s at %s: %d layers", path, weight, changed)
    written = {"diffusers": folder}
    with atomic_dir(folder) as tmp:
        pipe.save_pretrained(tmp)
    if getattr(pipe, "text_encoder_2", None) is None:
        from finetune.export.single_file import save_single_file

        sources = ",".join(f"{Path(path).name}:{weight}" for path, weight in loras)
        written["single_file"] = save_single_file(pipe, single, metadata={"merged_loras": sources})
    print("written: " + ", ".join(str(path) for path in written.values()))
    return written


def _base_pipeline(model: Any) -> Any:
    """The `model` group's pipeline (the shipped tiny model is built first where it is missing)."""
    from finetune.models.loading import load_pipeline
    from finetune.tiny.builder import ensure_tiny_model

    ensure_tiny_model(model)
    return load_pipeline(model)


def _pipeline(source: str) -> Any:
    from finetune.models.loading import load_pipeline

    return load_pipeline(ModelConfig(pretrained=str(source)))


def _given(cfg: DictConfig, key: str) -> Any:
    value = cfg.get(key)
    if value in (None, ""):
        raise ConfigError(f"{key}: finetune-lora {cfg.command} needs {key}=…")
    return value


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="lora_tool")
def _hydra_main(cfg: DictConfig) -> None:
    run_command(run, cfg)


def main() -> None:
    """`finetune-lora <command> key=value …`: the command word becomes `command=<word>` for Hydra."""
    if len(sys.argv) > 1 and "=" not in sys.argv[1] and not sys.argv[1].startswith("-"):
        sys.argv[1] = f"command={sys.argv[1]}"
    sys.argv[1:] = expand_home_paths(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
