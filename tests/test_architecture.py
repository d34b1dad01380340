"""The house plan holds: imports point one way (import-linter's contract in pyproject.toml), no two
modules import each other, even through imports inside functions, and the contract does catch a
lower room that imports an upper one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
from conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the project's contract, on the `finetune` package found in `package_parent`."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=package_parent,
        env={"PYTHONPATH": str(package_parent), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_layers_contract_is_kept():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 kept, 0 broken" in done.stdout


def test_a_lower_room_importing_an_upper_one_breaks_the_contract(tmp_path):
    copy = tmp_path / "finetune"
    shutil.copytree(REPO / "finetune", copy, ignore=shutil.ignore_patterns("__pycache__"))
    errors = copy / "config" / "errors.py"
    # Even an import inside a function counts: it would be a cycle waiting to happen.
    errors.write_text(errors.read_text() + "\n\ndef _late():\n    import finetune.training.module  # noqa\n")
    done = lint_imports(tmp_path)
    assert done.returncode == 1
    assert "finetune.config is not allowed to import finetune.training" in done.stdout
    assert "finetune.config.errors -> finetune.training.module" in done.stdout


def test_no_modules_import_each_other():
    graph = grimp.build_graph("finetune")
    cycles = [group for group in _strongly_connected(graph) if len(group) > 1]
    assert cycles == []


def _strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Groups of modules that reach each other through imports (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[module])
                if low[module] == index[module]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == module:
                            break
                    groups.append(sorted(group))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
            elif child in on_stack:
                low[module] = min(low[module], index[child])
    return groups
