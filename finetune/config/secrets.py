"""Keep secrets out of logs and files: values of secret-looking keys are masked wherever config goes."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from finetune.config.files import atomic_path

MASK = "***"
# A key is secret by its words (`WANDB_API_KEY` -> wandb, api, key), never by a word that merely
# contains one of these: `keep_tokens`, `max_token_length` and `tokenizer` are settings, not secrets.
_SECRET_WORDS = set("secret secrets password passwd passphrase credential credentials apikey".split())
_SECRET_PAIRS = {("api", "key"), ("private", "key"), ("access", "key")}
_SECRET_LAST_WORDS = {"token"}  # hf_token, access_token; but token_file is a path, not a secret
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
# `key=value` inside a string, as in Hydra's override lists and `override_dirname` ("a=1,b=2").
_ASSIGNMENT = re.compile(r"([\w.+~/-]+)=([^,\s]*)")


def is_secret_key(key: str) -> bool:
    """Whether a config key names a secret, judged by the words of its last dotted part."""
    words = [word.lower() for word in _WORD.findall(str(key).rsplit(".", 1)[-1])]
    if not words:
        return False
    pairs = set(zip(words, words[1:], strict=False))
    return bool(_SECRET_WORDS.intersection(words) or _SECRET_PAIRS & pairs or words[-1] in _SECRET_LAST_WORDS)


def mask_text(text: str) -> str:
    """`text` with the value of every `key=value` whose key looks secret replaced by the mask."""
    return _ASSIGNMENT.sub(
        lambda m: f"{m.group(1)}={MASK}" if is_secret_key(m.group(1)) else m.group(0), text
    )


def mask_secrets(value: Any) -> Any:
    """A copy of a plain config (dicts/lists/strings) with every secret-looking value masked."""
    if isinstance(value, dict):
        return {k: MASK if is_secret_key(k) and v else mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    if isinstance(value, str):
        return mask_text(value)
    return value


def mask_hydra_files(folder: Path) -> None:
    """Rewrite Hydra's record of the run (`.hydra/*.yaml`: config, overrides) with secrets masked.

    Hydra saves these before our code runs; a token given on the command line would otherwise stay
    on disk next to the run's outputs.
    """
    for path in sorted(folder.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        masked = mask_secrets(data)
        if masked != data:
            with atomic_path(path) as tmp:
                tmp.write_text(yaml.safe_dump(masked, sort_keys=False))


@contextmanager
def masked_argv() -> Iterator[None]:
    """`sys.argv` with secrets masked for the block: for libraries that record the command line
    (W&B puts it in the run's metadata). Only for the block, since DDP relaunches the real one."""
    real = sys.argv
    sys.argv = [real[0], *(mask_text(arg) for arg in real[1:])]
    try:
        yield
    finally:
        sys.argv = real
