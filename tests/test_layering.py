"""One direction of imports (issue 14): each package imports only the layers below it.

    rlhf_cli      the commands: may import everything
    ml_backend    the HTTP face        } both stand on rlhf_core and never import each other
    trainer       the jobs             }
    rlhf_core     the ground floor: imports no other package of this project

Every import counts, a lazy one inside a function too. There is no import cycle between modules,
lazy imports included (a lazy import only hides a circle until the function runs); imports under
``if TYPE_CHECKING:`` never run and do not count. Across packages a cycle would need an upward
import, so in practice this finds circles inside one package.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf_core", "ml_backend", "trainer", "rlhf_cli")
ALLOWED = {
    "rlhf_core": {"rlhf_core"},
    "ml_backend": {"rlhf_core", "ml_backend"},
    "trainer": {"rlhf_core", "trainer"},
    "rlhf_cli": set(PACKAGES),
}


@dataclass(frozen=True)
class Import:
    importer: str  # the module that imports
    imported: str  # the project module (or package) it names
    line: int
    module_level: bool  # runs when the importer is imported
    type_checking: bool = False  # under ``if TYPE_CHECKING:``: never runs

    def __str__(self) -> str:
        where = "module level" if self.module_level else "inside a function"
        return f"{self.importer} (line {self.line}, {where}) imports {self.imported}"


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages under ``root``."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, runs: bool, type_checking: bool):
    """(import node, runs at import?, under TYPE_CHECKING?) for every import under ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, runs, type_checking
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _walk(child, False, type_checking)
        elif isinstance(child, ast.If) and _is_type_checking(child):
            yield from _walk(child, False, True)
        else:
            yield from _walk(child, runs, type_checking)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """The project modules ``name`` imports (``from a import b`` names ``a.b`` when that is a
    module, else ``a``); ``module_level`` is True only for imports that run at import time."""
    is_package = path.name == "__init__.py"
    found = []
    for node, runs, type_checking in _walk(ast.parse(path.read_text(), str(path)), True, False):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        for target in dict.fromkeys(targets):
            if target.split(".")[0] in PACKAGES:
                found.append(Import(name, target, node.lineno, runs, type_checking))
    return found


def all_imports(root: Path) -> list[Import]:
    modules = project_modules(root)
    return [i for name, path in modules.items() for i in imports_of(name, path, modules)]


def upward_imports(imports: list[Import]) -> list[Import]:
    return [i for i in imports if i.imported.split(".")[0] not in ALLOWED[i.importer.split(".")[0]]]


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """Cycles among the imports that can run (module level or lazy; not ``TYPE_CHECKING``), each
    as the path that closes it (``a, b, a``)."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        if not i.type_checking and i.imported != i.importer:
            graph.setdefault(i.importer, set()).add(i.imported)
    cycles, state = [], {}  # state: 1 on the current path, 2 finished
    for start in sorted(graph):
        stack = [(start, iter(sorted(graph.get(start, ()))))]
        path = [start]
        if state.get(start):
            continue
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                cycles.append([*path[path.index(child) :], child])
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return cycles


def test_no_package_imports_a_layer_above_it_or_beside_it():
    upward = upward_imports(all_imports(ROOT))
    assert not upward, "imports against the layering:\n" + "\n".join(map(str, upward))


def test_no_import_cycle_among_modules():
    cycles = import_cycles(all_imports(ROOT))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_package_says_its_role_in_its_init():
    for package in PACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert doc, f"{package}/__init__.py has no docstring saying what the package is for"


def _write(root: Path, files: dict[str, str]) -> None:
    for package in PACKAGES:
        (root / package).mkdir()
        (root / package / "__init__.py").write_text('"""A layer."""\n')
    for name, text in files.items():
        (root / name).write_text(text)


def test_the_checker_names_upward_imports_lazy_ones_included(tmp_path):
    _write(
        tmp_path,
        {
            "rlhf_core/store.py": "from trainer.jobs import run\n",
            "ml_backend/app.py": "def f():\n    from trainer import jobs\n",
            "trainer/jobs.py": "import ml_backend.app\nfrom rlhf_core import store\n",
            "rlhf_cli/main.py": "from ml_backend import app\nfrom trainer import jobs\n",
        },
    )
    upward = sorted(map(str, upward_imports(all_imports(tmp_path))))
    assert upward == [
        "ml_backend.app (line 2, inside a function) imports trainer.jobs",
        "rlhf_core.store (line 1, module level) imports trainer.jobs",
        "trainer.jobs (line 1, module level) imports ml_backend.app",
    ]


def test_the_checker_finds_a_cycle_a_lazy_one_too_but_not_through_type_checking(tmp_path):
    _write(
        tmp_path,
        {
            "trainer/dispatch.py": "from trainer.worker import Worker\n",
            "trainer/worker.py": "from . import jobs\n",
            "trainer/jobs.py": "from trainer.dispatch import notify\n",
            "trainer/versions.py": "from trainer.export import x\n",
            "trainer/export.py": "def f():\n    from trainer.versions import z\n",
            "rlhf_core/store.py": "from rlhf_core.db import x\n",
            "rlhf_core/db.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                "    from rlhf_core.store import y\n"
                "    def f():\n        from rlhf_core.store import z\n"
            ),
        },
    )
    cycles = import_cycles(all_imports(tmp_path))
    assert cycles == [
        ["trainer.dispatch", "trainer.worker", "trainer.jobs", "trainer.dispatch"],
        ["trainer.export", "trainer.versions", "trainer.export"],
    ]


def test_the_http_face_imports_no_torch_until_a_model_is_needed(tmp_path):
    """Building the app (and answering /health) must not load torch: gunicorn forks after it."""
    script = (
        "import sys\n"
        "from ml_backend.app import create_app\n"
        "from rlhf_core.config import BackendConfig\n"
        f"app = create_app(BackendConfig(data_dir={str(tmp_path)!r}))\n"
        "assert app.test_client().get('/health').status_code == 200\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trainer') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"importing the app loaded {done.stdout.strip()}"
