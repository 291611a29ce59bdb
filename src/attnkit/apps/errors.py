"""The two kinds of failure a command reports in one line, and helpers that raise them.

:class:`UsageError` -- the command asks for something invalid (exit code 2);
:class:`InputError` -- a file or model it was pointed at is missing or invalid (exit code 1).
The ``attnkit`` command line turns them into its exit codes; library callers catch them like
any ``ValueError``.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["InputError", "UsageError", "argument", "positive", "read_text_file", "reading", "share", "warn"]


class UsageError(ValueError):
    """The command line asks for something invalid: exit 2 with one line."""


class InputError(ValueError):
    """A file or model the command was pointed at is missing or invalid: exit 1 with one line."""


@contextlib.contextmanager
def argument(name: str) -> Iterator[None]:
    """Report a ``ValueError``/``TypeError`` raised while interpreting argument ``name`` as a
    usage error. Scoped to the call that reads the argument, so bugs elsewhere keep their
    traceback."""
    try:
        yield
    except (UsageError, InputError):
        raise
    except (ValueError, TypeError) as e:
        raise UsageError(f"{name}: {e}") from e


@contextlib.contextmanager
def reading(name: str) -> Iterator[None]:
    """Report a ``ValueError`` or ``OSError`` (a missing file) raised while reading the file or
    model given as ``name`` as an input error that names it."""
    try:
        yield
    except (UsageError, InputError):
        raise
    except (ValueError, OSError) as e:
        raise InputError(f"{name}: {e}") from e


def positive(**values: int | None) -> None:
    """Each ``--name`` given must be a positive integer."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected a positive integer, but got {value}.")


def share(**values: float | None) -> None:
    """Each ``--name`` given must be a share in (0, 1]."""
    for name, value in values.items():
        if value is not None and not (math.isfinite(value) and 0 < value <= 1):
            raise UsageError(f"--{name.replace('_', '-')}: expected a share in (0, 1], but got {value}.")


def read_text_file(name: str, path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{name}: expected a readable UTF-8 text file, but {str(path)!r}: {e}") from None


def warn(message: str) -> None:
    print(f"attnkit: warning: {message}", file=sys.stderr)
