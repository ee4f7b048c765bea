"""Drivers as processes: whether one is alive, and stopping what a dead one left.

A driver leads its own process group (``cbpo-orch`` runs it so), so the processes of the
local Ray it starts are that group. Linux never gives out a pid while a process group of
that id lives, so the group of a dead leader holds only what the dead driver left.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie has exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = stat_fields(pid)
    return fields is None or fields[0] != "Z"


def stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (which may hold spaces and
    parentheses): 0 = state ("Z": a zombie), 1 = parent, 2 = process group, 3 = session,
    19 = start time; None when it cannot be read (no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def signal_group(pgid: int, number: int) -> None:
    """Send signal ``number`` to process group ``pgid``; nothing when there is none."""
    try:
        os.killpg(pgid, number)
    except (ProcessLookupError, PermissionError):
        pass


def stop_leftovers(pid: int) -> None:
    """Kill what is left of dead driver ``pid``'s process group (its local Ray)."""
    if not alive(pid):
        signal_group(pid, signal.SIGKILL)
