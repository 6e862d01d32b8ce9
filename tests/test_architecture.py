"""The shape of the code that docs/architecture.md promises: no import cycle (imports inside
functions included), no module reaching into another's private names, no god function, and no
pointer to a document the repository does not hold."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llmtrain"
MAX_FUNCTION_LINES = 100


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _trees() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def _imports(name: str, tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(imported llmtrain module, names taken from it) for every import anywhere in the file."""
    found = []
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("llmtrain")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if not base.startswith("llmtrain"):
                continue
            names = [a.name for a in node.names]
            # `from llmtrain.x import y` where y is a module imports that module
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            found.append((base, [n for n in names if f"{base}.{n}" not in MODULES]))
            found += [(m, []) for m in submodules]
    return found


def _resolve(target: str) -> str | None:
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def test_no_import_cycle_counting_function_level_imports():
    graph: dict[str, set[str]] = {}
    for name, tree in _trees().items():
        deps = {_resolve(t) for t, _ in _imports(name, tree)}
        # a package's __init__ is imported on the way to its modules: not a dependency edge
        graph[name] = {d for d in deps if d and d != name and not name.startswith(d + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for name, tree in _trees().items():
        for target, names in _imports(name, tree):
            if _resolve(target) == name:
                continue
            private = [n for n in names if n.startswith("_") and not n.endswith("__")]
            offenders += [f"{name} imports {target}.{n}" for n in private]
    assert not offenders, offenders


def test_engine_imports_neither_the_run_directory_nor_the_commands():
    """engine/ holds training only: opening, comparing and clearing run directories (rundir/),
    tuning the process (host/), and what drives it (probe, pipeline, commands, cli) sit above
    it. llmtrain.layout, the names under output_dir, is a leaf every layer may use."""
    above = ("llmtrain.rundir", "llmtrain.commands", "llmtrain.host", "llmtrain.probe")
    above += ("llmtrain.pipeline", "llmtrain.cli")
    offenders = []
    for name, tree in _trees().items():
        if not name.startswith("llmtrain.engine"):
            continue
        for target, _ in _imports(name, tree):
            hit = next((a for a in above if target == a or target.startswith(a + ".")), None)
            offenders += [f"{name} imports {target}"] if hit else []
    assert not offenders, offenders


def test_no_function_is_a_god_function():
    long = []
    for name, tree in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_train_reads_like_a_loop():
    tree = ast.parse((PACKAGE / "engine" / "loop.py").read_text(encoding="utf-8"))
    (train,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train"]
    assert train.end_lineno - train.lineno + 1 <= 60


def test_no_reference_to_a_document_the_repository_does_not_hold():
    cited = re.compile(r"DESIGN\s*§|DESIGN\.md|DEVELOPERS\.md")
    # docs/*.md and llmtrain/**.py paths named anywhere must exist
    doc_link = re.compile(r"((?:docs/[\w./-]+\.md)|(?:llmtrain/[\w/]+\.py))")
    bad = []
    files = [*ROOT.glob("llmtrain/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("scripts/*")]
    files += [*ROOT.glob("docs/*.md"), ROOT / "README.md", *ROOT.glob("configs/*.yaml")]
    for path in files:
        if path == Path(__file__).resolve() or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if cited.search(text):
            bad.append(f"{path.relative_to(ROOT)} cites a design document outside the repo")
        bad += [
            f"{path.relative_to(ROOT)} points at {m}"
            for m in doc_link.findall(text)
            if not (ROOT / m).is_file()
        ]
    assert not bad, bad
