"""The package's shape: its imports (function-local ones included) form no cycle and never hide one inside a
function; the commands that do not train start without torch."""

import ast
import subprocess
import sys
from pathlib import Path

import gpt_exp

PACKAGE = Path(gpt_exp.__file__).parent


def _modules() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(gpt_exp module imported, whether the import sits inside a function) for every import in `path`."""
    found = []
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpt_exp"):
            for alias in node.names:  # `from gpt_exp.data import cache` imports the module gpt_exp.data.cache
                target = f"{node.module}.{alias.name}"
                found.append((target if target in modules else node.module, id(node) in local))
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in local) for a in node.names if a.name.startswith("gpt_exp")]
    return [(m, is_local) for m, is_local in found if m in modules and not modules[m].name == "__init__.py"]


def test_imports_have_no_cycle_and_none_inside_a_function():
    modules = _modules()
    graph = {name: sorted({m for m, _ in _imports(path, modules)} - {name}) for name, path in modules.items()}
    local = [(name, m) for name, path in modules.items() for m, is_local in _imports(path, modules) if is_local]
    assert local == []  # a function-local import of our own modules is how a cycle hides
    state: dict[str, int] = {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for nxt in graph[name]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(stack[stack.index(nxt):] + [name, nxt])
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert len(graph) >= 25 and "gpt_exp.trainer" in graph and "gpt_exp.data.loader" in graph


def test_commands_that_do_not_train_start_without_torch():
    code = "import sys, gpt_exp.compare, gpt_exp.prepare, gpt_exp.scaling, gpt_exp.data.cache; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# The commands (python -m gpt_exp.X), the run command's own helper and the boundary itself: the only modules that
# may import the CLI layer. Everything else is library: usable and testable without a command line.
COMMANDS = {"gpt_exp.run", "gpt_exp.job", "gpt_exp.prepare", "gpt_exp.sample", "gpt_exp.eval", "gpt_exp.export",
            "gpt_exp.compare", "gpt_exp.scaling", "gpt_exp.coord_check", "gpt_exp.cli"}


def test_no_library_module_imports_the_cli_layer():
    modules = _modules()
    offenders = sorted(name for name, path in modules.items() if name not in COMMANDS
                       and any(m in COMMANDS for m, _ in _imports(path, modules)))
    assert offenders == []
    assert {"gpt_exp.trainer", "gpt_exp.rundir", "gpt_exp.resolve", "gpt_exp.generation"} <= modules.keys()
