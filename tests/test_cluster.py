"""orchestrator/cluster.py: how many workers the alive nodes hold (every resource a worker asks
Ray for, node by node, and which one limits the count), without a real cluster; and the one
place that reaches into Ray's private token-authentication module, checked here so that a Ray
upgrade that moves it fails loudly instead of hiding the dashboard's sign-in notice."""

from __future__ import annotations

import pytest
import ray

from cbpo_orch.orchestrator import cluster, scheduler
from cbpo_orch.training.worker_memory import parameter_count, worker_memory_bytes


def test_rays_token_authentication_check_is_where_cluster_py_reads_it():
    from ray._private.authentication.authentication_utils import is_token_auth_enabled  # moved? update cluster._token_auth

    assert callable(is_token_auth_enabled)


def test_the_dashboard_notice_says_where_the_token_comes_from_when_the_cluster_checks_one(monkeypatch):
    monkeypatch.setattr(cluster, "_token_auth", lambda: True)
    assert cluster.dashboard_notice("127.0.0.1:8265") == "Ray dashboard: http://127.0.0.1:8265 (token authentication: sign in with the token `ray get-auth-token` prints)"
    monkeypatch.setattr(cluster, "_token_auth", lambda: False)
    assert cluster.dashboard_notice("127.0.0.1:8265") == "Ray dashboard: http://127.0.0.1:8265"


GIB = 2**30


def _nodes(monkeypatch, nodes: list[dict]) -> None:
    """Ray's node list replaced by ``nodes`` (each its resources; ``dead`` marks one not alive)."""
    listed = [{"Alive": not node.pop("dead", False), "Resources": node} for node in [dict(n) for n in nodes]]
    monkeypatch.setattr(ray, "nodes", lambda: listed)


@pytest.mark.parametrize("nodes, cpus, gpus, memory, workers, limits", [
    ([{"CPU": 8, "memory": 10 * GIB}], 1, 0, 3 * GIB, 3, ("memory",)),                          # memory, not CPUs
    ([{"CPU": 2, "memory": 10 * GIB}], 1, 0, 3 * GIB, 2, ("CPU",)),                             # CPUs, not memory
    ([{"CPU": 3, "memory": 9 * GIB}], 1, 0, 3 * GIB, 3, ("CPU", "memory")),                     # both at once
    ([{"CPU": 8, "memory": 4 * GIB}, {"CPU": 8, "memory": 5 * GIB}], 1, 0, 3 * GIB, 2, ("memory",)),  # node by node: 1 + 1, not 9 // 3
    ([{"CPU": 2, "memory": 8 * GIB}, {"CPU": 8, "memory": 6 * GIB}], 1, 0, 3 * GIB, 4, ("CPU", "memory")),  # each node its own limit
    ([{"CPU": 8, "GPU": 1, "memory": 64 * GIB}, {"CPU": 8, "memory": 64 * GIB}], 1, 0.5, 3 * GIB, 2, ("GPU",)),  # a node without a GPU holds none
    ([{"CPU": 16, "memory": 64 * GIB}, {"CPU": 16, "memory": 64 * GIB, "dead": True}], 4, 0, 3 * GIB, 4, ("CPU",)),  # a dead node holds none
    ([{"CPU": 8}], 1, 0, 0, 8, ("CPU",)),                                                        # no memory asked: CPUs alone
    ([{"CPU": 8, "memory": GIB}], 1, 0, 3 * GIB, 1, ("memory",)),                               # at least one
])
def test_the_fit_counts_every_resource_a_worker_asks_for_node_by_node_and_names_the_limit(monkeypatch, nodes, cpus, gpus, memory, workers, limits):
    _nodes(monkeypatch, nodes)
    fit = cluster.cluster_fit(cpus, gpus, memory)
    assert (fit.workers, fit.limits) == (workers, limits)


def test_the_fit_says_what_each_worker_asks_for_and_what_limits_the_count(monkeypatch):
    _nodes(monkeypatch, [{"CPU": 16, "memory": 10 * GIB}])
    assert str(cluster.cluster_fit(1, 0, 3 * GIB)) == "3 at 1 CPU and 3.00 GiB of memory each; memory limits it"
    _nodes(monkeypatch, [{"CPU": 16, "GPU": 2, "memory": 64 * GIB}])
    assert str(cluster.cluster_fit(4, 1, 5 * GIB // 2)) == "2 at 1 GPU and 4 CPU and 2.50 GiB of memory each; GPU limits it"


def test_a_jobs_workers_fit_by_the_memory_they_ask_for(monkeypatch, tiny_model_dir):
    need = worker_memory_bytes(parameter_count(tiny_model_dir), on_gpu=False)
    _nodes(monkeypatch, [{"CPU": 16, "memory": 2 * need + need // 2}])
    fit = scheduler.worker_fit(scheduler.WorkerSetup("lamp4", "data", "dev", str(tiny_model_dir), None, None, {}, {}, None))
    assert (fit.workers, fit.cpus, fit.memory, fit.limits) == (2, 1, need, ("memory",))


def test_a_local_ray_that_does_not_start_is_one_line_not_a_traceback(monkeypatch):
    def timed_out(**options):
        raise Exception("The current node timed out during startup. This could happen because some of the Ray processes failed to startup.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", timed_out)
    with pytest.raises(cluster.ClusterLost, match=r"^the local Ray did not start \(Exception: The current node timed out during startup\. This"):
        cluster.connect(None)
    monkeypatch.setattr(cluster, "check_address", lambda address: None)
    with pytest.raises(Exception) as raised:  # joining a cluster: its own failures are not relabelled
        cluster.connect("auto")
    assert type(raised.value) is Exception
