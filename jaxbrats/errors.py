"""Errors that reach the user as one line: what is wrong and where."""

from __future__ import annotations

import importlib


class JaxbratsError(Exception):
    """A problem with the user's input or settings; the CLI prints it as one line."""


class ConfigError(JaxbratsError):
    """A bad config file, key or value: names the file and the key."""


class CaseError(JaxbratsError):
    """A problem with one case of a dataset: names the case and the file."""

    def __init__(self, case_id: str, path, problem: str):
        self.case_id, self.path, self.problem = case_id, str(path), problem
        super().__init__(f"case {case_id}: {self.path}: {problem}")


class MissingPackageError(JaxbratsError):
    """An optional Python package a command needs is not installed: names it and the pip command."""


#: pip's name of a package whose module is spelt otherwise.
PIP_NAMES = {"array_record": "array-record"}


def require(module: str, what_for: str):
    """`module`, imported on first use. Grain, nibabel and tensorboardX are optional (a GPU machine
    benchmarking the networks has none of them); a command that needs one and lacks it (or a
    package it needs) stops with one line naming the package and how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = (e.name or module).split(".")[0]
        raise MissingPackageError(
            f"{what_for} needs the Python package {missing}, which is not installed: "
            f"python3 -m pip install {PIP_NAMES.get(missing, missing)}"
        ) from None
