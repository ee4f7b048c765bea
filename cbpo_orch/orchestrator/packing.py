"""What the scheduler sends, in what order and in which packs, and what a landed pack means:
plain Python, no Ray, so the policies are tested without a cluster.

A unit of work is one (user, config) run. Runs go out by method, the users with the most
history first (:func:`largest_first`). A pack is up to ``users_per_step`` units of one config
that one worker trains in the same passes, fewer when less waits than fills every worker
(:func:`pack_size`). A unit in a pack that failed as a whole may have failed for another user's
sake: its failure is marked ``shared`` and it goes alone from then on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cbpo_orch.method.config import TrainConfig


@dataclass(frozen=True)
class Work:
    """One unit to schedule: a key the driver knows it by, a user and a config."""

    key: object
    user_id: str
    config: TrainConfig


def largest_first(work: Iterable[Work], sizes: Mapping[str, int]) -> list[Work]:
    """The order to send ``work`` in: by method, and within a method the users with the most
    history items (``sizes``) first, so that the job's tail is short runs and a pack's users
    have like numbers of steps; ties by user id."""
    return sorted(work, key=lambda unit: (unit.config.method, -sizes.get(unit.user_id, 0), unit.user_id))


@dataclass(frozen=True)
class Failure:
    """A unit that raised, or whose worker died; ``error`` is its one-line reason and
    ``permanent`` says a retry would fail the same way. ``shared``: the unit was in a pack
    of several users that failed as a whole, so the cause may be another user's; it is
    sent again alone."""

    error: str
    permanent: bool
    shared: bool = False


def pack_size(waiting: int, actors: int, users_per_step: int) -> int:
    """Units in the next pack: ``users_per_step``, but no more than an even share of what
    waits over the actors, so that a job's last packs keep every worker busy."""
    return max(1, min(users_per_step, -(-waiting // max(1, actors))))


def _next_pack(queue: deque, size: int, alone: set) -> list[Work]:
    """Take the queue's first unit and up to ``size − 1`` later ones of the same config that
    may share a pack (none that must go alone), keeping the rest in order."""
    pack, rest = [queue.popleft()], []
    while queue and len(pack) < size:
        unit = queue.popleft()
        (pack if unit.config == pack[0].config and unit.key not in alone else rest).append(unit)
    queue.extendleft(reversed(rest))
    return pack


class PackQueue:
    """The units waiting to run, in order, and the keys of those that must go alone.
    ``start(unit)`` is asked as a unit leaves the queue (False drops it, e.g. cancelled)."""

    def __init__(self, work: Iterable[Work], users_per_step: int, start: Callable[[Work], bool]):
        self.queue, self.users_per_step, self.start = deque(work), users_per_step, start
        self.alone: set = set()

    def __len__(self) -> int:
        return len(self.queue)

    def next_pack(self, workers: int) -> list[Work]:
        """The next pack for one of ``workers`` (empty when ``start`` dropped all of it)."""
        size = 1 if self.queue[0].key in self.alone else pack_size(len(self.queue), workers, self.users_per_step)
        return [unit for unit in _next_pack(self.queue, size, self.alone) if self.start(unit)]

    def landed(self, pack: list[Work], results: list) -> list:
        """``results`` of ``pack`` as the driver records them: in a pack of several, each
        failure is ``shared`` and its unit goes alone from now on."""
        if len(pack) == 1:
            return results
        results = [Failure(r.error, r.permanent, shared=True) if isinstance(r, Failure) else r for r in results]
        self.alone.update(unit.key for unit, r in zip(pack, results) if isinstance(r, Failure))
        return results

    def extend(self, units: Iterable[Work]) -> None:
        """Queue ``units`` again (retries), after everything waiting."""
        self.queue.extend(units)

    def drain(self) -> list[Work]:
        """Every unit still waiting, the queue emptied."""
        units, self.queue = list(self.queue), deque()
        return units
