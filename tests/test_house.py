"""The house rules, checked on the code itself (issue 21): the project's modules import each other without a
circle (imports inside functions count), no function in storyteller/, train/, app.py or hub_upload.py runs over
MAX_FUNCTION_LINES lines, no module uses another module's ``_private`` names, and (issue 31) every module of the
runtime package storyteller/ is one the runtime imports: none that only train/, bench/ or the tests use.

The checks read the source with ``ast``; each has a test on a small made-up package, so that it can fail.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("storyteller", "train", "bench")  # the project's packages; app.py and hub_upload.py are modules
TOP_MODULES = ("app", "hub_upload")
LONG_FUNCTION_PLACES = ("storyteller", "train", "app.py", "hub_upload.py")
MAX_FUNCTION_LINES = 100
RUNTIME_PACKAGE = "storyteller"  # what the Space uploads and the CLI imports
# where the runtime starts: the app, the Hub upload, the CLI and the package itself
RUNTIME_ROOTS = ("app", "hub_upload", "storyteller.__main__", "storyteller")
NOT_RUNTIME = ("train", "bench")  # packages whose imports do not make a module runtime


def project_modules(root: Path = REPO, packages=PACKAGES, top=TOP_MODULES) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project under ``root``."""
    out = {name: root / f"{name}.py" for name in top if (root / f"{name}.py").is_file()}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported project module, names taken from it) for every import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(name, path)
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}".strip(".") if base else package
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # "from package import module"
                    out.append((sub, []))
                elif base in modules:
                    out.append((base, [alias.name]))
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: {m for m, _ in imports_of(name, path, modules) if m != name} for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def long_functions(paths: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{path.relative_to(path.parents[len(path.parents) - 1])}:{node.lineno} {node.name} ({lines} lines)")
    return out


def private_uses(modules: dict[str, Path]) -> list[str]:
    """``from m import _x``, and ``alias._x`` where ``alias`` names another project module."""
    def private(n: str) -> bool:
        return n.startswith("_") and not (n.startswith("__") and n.endswith("__"))

    out = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in modules and a.asname:
                        aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                for module, names in imports_of(name, path, modules):
                    out += [f"{name} takes {module}.{n}" for n in names if private(n) and module != name]
                for a in node.names:  # "from package import module [as alias]"
                    for module, names in imports_of(name, path, modules):
                        if not names and module.endswith("." + a.name):
                            aliases[a.asname or a.name] = module
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name):
                module = aliases.get(node.value.id)
                if module and module != name:
                    out.append(f"{name} uses {module}.{node.attr} (line {node.lineno})")
    return sorted(set(out))


def not_runtime(modules: dict[str, Path], roots=RUNTIME_ROOTS, package: str = RUNTIME_PACKAGE,
                outside=NOT_RUNTIME) -> list[str]:
    """The modules of ``package`` that no import chain from ``roots`` reaches without passing through
    ``outside`` (training or benchmarks): what only train/, bench/ or the tests use."""
    graph = import_graph(modules)
    seen, todo = set(), [r for r in roots if r in modules]
    while todo:
        m = todo.pop()
        if m in seen or m.split(".")[0] in outside:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [*graph[m], *(".".join(parts[:i]) for i in range(1, len(parts)))]  # a submodule imports its package
    return sorted(m for m in modules if m.split(".")[0] == package and m not in seen)


# -- the rules on the project -------------------------------------------------------------------------

def test_the_project_has_no_import_circles():
    assert circles(import_graph(project_modules())) == []


def test_no_function_is_longer_than_the_limit():
    paths = [p for place in LONG_FUNCTION_PLACES for p in ([REPO / place] if place.endswith(".py")
                                                           else sorted((REPO / place).rglob("*.py")))]
    assert long_functions(paths) == []


def test_no_module_uses_another_modules_private_names():
    assert private_uses(project_modules()) == []


def test_the_runtime_package_holds_only_what_the_runtime_imports():
    """Training-only code lives in train/, bench-only code in bench/ (the Space uploads storyteller/)."""
    assert not_runtime(project_modules()) == []


# -- the checks can fail -------------------------------------------------------------------------------

def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return project_modules(tmp_path, packages=("pkg",), top=())


def test_the_checks_find_a_circle_through_a_function_import_a_private_name_and_a_long_function(tmp_path):
    modules = _package(tmp_path, {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "from .b import g\n\ndef f():\n    return g()\n",
        "pkg/b.py": "def g():\n    from pkg import a  # a function-level import closes the circle\n    return a._secret\n",
        "pkg/c.py": "from pkg.a import _hidden\nimport pkg.b as bee\nx = bee._y\n",
        "pkg/d.py": "def long():\n" + "    x = 1\n" * 101,
    })
    assert ["pkg.a", "pkg.b"] in circles(import_graph(modules))
    found = private_uses(modules)
    assert any("pkg.b uses pkg.a._secret" in f for f in found), found
    assert any("pkg.c takes pkg.a._hidden" in f for f in found), found
    assert any("pkg.c uses pkg.b._y" in f for f in found), found
    assert [f for f in long_functions([tmp_path / "pkg" / "d.py"]) if "long (102 lines)" in f]
    assert long_functions([tmp_path / "pkg" / "a.py"]) == []


def test_the_runtime_check_finds_modules_only_training_benchmarks_or_tests_use(tmp_path):
    for rel, text in {
        "app.py": "from storyteller.core import run\n",
        "storyteller/__init__.py": "",
        "storyteller/__main__.py": "def main():\n    from . import cli  # a function-level import counts\n",
        "storyteller/cli.py": "from .core import run\n",
        "storyteller/core.py": "from .sub import helpers\n",
        "storyteller/sub/__init__.py": "",
        "storyteller/sub/helpers.py": "",
        "storyteller/dataset.py": "from .core import run\n",  # imports runtime code, but only training imports it
        "storyteller/only_tests.py": "",
        "storyteller/via_train.py": "",
        "train/fit.py": "from storyteller.dataset import Data\nfrom storyteller import via_train\n",
        "bench/b.py": "from storyteller import core\n",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    modules = project_modules(tmp_path, packages=("storyteller", "train", "bench"), top=("app",))
    assert not_runtime(modules) == ["storyteller.dataset", "storyteller.only_tests", "storyteller.via_train"]
    (tmp_path / "storyteller" / "cli.py").write_text("from .core import run\nfrom . import dataset, only_tests\n")
    assert not_runtime(project_modules(tmp_path, packages=("storyteller", "train", "bench"), top=("app",))) == \
        ["storyteller.via_train"]
