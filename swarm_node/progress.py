"""Progress display (rich) for long work: model load, generation, training, checkpoint save and load.

Shown only when stderr is a terminal and logs are text; under a launcher, docker or JSON logs it is silent,
and the log lines carry the same information.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

_enabled = False


def enable(log_format: str) -> None:
    global _enabled
    _enabled = log_format == "text" and sys.stderr.isatty()


@contextlib.contextmanager
def task(description: str) -> Iterator[None]:
    """A spinner with elapsed time while the block runs (a no-op when progress display is off)."""
    if not _enabled:
        yield
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        progress.add_task(description, total=None)
        yield
