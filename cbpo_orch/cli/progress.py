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


@contextmanager
def job_progress(total: int) -> Iterator:
    """A live bar over a job's (user, method) runs: done / failed / running, users per
    hour and ETA; yields the driver's :class:`Progress`."""
    from cbpo_orch.orchestrator.driver import Progress as DriverProgress

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("✓ {task.fields[ok]}  ✗ {task.fields[failed]}  ▶ {task.fields[running]}  {task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA {task.fields[eta]}"),
    )
    with Progress(*columns, console=STDERR, transient=False) as progress:
        bar = progress.add_task("starting", total=total, ok=0, failed=0, running=0, rate="", eta="—")

        logged = {"done": -1}
        live = progress.console.is_terminal

        def stage(text: str) -> None:
            progress.update(bar, description=text)
            if not live:
                progress.console.print(text)

        def runs(counts: dict, users_per_hour: float | None) -> None:
            done = counts["succeeded"] + counts["failed"]
            left = total - done
            eta = f"{left / users_per_hour * 60:.0f} min" if users_per_hour else "—"
            rate = f"{users_per_hour:.0f} runs/h" if users_per_hour else ""
            progress.update(bar, completed=done, ok=counts["succeeded"], failed=counts["failed"], running=counts["running"], rate=rate, eta=eta)
            if not live and done != logged["done"]:
                logged["done"] = done
                progress.console.print(f"{done}/{total} runs: ✓ {counts['succeeded']} ✗ {counts['failed']} ▶ {counts['running']} {rate} ETA {eta}")

        yield DriverProgress(stage=stage, runs=runs, notice=lambda text: progress.console.print(text, soft_wrap=True))
