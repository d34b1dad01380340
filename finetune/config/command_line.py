"""The command line before Hydra reads it: home-relative paths as a shell user writes them."""

from __future__ import annotations

import os
import re

# `key=~/path` (or `+key=~user/path`): one path (spaces allowed: the shell quoted it), no sweep or list.
HOME_PATH_OVERRIDE = re.compile(r"^(\+{0,2}[A-Za-z_][\w.\[\]@/-]*=)(~[^,'\"\[\]{}()]*)$")
# `key=[{path: ~/a}, ~/b]`: a path that starts an item of a list or a value of a dict, up to its end.
HOME_PATH_IN_STRUCTURE = re.compile(r"(?<=[\[,{:])(\s*)(~[\w.-]*(?:/[^,\]}]*)?)(?=[,\]}]|$)")


def expand_home_paths(argv: list[str]) -> list[str]:
    """`data.path=~/photos` → `data.path='/home/me/photos'`, and the same for paths in a list or dict
    value (`data.sources=[{path: ~/style}]`). The shell leaves a `~` after `key=` as it is (the word is
    no variable assignment), and Hydra's override grammar has no `~` in unquoted values: the line would
    fail with a lexer error. Expanded paths are quoted, so any character in them holds. Words that hold
    quotes are left as they are: what is quoted for Hydra is meant as written."""
    return [_expanded(word) for word in argv]


def _expanded(word: str) -> str:
    if "'" in word or '"' in word or "\\" in word:
        return word
    if match := HOME_PATH_OVERRIDE.match(word):
        return f"{match.group(1)}{_quoted(match.group(2))}"
    key, equals, value = word.partition("=")
    if equals and value[:1] in "[{":
        return key + equals + HOME_PATH_IN_STRUCTURE.sub(lambda m: m.group(1) + _quoted(m.group(2)), value)
    return word


def _quoted(path: str) -> str:
    return "'" + os.path.expanduser(path.rstrip()) + "'"
