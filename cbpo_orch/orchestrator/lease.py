"""One live driver per job: the registry's lease, held while the driver runs the job.

``submit`` and ``resume`` take the job's lease before touching its runs, and a heartbeat
thread renews it every third of its time to live. A second driver is refused while the
lease lives (``LeaseHeld``). The lease of a driver that died ends with its heartbeats; a
driver that died on this machine is seen dead at once (its process is gone), so a
``resume`` right after a crash takes over without waiting and stops what is left of the
dead driver's local Ray (``processes.py``). A driver whose lease another
driver took over (it stalled past its lease) stops at its next step (``LeaseLost``).
"""

from __future__ import annotations

import os
import socket
import threading
import uuid

from cbpo_orch.orchestrator.processes import alive, stop_leftovers
from cbpo_orch.storage.registry import Registry

LEASE_TTL_S = 30.0
"""How long a driver's lease lives without a heartbeat."""


class LeaseLost(RuntimeError):
    """Another driver took over this driver's job: it must stop writing."""

    def __init__(self, job_id: str, ttl_s: float) -> None:
        super().__init__(
            f"this driver lost job {job_id}'s lease to another driver (it went {ttl_s:.0f} s without a "
            "heartbeat); the other driver finishes the job"
        )


class JobLease:
    """This process's hold on ``job_id``'s lease, as a context manager: taken on entry
    (``LeaseHeld`` if another live driver holds it), renewed in the background, released
    on exit. :meth:`check` raises ``LeaseLost`` once the lease is gone."""

    def __init__(self, registry: Registry, job_id: str, ttl_s: float = LEASE_TTL_S) -> None:
        self.registry, self.job_id, self.ttl_s = registry, job_id, ttl_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._beat = threading.Thread(target=self._renew, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> JobLease:
        holder = self.registry.lease(self.job_id)["owner"]
        dead = dead_here(holder)
        if dead:
            stop_leftovers(owner_pid(holder))
        self.registry.take_lease(self.job_id, self.owner, self.ttl_s, replacing=holder if dead else None)
        self._beat.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._beat.join()
        self.registry.release_lease(self.job_id, self.owner)

    def check(self) -> None:
        if self._lost.is_set():
            raise LeaseLost(self.job_id, self.ttl_s)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                still_mine = self.registry.renew_lease(self.job_id, self.owner, self.ttl_s)
            except Exception:  # the database is unreachable for now: try again at the next beat
                continue
            if not still_mine:
                self._lost.set()
                return


def dead_here(owner: str | None) -> bool:
    """Whether lease ``owner`` (``host:pid:nonce``) is a driver of this machine that is gone."""
    pid = owner_pid(owner) if owner is not None and owner.partition(":")[0] == socket.gethostname() else None
    return pid is not None and not alive(pid)


def owner_pid(owner: str) -> int | None:
    """The process id in a lease owner ``host:pid:nonce``; None for any other form."""
    pid = owner.split(":")[1] if owner.count(":") >= 2 else ""
    return int(pid) if pid.isdigit() else None
