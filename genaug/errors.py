"""Errors a user can act on.

Every user-facing failure raises :class:`GenaugError` (or a subclass) with one line that says
what went wrong, where, and how to fix it. The CLI prints that line and exits non-zero; the
traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import errno


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


class DiskFullError(GenaugError):
    """The disk (or a quota) filled up while a stage wrote its outputs; a rerun resumes."""


def disk_full_error(exc: BaseException) -> DiskFullError | None:
    """A one-line :class:`DiskFullError` if ``exc`` (or an exception in its chain) is an ``OSError``
    meaning "no space left" (ENOSPC, EDQUOT), else None.

    For the CLI's last-resort ``except Exception`` branch, before its "internal error" line: every
    stage resumes, so a full disk is a user-fixable error, not an internal one."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            target = f" while writing {error.filename}" if error.filename else ""
            return DiskFullError(f"disk full{target} ({error.strerror or 'no space left on device'})",
                                 fix="free space (or use another folder) and rerun the same command to resume")
        error = error.__cause__ or error.__context__
    return None


def unexpected_error(exc: BaseException) -> GenaugError:
    """The one-line error for an exception genaug did not raise itself: a :class:`DiskFullError` when
    the disk filled up (every stage resumes, so the user can fix it), else ``internal error: <type>: <first
    line>``. For the last-resort handlers of the CLI and of recipe workers, which keep the traceback."""
    disk_full = disk_full_error(exc)
    if disk_full is not None:
        return disk_full
    first = (str(exc).strip().splitlines() or [""])[0]
    return GenaugError(f"internal error: {type(exc).__name__}: {first}")


def close_progress_bars() -> None:
    """Close every open tqdm bar, so that a one-line error printed next starts on a line of its own
    (a stage that fails inside a loop leaves its bar open, mid-line, until it is garbage-collected).
    For the CLI, before it writes an error or "interrupted" line."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
