"""The house rules that code review alone lets slip (issue 26): no import circles in ctal/, config a
torch-free leaf, only ctal/distributed/ imports Ray, ctal/ never parses command lines."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ctal"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _imports(name: str, path: Path, mods: dict) -> set[str]:
    """Every module (of ctal or not) ``name`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:  # `from pkg import module` imports the module
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base)
    return found


def test_ctal_has_no_import_circles():
    mods = _modules()
    graph = {m: {d for d in _imports(m, p, mods) if d in mods and d not in (m, "ctal")} for m, p in mods.items()}
    # depth-first search for a back edge; report the circle it closes
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_only_distributed_imports_ray_and_no_library_module_parses_a_command_line():
    mods = _modules()
    for name, path in mods.items():
        imported = _imports(name, path, mods)
        if not name.startswith("ctal.distributed"):
            assert not {i for i in imported if i == "ray" or i.startswith("ray.")}, f"{name} imports Ray"
        parsers = [n for n in ast.walk(ast.parse(path.read_text()))
                   if isinstance(n, (ast.Name, ast.Attribute)) and "ArgumentParser" in (getattr(n, "id", None),
                                                                                      getattr(n, "attr", None))]
        assert not parsers, f"{name} parses a command line: that is pipelines/' job"


def test_checking_a_config_imports_neither_torch_nor_the_model():
    code = ("import sys; from ctal.config import FinetuneConfig, load_config; "
            "load_config(FinetuneConfig, [], ['task=sentiment', 'data=d', 'model.fusion=late_concat']); "
            "print(sorted(m for m in ('torch', 'transformers', 'ctal.model', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
