"""The job's driver runs in a child process that the command watches.

When its Ray cluster goes away, Ray ends the driver process from C++ (after its GCS
reconnect timeout) with a log line of its own and no Python code running: only a
watching parent can then say what happened and what to run. The child leads its own
process group, so the processes of a local Ray it starts are that group, and whatever
of it outlives the child is stopped by the parent. Ctrl-C and SIGTERM are passed on to
the child, and the child dies with its parent (``PR_SET_PDEATHSIG`` on Linux).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable

from cbpo_orch.orchestrator.processes import signal_group

EXIT_LEASE_LOST = 75
"""The child's exit code when another driver took its job over."""

OWN_EXITS = (0, 1, 2, 130, EXIT_LEASE_LOST)
"""Exit codes with which the child has said what happened itself."""

_PR_SET_PDEATHSIG = 1


def run_in_child(target: Callable[..., int], *args) -> int:
    """Run ``target(*args)`` (a picklable module-level function returning an exit code) in a
    spawned child; returns its exit code (−N when signal N ended it)."""
    child = multiprocessing.get_context("spawn").Process(target=_child_main, args=(os.getpid(), target, args))
    child.start()
    forwarded = {sig: signal.signal(sig, lambda number, _frame: signal_group(child.pid, number)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        child.join()
    finally:
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
        signal_group(child.pid, signal.SIGKILL)  # what the child's local Ray left behind
    return child.exitcode


def _child_main(parent: int, target: Callable[..., int], args: tuple) -> None:
    # A command started in the background (nohup, a script's `&`, cron) inherits SIGINT
    # ignored, and so would its child: the forwarded Ctrl-C must still stop the driver.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        sys.exit(1)
    sys.exit(target(*args))
