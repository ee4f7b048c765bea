"""``cbpo-orch submit --address``: the real console script joins a running Ray cluster of two
nodes as its driver, with its registry on PostgreSQL.

The cluster is Ray's own ``ray.cluster_utils.Cluster``: a head and a worker node, each a
raylet of its own on this machine, one CPU each, so that ``--workers 2 --cpus-per-user 1``
places one worker actor on each node and a lost node's actor can only be replaced on a node
that joins later. Its nodes check Ray's token (``RAY_AUTH_MODE=token``, a token of the
test's own in ``RAY_AUTH_TOKEN``), and so must the CLI, which inherits both. Ray's sessions and
its ``ray_current_cluster`` file go to a folder of the cluster's own (``RAY_TMPDIR``), never
to ``/tmp/ray``, where other Rays of this machine keep theirs. Every process of the cluster,
the actors' workers included, is checked gone once its node is removed.

The nodes' workers hold each run after their first (``CBPO_TEST_HOLD_DIR``, in
``tests/crash_hooks``) until the test releases them: the worker node is killed with a run
surely in flight on it, whatever the machine's load. The test may take over the suite's 60 s a
test: Ray's health checks need 15–30 s to declare the node dead (``NODE_DEATH_TIMEOUT``), and
three nodes and a driver's worker actors start in it, about 10 s each on 2 busy cores.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cbpo_orch.orchestrator.processes import stat_fields
from cbpo_orch.storage.artifacts import directory_sha256
from cbpo_orch.storage.registry import Registry, RunInfo
from tests.helpers import CLEAN_ENV, FAST_JOB, JOB_TIMEOUT, REPO, attempt_dirs, ok_line

NODE_DEATH_TIMEOUT = 120
"""How long the driver may take to see that a node is gone: its call to the node's actor fails
within seconds, Ray's health checks of the raylet take 15–30 s, more on a loaded machine."""
HOOKS = str(REPO / "tests" / "crash_hooks")


# ───────────────────────────── the cluster ─────────────────────────────


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        fields = stat_fields(int(entry)) if entry.isdigit() else None
        if fields is not None:
            tree[int(fields[1])].append(int(entry))
    return tree


def _start_time(pid: int) -> str | None:
    """The start time of live (non-zombie) process ``pid``, which tells it apart from a later
    process given the same id; None once it is gone."""
    fields = stat_fields(pid)
    return None if fields is None or fields[0] == "Z" else fields[19]


def _node_processes(node) -> dict[int, str]:
    """Every live process of a node: the ones Ray started for it and all their descendants
    (the raylet's workers), by id, with their start times."""
    tree, found = _children(), {}
    todo = [info.process.pid for infos in node.all_processes.values() for info in infos]
    while todo:
        pid = todo.pop()
        if (started := _start_time(pid)) is not None:
            found[pid] = started
        todo.extend(tree.get(pid, ()))
    return found


def _wait_gone(processes: dict[int, str], timeout: float = 30.0) -> None:
    """Wait for ``processes`` to end; SIGKILL and report any that outlive ``timeout``."""
    deadline = time.monotonic() + timeout
    while alive := {pid for pid, started in processes.items() if _start_time(pid) == started}:
        if time.monotonic() > deadline:
            for pid in alive:
                os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"processes of a removed Ray node outlived it by {timeout:.0f} s: {sorted(alive)}")
        time.sleep(0.2)


class TwoNodes:
    """A ``ray.cluster_utils.Cluster`` of a head and at most one worker node, one CPU each,
    whose workers hold each run after their first until ``hold/release`` exists."""

    def __init__(self, cluster_utils, hold: Path) -> None:
        self.hold = hold
        with self._holding():
            self.cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        self.head = self.cluster.head_node
        self.worker = None

    @contextmanager
    def _holding(self) -> Iterator[None]:
        """The environment a node starts in, which its workers inherit (and no driver)."""
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CBPO_TEST_HOLD_DIR", str(self.hold))
            patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [HOOKS, os.environ.get("PYTHONPATH")])))
            yield

    def held(self) -> int:
        """How many workers hold a run now."""
        return len(list(self.hold.glob("held-*")))

    def release(self) -> None:
        (self.hold / "release").touch()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(self) -> None:
        assert self.worker is None
        with self._holding():
            self.worker = self.cluster.add_node(num_cpus=1)

    def kill_worker(self) -> None:
        """SIGKILL every process of the worker node, as when its machine is lost."""
        processes = _node_processes(self.worker)
        self.cluster.remove_node(self.worker, allow_graceful=False)
        self.worker = None
        _wait_gone(processes)

    def shutdown(self) -> None:
        processes = {pid: t for node in self.cluster.list_all_nodes() for pid, t in _node_processes(node).items()}
        self.cluster.shutdown()
        _wait_gone(processes)

    def personalize_actors(self, besides=()) -> list[dict]:
        """The cluster's ``PersonalizeWorker`` actors, alive or dead, but those in ``besides``."""
        table = self.cluster.global_state.actor_table(None)
        return [a for key, a in table.items() if a["ActorClassName"] == "PersonalizeWorker" and key not in besides]


@pytest.fixture(scope="module")
def ray_cluster():
    """The cluster, with ``RAY_TMPDIR``, ``RAY_AUTH_MODE`` and a token of its own
    (``RAY_AUTH_TOKEN``) set in this process's environment while it runs: the ``cli`` of each
    test, set up after this module's fixture, inherits them."""
    cluster_utils = pytest.importorskip("ray.cluster_utils", reason="this Ray has no ray.cluster_utils")
    from ray._raylet import AuthenticationTokenLoader, Config

    def read_auth_again() -> None:
        """This process's Ray caches its auth mode and its token on first use (a local Ray of an
        earlier test, without a token, is enough): both are read again from the environment."""
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    folder = tempfile.mkdtemp(prefix="cbpo-ray-")  # short: Ray's socket paths must fit in 107 bytes
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", folder)
        patch.setenv("RAY_AUTH_MODE", "token")
        patch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))  # its own, whether or not ~/.ray holds one
        for name in CLEAN_ENV:
            patch.delenv(name, raising=False)
        read_auth_again()
        try:
            (Path(folder) / "hold").mkdir()
            nodes = TwoNodes(cluster_utils, Path(folder) / "hold")
            try:
                nodes.add_worker()
                yield nodes
            finally:
                nodes.shutdown()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    read_auth_again()


def _submit(cli, cluster: TwoNodes, db: str, model: Path, users: int, flags: list[str]):
    common = ["--address", cluster.address, "--db", db, "--model", str(model), "--method", "sft"]
    return cli.start("submit", *common, "--users", str(users), "--workers", "2", "--cpus-per-user", "1", "--examples", "0", *flags)


def _check_results(registry: Registry, home: Path, job: str, users: list[str]) -> dict[tuple[str, str], RunInfo]:
    """Every (user, sft) succeeded, recorded once, with its own adapter, intact; the runs by key."""
    info = registry.job(job)
    assert info.state == "succeeded" and info.error is None
    assert info.counts == {"pending": 0, "running": 0, "succeeded": len(users), "failed": 0}
    runs = {(r.user_id, r.method): r for r in registry.runs(job)}
    rows = registry.results(job)
    keys = [(row["user_id"], row["method"]) for row in rows]
    assert sorted(keys) == sorted((u, "sft") for u in users), "a run was lost or recorded twice"
    for row in rows:
        attempt = f"attempt-{runs[row['user_id'], row['method']].attempts}"
        assert Path(row["adapter_path"]) == home.resolve() / "artifacts" / "adapters" / job / row["user_id"] / "sft" / attempt
        assert attempt_dirs(home, job, row["user_id"], "sft") == [attempt]
        assert directory_sha256(row["adapter_path"]) == row["sha256"]
    assert not (home / "registry.db").exists()  # the registry is the PostgreSQL one
    return runs


# ───────────────────────────── the tests ─────────────────────────────


def test_runs_of_a_lost_node_are_retried_on_a_node_that_joins(ray_cluster, cli, home, postgres_url, tiny_model_dir, dev_users):
    earlier = {a["ActorID"] for a in ray_cluster.personalize_actors()}
    lost_node = ray_cluster.worker.node_id
    proc = _submit(cli, ray_cluster, postgres_url, tiny_model_dir, 4, FAST_JOB)
    job = proc.stdout.readline().strip()
    assert job, f"submit printed no job id: {proc.stderr.read()[-4000:] if proc.poll() is not None else ''}"

    with Registry(postgres_url) as registry:
        # Each node's first run done and recorded, and its second held: the node lost next has a
        # run in flight until it is gone.
        deadline = time.monotonic() + JOB_TIMEOUT
        while not (ray_cluster.held() == 2 and registry.job(job).counts["succeeded"] == 2):
            assert proc.poll() is None, f"the driver ended before the node could be removed:\n{proc.stderr.read()[-4000:]}"
            assert time.monotonic() < deadline, f"no two runs succeeded with both slots' next runs held in time: {registry.job(job).counts}"
            time.sleep(0.05)
        assert registry.job(job).counts == {"pending": 0, "running": 2, "succeeded": 2, "failed": 0}
        before = {(r.user_id, r.method): r for r in registry.runs(job, states=("succeeded",))}
        recorded = {(r["user_id"], r["method"]): r for r in registry.results(job)}
        ray_cluster.kill_worker()  # a run done and one held on each node

        # The driver sees the lost node by itself; only then does a new node join.
        deadline = time.monotonic() + NODE_DEATH_TIMEOUT
        while not any(run.error for run in registry.runs(job)):
            assert proc.poll() is None, f"the driver ended after the node was lost:\n{proc.stderr.read()[-4000:]}"
            assert time.monotonic() < deadline, (
                f"the driver saw no failure {NODE_DEATH_TIMEOUT} s after the worker node was lost: "
                f"{[(r.user_id, r.state, r.attempts) for r in registry.runs(job)]}"
            )
            time.sleep(0.2)
        ray_cluster.add_worker()
        ray_cluster.release()

        ok_line(cli.finish(proc))
        runs = _check_results(registry, home, job, dev_users[:4])
        rows = {(r["user_id"], r["method"]): r for r in registry.results(job)}

    lost = {key: run for key, run in runs.items() if run.attempts > 1}
    assert len(lost) == 1, f"one run was in flight on the lost node: {[(k, r.attempts, r.error) for k, r in runs.items()]}"
    [(lost_key, lost_run)] = lost.items()
    assert lost_run.attempts == 2 and lost_run.error.startswith("worker died: "), lost_run
    assert lost_key not in before
    for key, run in runs.items():
        if key not in lost:
            assert run.attempts == 1 and run.error is None, run
    for key in before:  # what had succeeded is kept as it was
        assert (rows[key]["adapter_path"], rows[key]["sha256"]) == (recorded[key]["adapter_path"], recorded[key]["sha256"])
    # The lost node's actor died with it; its replacement could only start on the new node.
    placed = sorted(a["Address"]["NodeID"] for a in ray_cluster.personalize_actors(earlier))
    assert placed == sorted([ray_cluster.head.node_id, lost_node, ray_cluster.worker.node_id])
