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
