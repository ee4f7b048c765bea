"""bench/memory.py's per-phase peaks: each phase gets the peak it reached itself, nested
phases included, not the process's peak so far."""

from __future__ import annotations

import sys
from pathlib import Path

PHASES = """
import json, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from memory import PeakRecorder
MB = 2**20
recorder = PeakRecorder(torch.device("cpu"))
resident = recorder._read()
with recorder.phase("big"):
    block = np.ones(400 * MB, dtype=np.uint8); del block
with recorder.phase("outer"):
    block = np.ones(100 * MB, dtype=np.uint8); del block
    with recorder.phase("inner"):
        block = np.ones(250 * MB, dtype=np.uint8); del block
class Owner:
    @staticmethod
    def work() -> int:
        return int(np.ones(200 * MB, dtype=np.uint8).sum() // MB)
recorder.wrap(Owner, "work", "work")
assert Owner.work() == 200
print(json.dumps({name: (value - resident) / MB for name, value in recorder.peaks.items()}))
"""


def test_each_phase_and_wrapped_function_reads_its_own_peak_on_the_cpu():
    """In a fresh interpreter, as bench/memory.py measures: a process that has freed memory
    before may serve a new array from pages it still holds, and no peak moves."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-c", PHASES, str(Path(__file__).parents[1] / "bench")], capture_output=True, text=True, check=True)
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    assert peaks["big"] > 390
    assert 90 < peaks["outer"] < 200
    assert 240 < peaks["inner"] < 350
    assert peaks["work"] > 190  # a wrapped function is counted as its phase
