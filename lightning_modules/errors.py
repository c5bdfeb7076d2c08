"""User errors: problems with what was asked for (a path, a value, a checkpoint, the data), as opposed to bugs.

The checks raise :class:`UsageError` with a message that says what is wrong and how to fix it; the ``headprune``
command prints it as one line, ``headprune: error: <message>``, and exits with status 2 (see docs/cli-errors.md).
Set ``HEADPRUNE_DEBUG=1`` to get the traceback instead. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

DEBUG_ENV = "HEADPRUNE_DEBUG"


class UsageError(ValueError):
    """A problem the user can fix, with a message saying how; a ValueError, so callers may catch it as one."""


class MissingFileError(UsageError, FileNotFoundError):
    """A file the user named does not exist (also a FileNotFoundError)."""


def one_line(message: object) -> str:
    """``message`` with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(str(message).split())


def debug_enabled() -> bool:
    """Whether ``HEADPRUNE_DEBUG`` asks for tracebacks of user errors (any value but empty, 0, false, no)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def exit_with(error: BaseException, prog: str = "headprune") -> NoReturn:
    """Report a user error as ``<prog>: error: <one line>`` on stderr and exit with status 2 (re-raise it, with
    its traceback, when ``HEADPRUNE_DEBUG`` is set)."""
    if debug_enabled():
        raise error
    sys.stderr.write(f"{prog}: error: {one_line(error)}\n")
    sys.exit(2)
