"""Errors that reach the user as one line: what is wrong and where."""

from __future__ import annotations


class JaxbratsError(Exception):
    """A problem with the user's input or settings; the CLI prints it as one line."""


class ConfigError(JaxbratsError):
    """A bad config file, key or value: names the file and the key."""


class CaseError(JaxbratsError):
    """A problem with one case of a dataset: names the case and the file."""

    def __init__(self, case_id: str, path, problem: str):
        self.case_id, self.path, self.problem = case_id, str(path), problem
        super().__init__(f"case {case_id}: {self.path}: {problem}")
