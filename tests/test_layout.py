"""The repository's shape, as a maintainer meets it: imports that only go down, one entry point, the
training loop on one screen, docs whose paths exist, a command line that answers at once."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "uniter_ds"

# Each floor imports only from the floors below it (and within itself).
FLOORS = [
    {"model"},
    {"data", "provenance", "run_layout", "checkpoint_files", "plotting"},
    {"export"},
    {"train"},
    {"analysis", "bench"},
    {"cli", "__init__"},
]


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[str]:
    """Every module of the package that ``path`` imports (relative imports resolved), at any depth."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names] if target == "uniter_ds" else [target]
            found += [name for name in names if name.startswith("uniter_ds")]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("uniter_ds")]
    return found


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_imports_only_go_down_the_floors():
    floor_of = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}
    upward = []
    for path in _python_files("uniter_ds"):
        here = _room(".".join(path.relative_to(ROOT).with_suffix("").parts))
        assert here in floor_of, f"{path}: a room not on any floor; add it to FLOORS"
        for target in _imports(path):
            there = _room(target)
            if there != here and floor_of[there] >= floor_of[here]:
                upward.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not upward, upward


def test_only_the_command_line_and_the_launcher_start_the_entry_point():
    """pretrain.py is the rank's entry point: the library lives in the modules it calls."""
    importers = [str(path.relative_to(ROOT)) for path in _python_files("uniter_ds", "benchmarks", "tests/dist")
                 if any(name in ("uniter_ds.train.pretrain", "uniter_ds.train.pretrain.main")
                        or name.startswith("uniter_ds.train.pretrain.") for name in _imports(path))]
    assert importers == [], importers


def test_benchmarks_import_nothing_from_the_tests():
    for path in _python_files("benchmarks"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not any(name == "tests" or name.startswith("tests.") for name in names), path


def test_the_training_loop_reads_in_one_screen():
    source = (PACKAGE / "train" / "pretrain.py").read_text()
    assert len(source.splitlines()) <= 250
    run = next(node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name == "run")
    assert run.end_lineno - run.lineno + 1 <= 80
    modeling = (PACKAGE / "model" / "modeling.py").read_text()
    for machinery in ("make_graphed_callables", ".compile(", "torch.compile", "register_hook", "torch_version"):
        assert machinery not in modeling, f"modeling.py holds {machinery}: it belongs in acceleration.py"


def test_an_export_ships_the_architecture_without_the_acceleration_machinery():
    from transformers.dynamic_module_utils import get_relative_import_files

    shipped = {Path(p).name for p in get_relative_import_files(str(PACKAGE / "model" / "modeling.py"))}
    assert {"config.py", "inputs.py", "attention.py", "tasks.py", "options.py"} <= shipped
    assert "acceleration.py" not in shipped


PATH_PATTERN = re.compile(r"(?<![\w/.-])((?:uniter_ds|benchmarks|docs|launch|tests|ds_configs|\.ci)/[\w./{}*-]*[\w*}])")


def _named_paths() -> list[tuple[str, str]]:
    texts = {p: p.read_text() for p in [ROOT / "README.md", ROOT / "launch" / "README.md",
                                        *sorted((ROOT / "docs").glob("*.md"))]}
    for path in _python_files("uniter_ds", "benchmarks"):
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        if docstring:
            texts[path] = docstring
    return [(str(path.relative_to(ROOT)), match) for path, text in texts.items()
            for match in PATH_PATTERN.findall(text)]


def test_every_repository_path_the_docs_name_exists():
    named = _named_paths()
    assert len(named) > 30  # the pattern finds them
    missing = []
    for where, name in named:
        if "{" in name or "*" in name or name.startswith(("benchmarks/results/", "launch/runs")):
            continue  # a pattern, or what a run writes
        if not (ROOT / name.rstrip(".")).exists():
            missing.append(f"{where}: {name}")
    assert not missing, missing


def test_the_command_line_answers_without_loading_torch_and_explains_every_option():
    import argparse

    probe = ("import sys; from uniter_ds.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]"

    from uniter_ds.cli import build_parser

    unexplained = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif action.help is None and not isinstance(action, argparse._HelpAction):
                unexplained.append(f"uniter-ds {' '.join(path)} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), [])
    assert not unexplained, unexplained


@pytest.mark.parametrize("name", ["mlm", "mrfr", "mrc", "mrc-kl", "itm"])
def test_the_task_names_have_one_home(name):
    from uniter_ds.model import tasks

    assert name in tasks.TASKS
    spelled = [str(p.relative_to(ROOT)) for p in _python_files("uniter_ds")
               if p.name != "tasks.py" and re.search(r"TASKS\s*=\s*\(", p.read_text())]
    assert spelled == []
