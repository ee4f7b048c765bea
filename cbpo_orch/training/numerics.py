"""What counts as a diverged training: a loss or an adapter weight that is NaN or infinite.

Kept apart from the trainer so that the driver, which only schedules, can tell this
permanent failure from a retryable one without importing torch.
"""

from __future__ import annotations

import math


class NumericalError(ArithmeticError):
    """A user's training diverged (a loss or an adapter weight is NaN or infinite). The run
    is seeded, so a retry would diverge the same way: its run fails with this reason."""


def check_finite_losses(values: list[float], active: list[int], step: int, total_steps: int, method: str) -> None:
    """Raise :class:`NumericalError` when the loss of an active slot is not finite."""
    for u in active:
        value = values[u]
        if not math.isfinite(value):
            pack = f" (slot {u} of the pack)" if len(values) > 1 else ""
            raise NumericalError(f"the {method} loss became {value} at step {step + 1} of {total_steps}{pack}: training diverged")
