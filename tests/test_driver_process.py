"""The driver's child process stops on the Ctrl-C its command forwards, even when the
command was started with SIGINT ignored (as `nohup`, a script's `&` or cron start it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wait_for_interrupt(ready: str) -> int:
    """A stand-in driver: says it is ready, then waits; 130 when interrupted, as the CLI's."""
    Path(ready).touch()
    try:
        time.sleep(120)
    except KeyboardInterrupt:
        return 130
    return 0


def test_a_backgrounded_command_forwards_ctrl_c_to_its_driver(tmp_path):
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import os, signal, sys, threading, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # how a backgrounded command starts
        from cbpo_orch.cli.driver_process import run_in_child
        from tests.test_driver_process import wait_for_interrupt

        def interrupt():
            while not os.path.exists({str(ready)!r}):
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=interrupt, daemon=True).start()
        sys.exit(run_in_child(wait_for_interrupt, {str(ready)!r}))
    """)
    # before the fix the driver ignored the forwarded Ctrl-C and slept on: a timeout here
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=45)
    assert done.returncode == 130
