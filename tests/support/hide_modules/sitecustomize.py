"""Hide installed packages from a Python process, to test jaxbrats as a machine without them runs it.

With this folder on PYTHONPATH, Python imports this module at start-up (site.py imports
``sitecustomize``). Every top-level package named in the environment variable
JAXBRATS_HIDE_MODULES (comma-separated, e.g. ``grain,nibabel,tensorboardX``), and each of its
submodules, then fails to import with ModuleNotFoundError, as if it were not installed:

    JAXBRATS_HIDE_MODULES=grain,nibabel,tensorboardX \
    PYTHONPATH=tests/support/hide_modules:. python3 -m jaxbrats bench ...

This file shadows any other ``sitecustomize`` on the path (Debian and Ubuntu ship one), so it
runs the next one it finds.
"""

import importlib.machinery
import importlib.util
import os
import sys

HIDDEN = frozenset(name.strip() for name in os.environ.get("JAXBRATS_HIDE_MODULES", "").split(",") if name.strip())


class HideModules:
    """A meta path finder that refuses the hidden packages before any other finder looks."""

    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by JAXBRATS_HIDE_MODULES)", name=name)
        return None


def _run_next_sitecustomize():
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if HIDDEN:
    for _name in list(sys.modules):
        if _name.partition(".")[0] in HIDDEN:  # imported before us (a .pth file): forget it
            del sys.modules[_name]
    sys.meta_path.insert(0, HideModules(HIDDEN))
_run_next_sitecustomize()
