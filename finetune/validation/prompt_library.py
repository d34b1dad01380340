"""Validation prompts with settings of their own: `validation.prompts`, or a prompt library file
(`validation.prompts_file`) as kohya sd-scripts reads it (one prompt per line with `--n`, `--w`, `--h`,
`--d`, `--l`, `--s`, `--ss`) or as yaml / json records. Read when the config is checked, so a bad file fails
before any model loads."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from finetune.config.errors import ConfigError
from finetune.config.schema import Sampler

# kohya's one-letter flags and the settings they set, with how to read their values.
FLAGS: dict[str, tuple[str, type]] = {
    "n": ("negative_prompt", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "l": ("guidance_scale", float),
    "s": ("num_inference_steps", int),
    "ss": ("sampler", str),
}
# kohya's names for the samplers we have (its others, e.g. heun or dpm_2, are refused by name).
KOHYA_SAMPLERS = {"k_euler": Sampler.euler, "k_euler_a": Sampler.euler_a, "dpmsolver++": Sampler.dpmpp_2m}
# A flag starts at " --<letters> " (or at the line's end); a prompt's own "--" elsewhere stays text.
# Each setting's type; the prompts themselves are text.
KINDS: dict[str, type] = dict(FLAGS.values())
_FLAG = re.compile(r"\s--([A-Za-z]+)(?=\s|$)")
SIZE_STEP = 8  # the pipelines' latents: width and height must be multiples of 8


@dataclass(frozen=True)
class SamplePrompt:
    """One row of the sample grid: a prompt and the settings it is drawn with."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int  # image i of the row uses seed + i
    guidance_scale: float
    num_inference_steps: int
    sampler: str | None = None  # null: validation.scheduler

    def describe(self) -> str:
        """The prompt with its settings, for grid captions in the dashboard."""
        negative = f", not: {self.negative_prompt}" if self.negative_prompt else ""
        sampler = f", {self.sampler}" if self.sampler else ""
        return (
            f"{self.prompt} [{self.width}x{self.height}, seed {self.seed}, guidance {self.guidance_scale:g}, "
            f"{self.num_inference_steps} steps{sampler}{negative}]"
        )


def sample_prompts(cfg: Any, resolution: int) -> list[SamplePrompt]:
    """The validation prompts with their settings: the library file's, else `validation.prompts`, each
    with the `validation.*` settings at `resolution`."""
    defaults = SamplePrompt(
        prompt="",
        negative_prompt=cfg.negative_prompt or "",
        width=resolution,
        height=resolution,
        seed=int(cfg.seed),
        guidance_scale=float(cfg.guidance_scale),
        num_inference_steps=int(cfg.num_inference_steps),
    )
    if not cfg.prompts_file:
        return [replace(defaults, prompt=str(prompt)) for prompt in cfg.prompts]
    return read_prompts_file(Path(str(cfg.prompts_file)).expanduser(), defaults)


def read_prompts_file(path: Path, defaults: SamplePrompt) -> list[SamplePrompt]:
    """A `.txt` file of kohya prompt lines (blank lines and `#` comments skipped), or `.yaml` / `.yml` /
    `.json` records: strings, or mappings with `prompt` and any of the settings."""
    key = "validation.prompts_file"
    if not path.is_file():
        raise ConfigError(f"{key}: '{path}' is not a file")
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        text = path.read_text(encoding="utf-8")
        records = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        if isinstance(records, dict) and "prompts" in records:
            records = records["prompts"]
        if not isinstance(records, list):
            raise ConfigError(f"{key}: {path.name} must hold a list of prompts (or a 'prompts' list)")
        prompts = [
            _from_record(record, defaults, f"{path.name} record {n}") for n, record in enumerate(records, 1)
        ]
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [
            parse_prompt_line(line, defaults, f"{path.name} line {n}")
            for n, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    if not prompts:
        raise ConfigError(f"{key}: {path} holds no prompts")
    return prompts


def parse_prompt_line(line: str, defaults: SamplePrompt, where: str = "prompt") -> SamplePrompt:
    """`a castle --n blurry --w 768 --h 512 --d 42 --l 6.5 --s 30` → its SamplePrompt."""
    parts = _FLAG.split(" " + line.strip())
    settings: dict[str, Any] = {"prompt": parts[0].strip()}
    for flag, value in zip(parts[1::2], parts[2::2], strict=True):
        flag = flag.lower()  # kohya reads --W as --w
        if flag not in FLAGS:
            known = ", ".join(f"--{name}" for name in FLAGS)
            raise ConfigError(f"validation.prompts_file: {where}: unknown flag --{flag} (known: {known})")
        settings[FLAGS[flag][0]] = value.strip()
    return _checked(settings, defaults, where)


def _from_record(record: Any, defaults: SamplePrompt, where: str) -> SamplePrompt:
    if isinstance(record, str):
        record = {"prompt": record}
    if not isinstance(record, dict):
        raise ConfigError(f"validation.prompts_file: {where} must be a prompt or a mapping with 'prompt'")
    unknown = set(record) - {f.name for f in fields(SamplePrompt)}
    if unknown:
        raise ConfigError(f"validation.prompts_file: {where}: unknown key(s) {', '.join(sorted(unknown))}")
    # A key set to null (yaml `~`, json null) is left to the defaults, as if absent.
    return _checked({key: value for key, value in record.items() if value is not None}, defaults, where)


def _checked(settings: dict[str, Any], defaults: SamplePrompt, where: str) -> SamplePrompt:
    """Settings as their types, checked, over the defaults."""
    key = f"validation.prompts_file: {where}"
    if not str(settings.get("prompt") or "").strip():
        raise ConfigError(f"{key}: the prompt is empty")
    typed: dict[str, Any] = {}
    for f in fields(SamplePrompt):
        if f.name not in settings:
            continue
        kind = KINDS.get(f.name, str)
        try:
            typed[f.name] = kind(settings[f.name])
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {f.name} '{settings[f.name]}' is not a {kind.__name__}") from None
    prompt = replace(defaults, **typed)
    for name in ("width", "height"):
        size = getattr(prompt, name)
        if size < SIZE_STEP or size % SIZE_STEP:
            raise ConfigError(f"{key}: {name} {size} must be a positive multiple of {SIZE_STEP}")
    if prompt.num_inference_steps < 1 or prompt.guidance_scale < 0:
        raise ConfigError(f"{key}: steps must be at least 1 and guidance 0 or more")
    if prompt.sampler is not None:
        prompt = replace(prompt, sampler=sampler_name(prompt.sampler, key))
    return prompt


def sampler_name(name: str, key: str) -> str:
    """One of our samplers, by our name or kohya's (`k_euler`, `k_euler_a`, `dpmsolver++`)."""
    name = name.strip().lower()
    return (KOHYA_SAMPLERS.get(name) or Sampler.of(name, f"{key}: sampler")).value
