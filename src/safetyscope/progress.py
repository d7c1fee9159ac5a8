"""Progress bars (rich) and verbosity: a parameter, not an environment variable written by commands.

``verbosity(False)`` (a context manager) silences progress bars inside its block; library functions
take ``progress: bool | None`` where a caller may want to choose. ``SAFETYSCOPE_QUIET=1`` in the
user's environment is read once as the default, never written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .parallel import is_writer

_VERBOSE: ContextVar[bool | None] = ContextVar("safetyscope_verbose", default=None)


def quiet() -> bool:
    """True when progress bars are off: inside ``verbosity(False)``, else from SAFETYSCOPE_QUIET."""
    v = _VERBOSE.get()
    if v is not None:
        return not v
    return os.environ.get("SAFETYSCOPE_QUIET", "") not in ("", "0")


@contextmanager
def verbosity(verbose: bool) -> Iterator[None]:
    """Progress bars on (True) or off (False) for the duration of the block."""
    token = _VERBOSE.set(bool(verbose))
    try:
        yield
    finally:
        _VERBOSE.reset(token)


@contextmanager
def progress_bar(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``; draws nothing when quiet, nor on ranks other than 0 under torchrun."""
    if quiet() or total <= 0 or not is_writer():
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
