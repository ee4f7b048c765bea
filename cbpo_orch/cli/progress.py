"""Progress bars for long work (rich), written to stderr so stdout stays scriptable."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

STDERR = Console(stderr=True)


@contextmanager
def step_progress(label: str) -> Iterator:
    """A bar over training steps; yields the trainer's ``on_step(step, total, loss)``."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=STDERR, transient=False) as progress:
        bar = progress.add_task(label, total=None, loss="—")

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(bar, completed=step, total=total, loss=f"{loss:.4f}")

        yield on_step
