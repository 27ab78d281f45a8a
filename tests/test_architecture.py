"""The package's layering: no import circle, no import from a lower layer up to a higher one, and
package faces whose names resolve (tools/import_graph.py holds the layers)."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import import_graph  # noqa: E402

FACES = sorted(p.parent for p in (ROOT / "jaxbrats").glob("*/__init__.py"))


def test_no_import_circle_and_no_upward_import():
    graph, circles, upward = import_graph.report(ROOT / "jaxbrats")
    assert len(graph) > 50
    assert circles == [] and upward == []


def test_the_checker_finds_an_upward_import_and_a_circle(tmp_path):
    package = tmp_path / "jaxbrats"
    (package / "runtime").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text("from jaxbrats.runtime import sharding\n")
    (package / "runtime" / "__init__.py").write_text("")
    (package / "runtime" / "sharding.py").write_text("def f():\n    from jaxbrats.config import X\n")
    _, circles, upward = import_graph.report(package)
    assert circles == [["jaxbrats.config", "jaxbrats.runtime.sharding"]]
    assert upward == [("jaxbrats.config", "jaxbrats.runtime.sharding")]


@pytest.mark.parametrize("package", FACES, ids=lambda p: p.name)
def test_each_face_says_what_it_holds_and_its_names_resolve(package):
    source = (package / "__init__.py").read_text()
    assert ast.get_docstring(ast.parse(source)), f"{package.name}/__init__.py has no docstring"
    module = importlib.import_module(f"jaxbrats.{package.name}")
    submodules = {p.stem for p in package.glob("*.py")}
    for name in getattr(module, "__all__", []):
        value = getattr(module, name)
        if name in submodules:  # a face may export a submodule itself, never another object of its name
            assert value is importlib.import_module(f"jaxbrats.{package.name}.{name}"), (
                f"jaxbrats.{package.name}.{name}"
            )


LONGEST = 150  # lines: a class or function past this is a sign to split it by responsibility


def test_no_class_or_function_is_over_150_lines():
    long = []
    for path in sorted((ROOT / "jaxbrats").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_nothing_cites_a_file_outside_the_repository():
    tracked = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in {".py", ".md", ".toml", ".sh", ".txt"}]
    tracked = [p for p in tracked if not any(part.startswith(".") or part.endswith(".egg-info") for part in p.parts)]
    cited = [
        str(p.relative_to(ROOT))
        for p in tracked
        if any(s in p.read_text() for s in ("METHODS" + ".md", "../" + "shared", "papers" + "/"))
    ]
    assert cited == []
