"""The package's layout, checked from its source so that it stays as the README describes it: imports that run one
way (no circle, counting imports inside functions), no module over 700 lines, no function over 150, argparse in the
command-line module only, and the light imports of `import vitlab` and `vitlab --help`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vitlab"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 700, 150


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def imports_of(tree: ast.Module) -> set[str]:
    """The vitlab modules a module imports anywhere in it (`from . import data`, `from .model import x`)."""
    names = set(modules_cache)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("vitlab")):
            base = (node.module or "").removeprefix("vitlab").lstrip(".")
            if base:
                found.add(base.split(".")[0])
            else:  # from . import data, model
                found |= {a.name for a in node.names if a.name in names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vitlab.")}
    return found & names


modules_cache = modules()


def test_imports_run_one_way():
    graph = {name: imports_of(tree) - {name} for name, tree in modules_cache.items() if name != "__init__"}
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"import circle: {' -> '.join(path + [name])}"
        state[name] = "open"
        for dep in sorted(graph.get(name, ())):
            visit(dep, path + [name])
        state[name] = "done"
        order.append(name)

    for name in sorted(graph):
        visit(name, [])
    # the foundations import nothing of vitlab; the model never imports what trains or loads it
    assert graph["common"] == set() and graph["resnet"] == {"common"}
    assert not graph["model"] & {"train", "weights", "data", "formats", "cli", "config"}


def test_no_module_or_function_too_long():
    for name, tree in modules_cache.items():
        lines = (PACKAGE / f"{name}.py").read_text().count("\n")
        assert lines <= MAX_MODULE_LINES, f"vitlab/{name}.py has {lines} lines"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_FUNCTION_LINES, f"vitlab/{name}.py: {node.name} has {length} lines"


def test_argparse_only_in_the_cli():
    for name, tree in modules_cache.items():
        uses = any(isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names)
                   or isinstance(n, ast.ImportFrom) and n.module == "argparse" for n in ast.walk(tree))
        assert not uses or name == "cli", f"vitlab/{name}.py imports argparse"


@pytest.mark.slow
def test_import_and_help_stay_light():
    """`import vitlab` and building every command's parser (what `vitlab --help` does) import neither torch,
    torchvision nor matplotlib: the library's names load on first use."""
    code = (
        "import sys\n"
        "from vitlab.cli import build_parser\n"
        "build_parser().format_help()\n"
        "heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'matplotlib'})\n"
        "print(','.join(heavy()))\n"
        "import vitlab\n"
        "print(','.join(heavy()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "", f"building the parser imported {out[0]}"
    assert out[1] == "", f"import vitlab imported {out[1]}"
