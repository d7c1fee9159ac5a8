"""Progress bars (rich) that scripts can silence with --quiet / SAFETYSCOPE_QUIET=1."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def quiet() -> bool:
    return os.environ.get("SAFETYSCOPE_QUIET", "") not in ("", "0")


@contextmanager
def progress_bar(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``; draws nothing when quiet or when stderr is not a terminal-like sink."""
    if quiet() or total <= 0:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
