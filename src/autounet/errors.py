"""Errors that the command line turns into one clear message and exit code 2."""

from __future__ import annotations


class AutounetError(Exception):
    """Bad input or an impossible request: the message names the file or case and what is wrong."""


class DatasetInvalid(AutounetError):
    """A raw dataset failed validation; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        head = f"the dataset has {len(self.problems)} problem(s):"
        super().__init__("\n  ".join([head, *self.problems]))
