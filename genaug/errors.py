"""Errors a user can act on.

Every user-facing failure raises :class:`GenaugError` (or a subclass) with one line that says
what went wrong, where, and how to fix it. The CLI prints that line and exits non-zero; the
traceback is shown only with ``--debug``.
"""

from __future__ import annotations


class GenaugError(Exception):
    """A failure caused by input or environment, reported to the user as one line."""

    exit_code = 1

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = [self.what if self.where is None else f"{self.where}: {self.what}"]
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return " — ".join(parts).replace("\n", " ")


class ConfigError(GenaugError):
    """A configuration file or flag that does not fit the stage's config dataclass."""

    exit_code = 2


class DataError(GenaugError):
    """A dataset, image or metadata file that cannot be read safely."""


class ModelError(GenaugError):
    """A model or adapter that cannot be loaded or does not fit the base model."""
