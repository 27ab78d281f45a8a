"""Package faces that re-export their public names lazily (PEP 562).

Each package's ``__init__`` names its public objects and the module that holds
them; a name is imported on first use. So ``import jaxbrats.evaluation.metrics``
does not import matplotlib for the figures, ``jaxbrats.interop`` does not import
torch until a PyTorch name is used, and a package's modules can import each
other without the face's import order creating a circle.
"""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """(``__getattr__``, ``__dir__``, ``__all__``) for `package`'s ``__init__``: `exports` maps
    each public name to the submodule (relative to `package`) that defines it."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value  # later lookups skip __getattr__
        return value

    def __dir__():
        return sorted(set(importlib.import_module(package).__dict__) | set(exports))

    return __getattr__, __dir__, sorted(exports)
