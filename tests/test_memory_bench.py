"""bench/memory.py's per-phase peaks: each phase gets the peak it reached itself, nested
phases included, not the process's peak so far."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

from memory import PeakRecorder  # noqa: E402

MB = 2**20


def touch(megabytes: int) -> np.ndarray:
    """``megabytes`` of resident memory, until the array is dropped."""
    return np.ones(megabytes * MB, dtype=np.uint8)


def test_each_phase_reads_its_own_peak_on_the_cpu():
    recorder = PeakRecorder(torch.device("cpu"))
    resident = recorder._read()
    with recorder.phase("big"):
        block = touch(400)
        del block
    with recorder.phase("outer"):
        block = touch(100)
        del block
        with recorder.phase("inner"):
            block = touch(250)
            del block
    peaks = {name: (value - resident) / MB for name, value in recorder.peaks.items()}
    assert peaks["big"] > 390
    assert 90 < peaks["outer"] < 200
    assert 240 < peaks["inner"] < 350


def test_a_wrapped_function_is_counted_as_its_phase():
    recorder = PeakRecorder(torch.device("cpu"))
    resident = recorder._read()

    class Owner:
        @staticmethod
        def work() -> int:
            return int(touch(200).sum() // MB)

    recorder.wrap(Owner, "work", "work")
    assert Owner.work() == 200
    assert (recorder.peaks["work"] - resident) / MB > 190
