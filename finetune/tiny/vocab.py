"""Build a small CLIP BPE tokenizer offline.

Real Stable Diffusion models ship a 49k-entry CLIP vocabulary that we cannot download here, so the
tiny model gets its own: every byte symbol (alone and as a word end), plus whole-word tokens for a
list of words built up by left-to-right merges. Any text still tokenizes (down to single bytes).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Words the tiny model's captions use; each becomes one token.
DEFAULT_WORDS = (
    "a an the of on in with and at small large big tiny left right top bottom center middle "
    "background red green blue yellow orange purple pink white black gray grey brown cyan "
    "circle square triangle star shape shapes style photo painting drawing picture"
).split()


def _byte_symbols() -> list[str]:
    """The GPT-2/CLIP byte-to-unicode table: one printable symbol per byte value."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def build_vocab(words: tuple[str, ...] | list[str] = DEFAULT_WORDS) -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merges) for a CLIP tokenizer that knows `words` as whole tokens."""
    symbols = _byte_symbols()
    tokens: list[str] = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    seen = set(tokens)
    for word in dict.fromkeys(w.lower() for w in words):
        if len(word) < 2:
            continue
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = pieces[0]
        for piece in pieces[1:]:
            merged = prefix + piece
            if merged not in seen:
                merges.append(f"{prefix} {piece}")
                tokens.append(merged)
                seen.add(merged)
            prefix = merged
    tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_tokenizer(
    directory: Path, words: tuple[str, ...] | list[str] = DEFAULT_WORDS, max_length: int = 77
) -> CLIPTokenizer:
    """Write vocab.json/merges.txt (the files real CLIP tokenizers ship) and load them back."""
    vocab, merges = build_vocab(words)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(directory, model_max_length=max_length)
