"""The package layout's rules, read from the source with `ast` (nothing is imported to find the imports):

- no import cycle among the modules of wtcore and wtfront (function-level imports and `from . import x` count);
- wtcore imports neither wtfront nor the model libraries wtfront adapts;
- no module imports a `_private` name of another module of the project (what is shared gets a public name);
- every name of `wtfront.__all__` resolves, lazily: `import wtfront`, `import wtfront.cli` and `wt --help` do not
  import torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("wtcore", "wtfront")
#: libraries wtcore must not import: wtcore knows the IR and tensors only
FOREIGN = ("wtfront", "torch_pruning", "fvcore", "timm", "transformers", "lightning", "pytorch_lightning")



@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported project module (or the foreign top-level package)
    name: str  # a non-module name imported from `target`, else ""
    line: int


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = module_files()


def _package(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports_of(module: str, path: Path) -> list[Import]:
    """Every import statement of the module (at any depth), resolved to project modules and names."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(Import(module, _known_prefix(alias.name), "", node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(module, path).split(".")
                base = base[: len(base) - (node.level - 1)]
                base_name = ".".join([*base, node.module] if node.module else base)
            else:
                base_name = node.module or ""
            for alias in node.names:
                sub = f"{base_name}.{alias.name}"
                if sub in MODULES:
                    out.append(Import(module, sub, "", node.lineno))
                else:
                    out.append(Import(module, _known_prefix(base_name), alias.name, node.lineno))
    return out


def _known_prefix(name: str) -> str:
    """The longest project module that `name` starts with, or `name` itself (a foreign module)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return name


IMPORTS = [imp for m, p in MODULES.items() for imp in imports_of(m, p)]


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-import), each as one cycle
    through it (Tarjan, then a path back to the start inside the component)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    cycles = []
    for comp in comps:
        start = min(comp)
        path, seen = [start], {start}
        while True:  # walk inside the component until the start is reachable in one step
            nxt = sorted(w for w in edges[path[-1]] if w in comp)
            if start in nxt and (len(path) > 1 or start in edges[start]):
                cycles.append([*path, start])
                break
            step = next((w for w in nxt if w not in seen), None)
            if step is None:  # dead end inside the component: restart from a successor (rare; still a cycle)
                cycles.append(sorted(comp))
                break
            path.append(step)
            seen.add(step)
    return cycles


def test_the_analysis_sees_every_module() -> None:
    assert {"wtcore", "wtcore.ir", "wtfront", "wtfront.cli.commands", "wtcore.solver"} <= set(MODULES)
    assert any(i.module == "wtcore" and i.target == "wtcore.specs" for i in IMPORTS)  # `from . import specs`
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in IMPORTS:
        if i.target in MODULES and i.target != i.module:
            edges[i.module].add(i.target)
    cycles = find_cycles(edges)
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"


def test_wtcore_imports_no_front_end_library() -> None:
    bad = [f"{i.module}:{i.line} imports {i.target}" for i in IMPORTS
           if i.module.split(".")[0] == "wtcore" and i.target.split(".")[0] in FOREIGN]
    assert not bad, bad


def test_no_private_names_cross_modules() -> None:
    bad = []
    for i in IMPORTS:
        if i.target in MODULES and i.target != i.module and i.name.startswith("_") and not i.name.startswith("__"):
            bad.append(f"{i.module}:{i.line} imports {i.name} from {i.target}")
    for module, path in MODULES.items():  # `import pkg.mod as m` ... `m._private`
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for imp in imports_of(module, path):
                    if imp.line == node.lineno and not imp.name and imp.target in MODULES:
                        for alias in node.names:
                            aliases[alias.asname or alias.name.split(".")[0]] = imp.target
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != module):
                bad.append(f"{module}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not bad, bad


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_every_exported_name_resolves_after_every_module_is_imported() -> None:
    """A subpackage imported later must not shadow an exported name (the import system sets `wtfront.<sub>`)."""
    import importlib

    import wtfront

    for module in MODULES:
        if not module.endswith("__main__"):
            importlib.import_module(module)
    assert sorted(wtfront.__all__) == sorted(set(wtfront.__all__)) == sorted(wtfront._EXPORTS)
    assert set(wtfront.__all__) <= set(dir(wtfront))
    for name in wtfront.__all__:
        obj = getattr(wtfront, name)
        assert not isinstance(obj, type(wtfront)), f"wtfront.{name} is a module"
        assert getattr(obj, "__name__", name) == name, f"wtfront.{name} is {obj!r}"
    assert callable(wtfront.trace)
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = wtfront.no_such_name


def test_importing_wtfront_and_its_cli_does_not_import_torch() -> None:
    r = run_python("""
        import sys
        import wtfront, wtfront.cli
        assert wtfront.__all__
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "wtcore", "numpy"))
        assert not loaded, loaded
    """)
    assert r.returncode == 0, r.stderr


def test_wt_help_does_not_import_torch() -> None:
    r = run_python("""
        import sys
        from wtfront.cli import main
        try:
            main(["--help"])
        except SystemExit as e:
            assert e.code == 0, e.code
        else:
            raise AssertionError("--help did not exit")
        for argv in (["inspect", "--help"], ["prune", "--help"]):
            try:
                main(argv)
            except SystemExit as e:
                assert e.code == 0, e.code
        assert "torch" not in sys.modules
    """)
    assert r.returncode == 0, r.stderr
    assert "usage: wt" in r.stdout and "inspect" in r.stdout
