"""How a command ends on failure: known errors as one line, real bugs with their traceback, interrupts truthfully."""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import click
import typer
import typer.exceptions

from ..errors import SafetyscopeError

# Exceptions whose message is already a one-line, user-facing explanation with the fix. Anything else
# is a bug: it is shown with its traceback and BUG_LINE.
USER_ERRORS: tuple[type[BaseException], ...] = (
    SafetyscopeError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
)
# OSErrors that are the machine's state, not a bug (disk full, quota, read-only file system).
ENVIRONMENT_ERRNOS: frozenset[int] = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
# Exits and usage errors of the command-line framework (typer ships its own click) pass through.
PASS_THROUGH: tuple[type[BaseException], ...] = (
    typer.Exit, typer.Abort, typer.exceptions.TyperException, click.exceptions.Exit, click.exceptions.Abort,
    click.ClickException,
)
BUG_LINE = "this is a bug in safetyscope; please report it with the traceback above"
NOTHING_SAVED = "nothing of this run was saved; rerun the command to start again"


@contextmanager
def user_errors(on_interrupt: str = NOTHING_SAVED) -> Iterator[None]:
    """Known errors as one ``error:`` line on stderr and exit code 2; real bugs with their traceback.

    ``on_interrupt``: what Ctrl-C leaves behind, printed after ``interrupted:`` (exit code 130). The
    default says nothing was saved; a command that keeps finished work passes the truth, e.g.
    ``user_errors(on_interrupt="finished stages are saved; rerun the same command to resume")``.
    With ``SAFETYSCOPE_DEBUG=1`` every error is raised with its traceback.
    """
    try:
        yield
    except KeyboardInterrupt:
        print(f"interrupted: {on_interrupt}", file=sys.stderr)
        raise typer.Exit(130) from None
    except PASS_THROUGH:
        raise
    except Exception as exc:
        if os.environ.get("SAFETYSCOPE_DEBUG"):
            raise
        if isinstance(exc, USER_ERRORS) or (isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS):
            print(f"error: {one_line(exc)}", file=sys.stderr)
            raise typer.Exit(2) from None
        traceback.print_exc()
        print(BUG_LINE, file=sys.stderr)
        raise typer.Exit(1) from None


def one_line(exc: BaseException) -> str:
    """The first line of an error's message; OS errors as 'reason: path; check the path'."""
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, SafetyscopeError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}; check the path and its permissions"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
