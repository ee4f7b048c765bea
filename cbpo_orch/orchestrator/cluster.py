"""Joining and sizing the Ray cluster, and what its errors mean: connect (a local Ray of this
machine's own, or a cluster at an address, with Ray's token authentication), the dashboard
notice, how many workers fit the alive nodes, and how a lost cluster or a failed task reads.
The scheduler schedules on what this joins."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from ray.exceptions import LocalRayletDiedError, RaySystemError, RpcError

from cbpo_orch.orchestrator.spec import UnreachableCluster, check_address

WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}


CLUSTER_DEATHS = (LocalRayletDiedError, RaySystemError, RpcError)
"""How Ray reports that the cluster itself went away under the driver (its raylet, the head)."""


class ClusterLost(RuntimeError):
    """The Ray cluster cannot be reached, or went away under the driver: nothing more can
    run until it is back."""


@contextmanager
def cluster_deaths_as_lost() -> Iterator[None]:
    try:
        yield
    except CLUSTER_DEATHS as error:
        raise ClusterLost(f"the Ray cluster went away under the driver ({first_line(error)})") from error


def connect(address: str | None) -> str | None:
    """Join the cluster at ``address`` (``auto``, ``ray://…``), or with none start a
    local Ray of this machine's own (never an unrelated running cluster); returns the
    Ray dashboard's address when there is one."""
    if ray.is_initialized():
        return None
    try:
        check_address(address)
    except UnreachableCluster as error:
        raise ClusterLost(str(error)) from None
    try:
        context = ray.init(
            address=address or "local",
            runtime_env={"env_vars": WORKER_ENV},
            log_to_driver=False,
            configure_logging=False,
            include_dashboard=None,
        )
    except Exception as error:
        if address is None:  # Ray's start-up failures are bare Exceptions ("timed out during startup")
            raise ClusterLost(f"the local Ray did not start ({first_line(error)}); an overloaded machine or one short of memory does this") from None
        if not isinstance(error, ConnectionError):
            raise
        raise ClusterLost(
            f"cannot reach the Ray cluster at {address}: {first_line(error)}; if the cluster checks a token, "
            "set RAY_AUTH_MODE=token here, with RAY_AUTH_TOKEN or the token file (`ray get-auth-token` on the head)"
        ) from None
    return getattr(context, "dashboard_url", None) or None


def dashboard_notice(dashboard: str) -> str:
    """The line that points a person at the Ray dashboard, and, when the cluster checks
    Ray's token, where the token to sign in with comes from."""
    line = f"Ray dashboard: http://{dashboard}"
    return f"{line} (token authentication: sign in with the token `ray get-auth-token` prints)" if _token_auth() else line


def _token_auth() -> bool:
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:  # a Ray without token authentication
        return False
    return is_token_auth_enabled()


@dataclass(frozen=True)
class Fit:
    """How many workers the cluster's alive nodes hold now, what each asks Ray for (CPUs,
    GPUs, bytes of ``memory``; 0 asks for none), and which of those resources bound the
    count (on some node, a worker more of it would have fitted)."""

    workers: int
    cpus: float
    gpus: float
    memory: int
    limits: tuple[str, ...]

    def __str__(self) -> str:
        asks = [f"{self.gpus:g} GPU"] if self.gpus else []
        asks.append(f"{self.cpus:g} CPU")
        if self.memory:
            asks.append(f"{self.memory / 2**30:.2f} GiB of memory")
        return f"{self.workers} at {' and '.join(asks)} each; {' and '.join(self.limits)} limits it"


def cluster_fit(cpus_per_user: float, gpus_per_user: float, memory_per_user: int = 0) -> Fit:
    """How many workers of ``cpus_per_user`` CPUs (and ``gpus_per_user`` GPUs, and
    ``memory_per_user`` bytes of Ray's ``memory``) the cluster's alive nodes hold, node by
    node as Ray places them (a worker never spans two nodes), at least 1; and which resources
    bound that count."""
    asks = {"CPU": cpus_per_user, "GPU": gpus_per_user, "memory": memory_per_user}
    asks = {resource: ask for resource, ask in asks.items() if ask > 0}
    fits, limits = 0, set()
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        holds = {resource: int(node["Resources"].get(resource, 0) / ask) for resource, ask in asks.items()}
        fewest = min(holds.values())
        fits += fewest
        limits.update(resource for resource, held in holds.items() if held == fewest)
    return Fit(max(1, fits), cpus_per_user, gpus_per_user, memory_per_user, tuple(resource for resource in asks if resource in limits))


def largest_node(resource: str, none: int) -> int:
    """The most of Ray's ``resource`` ("CPU", "memory") one alive node has; ``none`` without any."""
    return max([int(node["Resources"].get(resource, 0)) for node in ray.nodes() if node["Alive"]] + [none])


def largest_node_cpus() -> int:
    """The CPUs of the cluster's largest alive node: what one task that uses a whole node gets."""
    return largest_node("CPU", 1)


def task_cause(error: BaseException) -> BaseException:
    """What a Ray task raised: a ``RayTaskError``'s cause, or the error itself."""
    cause = getattr(error, "cause", None)
    return cause if cause is not None else error


def first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text.splitlines()[0][:500] if text else type(error).__name__
