"""The orchestrator end to end on CPU: the real ``cbpo-orch`` console script and
``run_job`` over a local Ray, on the shipped HuffPost sample and the tiny random model.

Every subprocess runs in its own session; whatever it leaves behind in that session
(its local Ray: GCS, raylet, dashboard, workers) is killed when the test ends.
The history index is embedded once per test session and copied into each home. The CLI
tests train for real, end to end; ``run_job``'s tests of what the driver schedules, retries and
records give it a stub worker (``tests/faulty_worker.py``'s ``canned_outcomes``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import socket
import time
from collections import Counter
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cbpo_orch.home import SAMPLE_DATA
from cbpo_orch.storage.artifacts import directory_sha256
from cbpo_orch.storage.summary_cache import SummaryCache
from tests import faulty_worker
from tests.helpers import CLEAN_ENV, FAST_JOB, REPO, attempt_dirs, cli_in_process, ok_line, sqlite_registry

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "predictions.jsonl")
LOCAL_RAY_CPUS = 2
"""The CPUs of ``local_ray``, whatever this machine has: the shard plans below depend on them."""
BAD_RECORD = partial(faulty_worker.bad_record_for_one_user, then=faulty_worker.canned_outcomes)

CONTRACT = ["user_id", "method", "rouge1", "rougeL", "gamma", "n_pos", "n_aux", "adapter_path", "sha256", "seconds"]


# ───────────────────────────── helpers and fixtures ─────────────────────────────


def _spec_config(model: Path, users: list[str], methods=("sft",)) -> tuple[dict, object]:
    from cbpo_orch.method.config import TrainConfig
    from cbpo_orch.orchestrator.spec import JobSpec, Resources

    train = TrainConfig(method=methods[0], max_profile=8, epochs=1, max_new_tokens=8, max_prompt_tokens=128)
    spec = JobSpec(task="lamp4", data=str(SAMPLE_DATA.resolve()), split="dev", model=str(model), methods=tuple(methods), users=tuple(users), train=train)
    resources = Resources(workers=1, max_retries=1)
    return spec.to_config(resources), resources


def _create_job(home: Path, model: Path, users: list[str], methods=("sft",)) -> str:
    config, _ = _spec_config(model, users, methods)
    with sqlite_registry(home) as registry:
        return registry.create_job("lamp4", list(methods), users, config)


def _shutdown_ray_if_started() -> None:
    """Leave no Ray behind in this process (a cancelled job must not need one)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _ray_version() -> tuple[int, int]:
    import ray

    major, minor = ray.__version__.split(".")[:2]
    return int(major), int(minor)


# ───────────────────────────── CLI, real subprocesses ─────────────────────────────


def test_submit_then_status_and_results(cli, home, tiny_model_dir, dev_users):
    submitted = cli.run("submit", "--model", str(tiny_model_dir), "--users", "3", "--method", "sft,cbpo", "--workers", "2", "--examples", "2", "--selection", *FAST_JOB)
    job = ok_line(submitted)
    shown = re.findall(r"^  +(gold|sft|cbpo): ", submitted.stdout, flags=re.MULTILINE)
    assert shown == ["gold", "sft", "cbpo"] * 2, submitted.stdout  # one query of the first 2 users, every method

    status, as_json, as_csv = (
        cli.start("status", "--json"),
        cli.start("results", job, "--format", "json"),
        cli.start("results", job, "--format", "csv"),
    )
    status, as_json, as_csv = (cli.finish(p) for p in (status, as_json, as_csv))
    for done in (status, as_json, as_csv):
        ok_line(done)

    [entry] = [j for j in json.loads(status.stdout) if j["job_id"] == job]
    assert entry["state"] == "succeeded" and entry["error"] is None
    assert entry["counts"] == {"pending": 0, "running": 0, "succeeded": 6, "failed": 0}
    assert entry["users"] == 3 and entry["methods"] == ["sft", "cbpo"]

    rows = json.loads(as_json.stdout)
    assert all(list(row) == CONTRACT for row in rows)
    keys = [(row["user_id"], row["method"]) for row in rows]
    assert sorted(keys) == sorted((u, m) for u in dev_users[:3] for m in ("sft", "cbpo"))
    for row in rows:
        path = Path(row["adapter_path"])
        assert path == home.resolve() / "artifacts" / "adapters" / job / row["user_id"] / row["method"] / "attempt-1"
        assert (path / "adapter_config.json").is_file() and (path / "predictions.jsonl").is_file()
        assert directory_sha256(path) == row["sha256"]
        assert 0.0 <= row["rouge1"] <= 1.0 and 0.0 <= row["rougeL"] <= 1.0 and row["seconds"] > 0
        assert row["n_pos"] == 6  # --max-profile 8, the 2 newest held out for selection
        assert json.loads((path / "trainer_state.json").read_text())["n_held_out"] == 2
        if row["method"] == "sft":
            assert row["gamma"] is None and row["n_aux"] == 0
        else:
            assert 0.0 <= row["gamma"] < 1.0 and row["n_aux"] > 0

    table = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert table[0] == CONTRACT
    assert len(table) == 7
    by_key = {(r["user_id"], r["method"]): r for r in rows}
    for line in table[1:]:
        row = dict(zip(CONTRACT, line))
        expected = by_key[(row["user_id"], row["method"])]
        assert (row["adapter_path"], row["sha256"]) == (expected["adapter_path"], expected["sha256"])


def test_two_submits_share_one_registry(cli, tiny_model_dir, dev_users):
    common = ["--model", str(tiny_model_dir), "--method", "sft", "--workers", "1", *FAST_JOB]
    first = cli.start("submit", "--users", "2", *common)
    second = cli.start("submit", "--users", ",".join(dev_users[2:4]), *common)
    done = [cli.finish(p) for p in (first, second)]
    jobs = [ok_line(d) for d in done]
    assert jobs[0] != jobs[1]
    # Two local Rays on one machine: each gets its own dashboard port.
    dashboards = [re.findall(r"Ray dashboard: (\S+)", d.stderr) for d in done]
    if all(dashboards):
        assert dashboards[0] != dashboards[1]
        if _ray_version() >= (2, 59):  # its local clusters check a token: the line says where to get it
            for d in done:
                assert "sign in with the token `ray get-auth-token` prints" in d.stderr, d.stderr[-3000:]

    status = {j["job_id"]: j for j in cli.json("status", "--json")}
    assert set(status) == set(jobs)
    for job in jobs:
        assert status[job]["state"] == "succeeded"
        assert status[job]["counts"] == {"pending": 0, "running": 0, "succeeded": 2, "failed": 0}
    with sqlite_registry(cli.home) as registry:
        assert registry.job(jobs[0]).users == dev_users[:2]
        assert registry.job(jobs[1]).users == dev_users[2:4]
        for job in jobs:
            assert len(registry.results(job)) == 2


def _closed_port() -> int:
    """A port of this machine that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_submit_to_an_address_where_nothing_answers_is_one_line_and_writes_nothing(cli, tiny_model_dir):
    port = _closed_port()
    started = time.monotonic()
    done = cli.run("submit", "--address", f"127.0.0.1:{port}", "--model", str(tiny_model_dir), "--users", "1", "--method", "base", *FAST_JOB, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done.stderr[-3000:]
    assert done.stderr.startswith(f"error: cannot reach the Ray cluster at 127.0.0.1:{port}: nothing answers there"), done.stderr[-3000:]
    assert len(done.stderr.splitlines()) == 1
    assert time.monotonic() - started < 30  # ray.init alone retried for 5 minutes
    assert cli.json("status", "--json") == []


def test_a_driver_whose_cluster_address_answers_nothing_stops_at_once():
    from cbpo_orch.orchestrator import cluster

    started = time.monotonic()
    with pytest.raises(cluster.ClusterLost, match=r"cannot reach the Ray cluster at ray://127\.0\.0\.1:\d+: nothing answers there"):
        cluster.connect(f"ray://127.0.0.1:{_closed_port()}")
    assert time.monotonic() - started < 5


# ───────────────────────────── CLI, in process ─────────────────────────────


def _main(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    try:
        return cli_in_process(monkeypatch, capsys, *argv)
    finally:
        _shutdown_ray_if_started()  # only a wrongly accepted submit would have started one


@pytest.fixture
def quiet_home(tmp_path, monkeypatch) -> Path:
    """A home for in-process CLI calls, its registry holding one job."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("CBPO_ORCH_HOME", str(home))
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    return home


BAD_INPUT = {
    "unknown task": (["submit", "--task", "no-such-task"], "no-such-task"),
    "unknown method": (["submit", "--method", "sft,no-such-method"], "no-such-method"),
    "missing model": (["submit", "--model", "/nonexistent/model-dir"], "/nonexistent/model-dir"),
    "missing data": (["submit", "--data", "/nonexistent/data-dir"], "/nonexistent/data-dir"),
    "unknown user": (["submit", "--users", "ad7c7cfda48,nobody-here"], "nobody-here"),
    "zero users": (["submit", "--users", "0"], "--users"),
    "an empty list of users": (["submit", "--users", " , "], "--users names no user"),
    "not a Ray address": (["submit", "--address", "foo:bar"], "'foo:bar' is not a Ray address"),
    "a port out of range": (["submit", "--address", "ray://10.0.0.1:99999"], "is not a Ray address"),
    "status of unknown job": (["status", "NOSUCHJOB"], "NOSUCHJOB"),
    "results of unknown job": (["results", "NOSUCHJOB"], "NOSUCHJOB"),
    "resume of unknown job": (["resume", "NOSUCHJOB"], "NOSUCHJOB"),
    "unknown results format": (["results", "{job}", "--format", "xml"], "--format"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_line_and_changes_nothing(case, quiet_home, tiny_model_dir, dev_users, monkeypatch, capsys):
    existing = _create_job(quiet_home, tiny_model_dir, dev_users[:1])
    argv, hint = BAD_INPUT[case]
    argv = [a.replace("{job}", existing) for a in argv]
    if argv[0] == "submit":
        argv = argv + FAST_JOB + ([] if "--model" in argv else ["--model", str(tiny_model_dir)])
    with sqlite_registry(quiet_home) as registry:
        jobs_before = registry.jobs()

    code, out, err = _main(monkeypatch, capsys, *argv)

    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert hint in lines[0]
    assert "Traceback" not in err and out == ""
    with sqlite_registry(quiet_home) as registry:
        assert registry.jobs() == jobs_before
    assert not (quiet_home / "artifacts").exists()


def test_cancelled_job_starts_nothing(quiet_home, tiny_model_dir, dev_users, monkeypatch, capsys):
    from cbpo_orch.orchestrator.driver import run_job
    from cbpo_orch.orchestrator.workspace import Workspace

    job = _create_job(quiet_home, tiny_model_dir, dev_users[:2], ("sft", "cbpo"))
    code, out, err = _main(monkeypatch, capsys, "cancel", job)
    assert code == 0 and out.strip() == f"job {job}: 4 pending runs cancelled", err

    space = Workspace.open(quiet_home)
    try:
        state = run_job(space, job, worker_fn=faulty_worker.must_not_run)
    finally:
        _shutdown_ray_if_started()
    assert state == "cancelled"
    info = space.registry.job(job)
    assert info.state == "cancelled" and info.finished_at is not None
    runs = space.registry.runs(job)
    assert len(runs) == 4 and all(r.state == "cancelled" and r.attempts == 0 for r in runs)
    assert not (quiet_home / "artifacts").exists()

    code, out, err = _main(monkeypatch, capsys, "resume", job)
    assert code == 2 and err.startswith("error: ") and "cancelled" in err and len(err.strip().splitlines()) == 1


def test_a_task_adapter_written_but_never_recorded_is_adopted_not_trained_again(quiet_home, tiny_model_dir, dev_users, monkeypatch):
    from dataclasses import replace

    from cbpo_orch.orchestrator import driver, scheduler
    from cbpo_orch.orchestrator.spec import JobSpec
    from cbpo_orch.orchestrator.workspace import Workspace

    config, resources = _spec_config(tiny_model_dir, dev_users[:1])
    spec = replace(JobSpec.from_config(config)[0], task_adapter="auto")
    space = Workspace.open(quiet_home)
    key = driver.task_adapter_key(spec)
    # A driver died between writing the task adapter and recording it.
    written = space.artifacts.write_dir(f"task-adapters/{key}", {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w"})
    monkeypatch.setattr(scheduler, "run_remote", lambda *args, **kwargs: pytest.fail("the written task adapter was trained again"))

    assert driver._task_adapter(space, spec, resources, driver.Progress()) == str(written.path)
    assert space.registry.task_adapter(key)["sha256"] == written.sha256


# ───────────────────────────── run_job in process, over a local Ray ─────────────────────────────


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray started by this process as ``submit`` starts one, with ``LOCAL_RAY_CPUS``
    CPUs (Ray's ``RAY_OVERRIDE_RESOURCES``), whose workers can import ``tests.faulty_worker``."""
    import ray

    from cbpo_orch.orchestrator import cluster

    control = tmp_path_factory.mktemp("ray-control") / "cancel.json"
    with pytest.MonkeyPatch.context() as patch:
        paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        patch.setenv("PYTHONPATH", os.pathsep.join(paths))
        patch.setenv(faulty_worker.CANCEL_FILE_ENV, str(control))
        patch.setenv(faulty_worker.DEATHS_DIR_ENV, str(control.parent))
        patch.setenv("RAY_OVERRIDE_RESOURCES", json.dumps({"CPU": LOCAL_RAY_CPUS}))
        for name in CLEAN_ENV:
            patch.delenv(name, raising=False)
        assert not ray.is_initialized()
        cluster.connect(None)
        assert ray.cluster_resources()["CPU"] == LOCAL_RAY_CPUS
        try:
            yield control
        finally:
            ray.shutdown()


def test_failing_user_is_retried_then_failed_others_succeed(local_ray, home, tiny_model_dir, dev_users):
    from cbpo_orch.orchestrator.driver import run_job
    from cbpo_orch.orchestrator.spec import Resources
    from cbpo_orch.orchestrator.workspace import Workspace

    users = [dev_users[0], faulty_worker.FAILING_USER, dev_users[2]]
    assert faulty_worker.FAILING_USER == dev_users[1]
    job = _create_job(home, tiny_model_dir, users, ("sft", "cbpo"))
    space = Workspace.open(home)

    state = run_job(space, job, Resources(max_retries=1, workers=1), worker_fn=faulty_worker.fail_one_user)

    assert state == "failed"
    info = space.registry.job(job)
    assert info.state == "failed" and info.error == "2 of 6 runs failed"
    assert info.counts == {"pending": 0, "running": 0, "succeeded": 4, "failed": 2}
    for run in space.registry.runs(job):
        if run.user_id == faulty_worker.FAILING_USER:
            assert run.state == "failed" and run.attempts == 2
            assert faulty_worker.injected_error(run.user_id) in run.error and "RuntimeError" in run.error
            assert attempt_dirs(home, job, run.user_id, run.method) == []
        else:
            assert run.state == "succeeded" and run.attempts == 1 and run.error is None
    rows = space.registry.results(job)
    assert sorted((r["user_id"], r["method"]) for r in rows) == sorted(
        (u, m) for u in users if u != faulty_worker.FAILING_USER for m in ("sft", "cbpo")
    )
    assert all(directory_sha256(r["adapter_path"]) == r["sha256"] for r in rows)


def test_a_full_device_stops_the_job_resumably_with_nothing_half_written(local_ray, home, tiny_model_dir, dev_users, monkeypatch):
    """The second adapter's second file fills the device halfway: the job stops, interrupted,
    naming the folder and the resume; the staging folder is gone and the first run kept; once
    there is space, resume records every run once."""
    import errno

    from cbpo_orch.orchestrator.driver import NoSpaceLeft, run_job
    from cbpo_orch.orchestrator.spec import Resources
    from cbpo_orch.orchestrator.workspace import Workspace
    from cbpo_orch.storage import artifacts

    users = dev_users[:3]
    job = _create_job(home, tiny_model_dir, users)
    space = Workspace.open(home)
    write_file, written = artifacts._write_file, []

    def fills_up(destination: Path, data: bytes) -> None:
        written.append(destination)
        if len(written) == len(ADAPTER_FILES) + 2:
            destination.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        write_file(destination, data)

    monkeypatch.setattr(artifacts, "_write_file", fills_up)
    with pytest.raises(NoSpaceLeft, match=rf"^no space left on the device writing {re.escape(str(home))}/artifacts/adapters/{job}/"):
        run_job(space, job, Resources(workers=1), worker_fn=faulty_worker.canned_outcomes)
    info = space.registry.job(job)
    assert info.state == "interrupted" and info.error.endswith(f"free space, then `cbpo-orch resume {job}` finishes the job")
    assert info.counts["succeeded"] == 1
    assert not [p for p in (home / "artifacts").rglob(".*")], "a staging folder was left behind"

    monkeypatch.setattr(artifacts, "_write_file", write_file)
    assert run_job(space, job, Resources(workers=1), worker_fn=faulty_worker.canned_outcomes) == "succeeded"
    rows = space.registry.results(job)
    assert sorted(r["user_id"] for r in rows) == sorted(users)
    assert all(directory_sha256(r["adapter_path"]) == r["sha256"] for r in rows)
    assert all(len(attempt_dirs(home, job, user, "sft")) == 1 for user in users)


def test_the_driver_process_says_a_full_device_in_one_line(home, tiny_model_dir, dev_users, monkeypatch, capsys):
    from cbpo_orch.cli import job_commands
    from cbpo_orch.orchestrator import driver

    job = _create_job(home, tiny_model_dir, dev_users[:1])

    def full(*_args, **_kwargs):
        raise driver.NoSpaceLeft("no space left on the device writing /x/artifacts/adapters/j/u/sft/attempt-1")

    monkeypatch.setattr(driver, "run_job", full)
    assert job_commands._drive(f"sqlite:///{home / 'registry.db'}", home / "artifacts", home / "cache", job, None, 0) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: no space left on the device writing /x/artifacts/adapters/j/u/sft/attempt-1; every finished run is kept: "
        f"free space, then `cbpo-orch resume {job}` finishes the job"
    )


@pytest.mark.parametrize(
    "worker_fn, error",
    [(BAD_RECORD, "DataError"), (faulty_worker.diverge_for_one_user, "NumericalError")],
    ids=["bad-record", "diverged"],
)
def test_input_error_fails_its_run_at_once_others_succeed(local_ray, home, tiny_model_dir, dev_users, worker_fn, error):
    from cbpo_orch.orchestrator.driver import run_job
    from cbpo_orch.orchestrator.spec import Resources
    from cbpo_orch.orchestrator.workspace import Workspace

    users = [dev_users[0], faulty_worker.FAILING_USER, dev_users[2]]
    job = _create_job(home, tiny_model_dir, users)
    space = Workspace.open(home)

    state = run_job(space, job, Resources(max_retries=2, workers=1), worker_fn=worker_fn)

    assert state == "failed"
    assert space.registry.job(job).counts == {"pending": 0, "running": 0, "succeeded": 2, "failed": 1}
    for run in space.registry.runs(job):
        assert run.attempts == 1
        if run.user_id == faulty_worker.FAILING_USER:
            assert run.state == "failed"
            assert run.error == f"{error}: {faulty_worker.injected_error(run.user_id)}"
        else:
            assert run.state == "succeeded"


def test_packed_users_succeed_together_and_a_failing_pack_is_retried_user_by_user(local_ray, home, tiny_model_dir, dev_users):
    """--users-per-step 3: the three users of a method go to the worker in one call. When that
    call fails for one user's bad record, no one is failed for it: each user is sent again
    alone, the others succeed on that attempt (one adapter each, written once), and the bad
    record fails its user at once."""
    from cbpo_orch.orchestrator.driver import run_job
    from cbpo_orch.orchestrator.spec import Resources
    from cbpo_orch.orchestrator.workspace import Workspace

    users = [dev_users[0], faulty_worker.FAILING_USER, dev_users[2]]
    job = _create_job(home, tiny_model_dir, users)
    space = Workspace.open(home)

    state = run_job(space, job, Resources(max_retries=0, workers=1, users_per_step=3), worker_fn=BAD_RECORD)

    assert state == "failed"
    assert space.registry.job(job).counts == {"pending": 0, "running": 0, "succeeded": 2, "failed": 1}
    for run in space.registry.runs(job):
        assert run.attempts == 2, "one attempt in the failed pack, one alone"
        if run.user_id == faulty_worker.FAILING_USER:
            assert run.state == "failed" and run.error == f"DataError: {faulty_worker.injected_error(run.user_id)}"
        else:
            assert run.state == "succeeded" and attempt_dirs(home, job, run.user_id, "sft") == ["attempt-2"]

    packed = _create_job(home, tiny_model_dir, [dev_users[0], dev_users[2]])
    assert run_job(space, packed, Resources(max_retries=0, workers=1, users_per_step=3), worker_fn=faulty_worker.canned_outcomes) == "succeeded"
    assert all(run.attempts == 1 for run in space.registry.runs(packed))


def test_dead_worker_is_replaced_and_its_run_retried(local_ray, home, tiny_model_dir, dev_users):
    from cbpo_orch.orchestrator.driver import run_job
    from cbpo_orch.orchestrator.spec import Resources
    from cbpo_orch.orchestrator.workspace import Workspace

    users = [faulty_worker.FAILING_USER, dev_users[0]]
    job = _create_job(home, tiny_model_dir, users)
    space = Workspace.open(home)

    state = run_job(space, job, Resources(max_retries=1, workers=1), worker_fn=faulty_worker.die_once_for_one_user)

    assert state == "succeeded", [(r.user_id, r.state, r.attempts, r.error) for r in space.registry.runs(job)]
    attempts = {run.user_id: run.attempts for run in space.registry.runs(job)}
    assert attempts == {faulty_worker.FAILING_USER: 2, dev_users[0]: 1}
    assert attempt_dirs(home, job, faulty_worker.FAILING_USER, "sft") == ["attempt-2"]


def test_a_remote_tasks_steps_reach_the_driver_while_it_runs(local_ray):
    from cbpo_orch.orchestrator import scheduler

    seen = []
    result = scheduler.run_remote(faulty_worker.slow_steps, 6, 0.5, num_cpus=1, on_step=lambda *step: seen.append(step))
    assert result == "trained"
    steps = [step for step, _, _ in seen]
    assert len(set(steps)) >= 2 and steps == sorted(steps) and all(total == 6 for _, total, _ in seen), seen


@pytest.mark.parametrize("nodes, cpus, gpus, expected", [
    ([{"CPU": 3}, {"CPU": 3}], 2, 0, 2),                     # node by node: 1 + 1, not 6 // 2
    ([{"CPU": 8, "GPU": 1}, {"CPU": 8}], 1, 0.5, 2),         # two half-GPU workers on the GPU node
    ([{"CPU": 16}, {"CPU": 16, "dead": True}], 4, 0, 4),     # a dead node holds none
    ([{"CPU": 1}], 2, 0, 1),                                 # at least one
])
def test_cluster_slots_count_what_each_node_holds(monkeypatch, nodes, cpus, gpus, expected):
    import ray

    from cbpo_orch.orchestrator import cluster

    listed = [{"Alive": not node.pop("dead", False), "Resources": node} for node in [dict(n) for n in nodes]]
    monkeypatch.setattr(ray, "nodes", lambda: listed)
    assert cluster.cluster_fit(cpus, gpus).workers == expected


def test_more_workers_than_the_cluster_fits_runs_what_fits_and_says_so(local_ray, home, tiny_model_dir, dev_users, monkeypatch):
    from dataclasses import replace

    from cbpo_orch.orchestrator import driver, scheduler
    from cbpo_orch.orchestrator.lease import JobLease
    from cbpo_orch.orchestrator.spec import JobSpec
    from cbpo_orch.orchestrator.workspace import Workspace

    asked = []
    monkeypatch.setattr(scheduler, "fan_out", lambda work, setup, slots, *rest, **kw: asked.append(slots))
    job = _create_job(home, tiny_model_dir, dev_users[:2])
    space = Workspace.open(home)
    spec, resources = JobSpec.from_config(space.registry.job(job).config)
    notices = []
    with JobLease(space.registry, job, 60) as lease:
        setup = scheduler.WorkerSetup("lamp4", "data", "dev", "model", None, SimpleNamespace(examples=[]), {}, {}, None)
        driver._fan_out(space, job, replace(resources, workers=50), space.registry.runs(job, states=("pending",)), setup, spec,
                        driver.Progress(notice=notices.append), lease, SummaryCache(space.cache / "summary"), {})
    fit = scheduler.worker_fit(setup)
    assert asked == [fit.workers] and fit.workers < 50 and fit.memory > 0
    assert notices == [f"--workers 50 is more than the cluster fits now ({fit}): running {fit.workers}"]



def test_the_driver_sends_the_largest_users_first(home, tiny_model_dir, dev_users, sample_history, monkeypatch):
    from cbpo_orch.orchestrator import cluster, driver, scheduler
    from cbpo_orch.orchestrator.lease import JobLease
    from cbpo_orch.orchestrator.spec import JobSpec
    from cbpo_orch.orchestrator.workspace import Workspace

    sent = []
    monkeypatch.setattr(scheduler, "fan_out", lambda work, *args, **kwargs: sent.extend(unit.user_id for unit in work))
    monkeypatch.setattr(scheduler, "worker_fit", lambda setup: cluster.Fit(1, setup.cpus_per_user, setup.gpus_per_user, 0, ("CPU",)))
    job = _create_job(home, tiny_model_dir, dev_users)
    space = Workspace.open(home)
    spec, resources = JobSpec.from_config(space.registry.job(job).config)
    keep = {user: 5 * (n + 1) for n, user in enumerate(dev_users)}  # unequal histories: 5, 10, 15 … items
    by_user: dict[str, list] = {}
    for example in sample_history[1].examples:
        by_user.setdefault(example.user_id, []).append(example)
    examples = [e for user, own in by_user.items() for e in own[: keep.get(user, len(own))]]
    history = SimpleNamespace(examples=examples)
    with JobLease(space.registry, job, 60) as lease:
        setup = scheduler.WorkerSetup("lamp4", "data", "dev", "model", None, history, {}, {}, None)
        driver._fan_out(space, job, resources, space.registry.runs(job, states=("pending",)), setup, spec, driver.Progress(), lease, SummaryCache(space.cache / "summary"), {})
    sizes = Counter(example.user_id for example in examples)
    assert sorted(sent) == sorted(dev_users) and len({sizes[u] for u in dev_users}) > 1
    assert [sizes[u] for u in sent] == sorted((sizes[u] for u in dev_users), reverse=True)


@pytest.mark.parametrize("items, nodes, expected", [
    (100, [16], (1, 16)),           # too few to split: one shard, the whole node's cores
    (2048, [16], (4, 4)),           # four shards of 512, four cores each
    (100_000, [16], (16, 1)),       # one shard per CPU
    (1000, [8, 8], (2, 8)),         # two shards, one per node
    (1000, [8, 8, 8, 8], (2, 8)),   # never more CPUs than a node has
    (0, [2], (1, 2)),
])
def test_a_shard_plan_uses_every_cpu_and_no_shard_is_small(monkeypatch, items, nodes, expected):
    import ray

    from cbpo_orch.orchestrator import scheduler

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": float(sum(nodes))})
    monkeypatch.setattr(scheduler, "largest_node_cpus", lambda: max(nodes))
    assert scheduler.shard_plan(items, 512) == expected


@pytest.mark.parametrize("items, gpus, rounds, expected", [
    (100_000, False, 4, (64, 1)),   # four shards per CPU, a CPU each
    (1000, False, 4, (8, 2)),       # no more than 1000 / 128 rounded up: none far under the minimum
    (100_000, True, 1, (2, 8)),     # one shard per GPU, the CPUs shared among them
    (100_000, True, 4, (8, 2)),
])
def test_a_shard_plan_takes_rounds_per_device(monkeypatch, items, gpus, rounds, expected):
    import ray

    from cbpo_orch.orchestrator import scheduler

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    monkeypatch.setattr(scheduler, "largest_node_cpus", lambda: 16)
    assert scheduler.shard_plan(items, 128, gpus, rounds) == expected


@pytest.mark.parametrize("costs, shards, expected", [
    ([1] * 10, 2, [0, 5, 10]),
    ([1] * 10, 3, [0, 3, 7, 10]),            # ends nearest 3⅓ and 6⅔
    ([5, 1, 1, 1, 1, 1], 2, [0, 1, 6]),      # one long item is a shard's whole share
    ([1, 1, 1, 1, 1, 5], 2, [0, 5, 6]),
    ([9, 1, 1, 1], 3, [0, 1, 2, 4]),         # never an empty shard while items last
    ([1, 1], 4, [0, 1, 2]),                  # no more shards than items
])
def test_shards_are_even_in_cost_and_never_empty(costs, shards, expected):
    from cbpo_orch.orchestrator import scheduler

    assert scheduler.shard_bounds(costs, shards) == expected


def test_shards_follow_the_plan_ask_for_their_cpus_and_come_back_in_order(local_ray):
    """What ``map_shards`` decides: the plan (a shard per CPU, the CPUs shared among them), the
    bounds (even in cost), what each task asks Ray for, and the order the parts come back in."""
    from cbpo_orch.orchestrator import scheduler

    assert scheduler.shard_plan(10, 4) == (2, 1)  # 10 items of at least 4 a shard: one shard per CPU, one CPU each
    done = []
    parts = scheduler.map_shards(faulty_worker.shard_as_placed, list(range(10)), "shared argument", min_shard=4,
                                 cost=lambda item: 9 if item == 0 else 1, on_done=lambda finished, total: done.append((finished, total)))
    assert [items for items, _, _, _ in parts] == [[0], list(range(1, 10))]  # item 0 costs 9 of the 18: a shard alone
    assert all(argument == "shared argument" and threads == 1 and asked == {"CPU": 1.0} for _, argument, threads, asked in parts)
    assert done == [(1, 2), (2, 2)]


def test_the_driver_embeds_in_shards_on_ray_as_the_process_would(local_ray, tmp_path, tiny_model_dir, dev_users, monkeypatch, sample_history):
    from cbpo_orch.data.tasks import load_task
    from cbpo_orch.orchestrator import driver
    from cbpo_orch.orchestrator.spec import JobSpec
    from cbpo_orch.orchestrator.workspace import Workspace
    from cbpo_orch.workers.context import history_datasets

    monkeypatch.setattr(driver, "EMBED_MIN_SHARD", 64)
    spec = JobSpec.from_config(_spec_config(tiny_model_dir, dev_users[:1])[0])[0]
    stages = []
    datasets = history_datasets(spec.data, spec.split, load_task("lamp4"))
    history = driver._history(Workspace.open(tmp_path / "home"), spec, datasets, driver.Progress(stage=stages.append))
    alone = sample_history[1]
    assert [(e.user_id, e.item_id) for e in history.examples] == [(e.user_id, e.item_id) for e in alone.examples]
    np.testing.assert_allclose(history.embeddings, alone.embeddings, atol=1e-5)
    shards, texts = map(int, re.fullmatch(r".*: (\d+)/\1 shards of (\d+) texts", stages[-1]).groups())
    assert shards == min(2 * driver.EMBED_ROUNDS, -(-texts // 64)) > 2, "rounds of shards per CPU, so progress shows a shard at a time"


def test_the_jobs_pi_ref_pass_computes_each_preference_pair_once_and_a_failed_pass_only_slows(local_ray, home, tiny_model_dir, dev_users, monkeypatch):
    from cbpo_orch.data.tasks import load_task
    from cbpo_orch.orchestrator import driver
    from cbpo_orch.orchestrator.spec import JobSpec
    from cbpo_orch.orchestrator.workspace import Workspace
    from cbpo_orch.workers.context import history_datasets
    from cbpo_orch.workers.reference_pass import reference_shard
    from cbpo_orch.workers.user_items import trained_pairs, user_items

    task, space = load_task("lamp4"), Workspace.open(home)

    def run_pass(methods):
        job = _create_job(home, tiny_model_dir, dev_users[:2], methods)
        spec, resources = JobSpec.from_config(space.registry.job(job).config)
        datasets = history_datasets(spec.data, spec.split, task)
        history = driver._history(space, spec, datasets, driver.Progress())
        pending = space.registry.runs(job, states=("pending",))
        shown = {"stage": [], "notice": []}
        progress = driver.Progress(stage=shown["stage"].append, notice=shown["notice"].append)
        values = driver._reference_pass(space, spec, task, driver._planned_items(spec, datasets[0], history, pending), None, resources, progress)
        planned = [user_items(datasets[0], history, run.user_id, spec.config_for(run.method)) for run in pending if run.method != "sft"]
        return spec, values, trained_pairs(planned), shown

    spec, values, pairs, shown = run_pass(("sft", "cbpo", "bco"))  # cbpo and bco share their aux: the pass computes them once
    alone = dict(reference_shard(pairs, str(tiny_model_dir), None, task.budgets(128, 8), spec.train.eval_batch_size, 1).values())
    assert values.keys() == alone.keys() and len(values) > 0
    assert list(values.values()) == pytest.approx([alone[key] for key in values], abs=1e-4)
    assert shown["stage"][0].startswith(f"π_ref's pass over {len(pairs)} pairs") and shown["notice"] == []

    monkeypatch.setattr(driver, "REFERENCE_SHARD", faulty_worker.reference_shard_fails)  # nothing may reach the cluster now
    _, again, planned, shown = run_pass(("cbpo",))  # a later job on the same starting model: every pair known, no pass
    assert again.items() <= values.items() and len(again) == len(planned) and shown["stage"] == [] and shown["notice"] == [
        f"π_ref: {len(planned)} of {len(planned)} pairs known from earlier jobs on this starting model"
    ]
    assert run_pass(("sft",))[1] == {} and run_pass(("sft",))[3]["stage"] == [], "SFT never reads π_ref: no pass"

    shutil.rmtree(space.cache / "reference")
    _, values, pairs, shown = run_pass(("cbpo",))
    assert values == {} and shown["notice"] == [
        f"π_ref's shared pass failed (RuntimeError: injected failure of a π_ref shard of {len(pairs)} pairs): each worker computes its own"
    ]


def test_a_kto_worker_started_from_the_jobs_pass_computes_no_pair_and_trains_the_same(local_ray, home, tiny_model_dir, dev_users):
    """The pass foresees KTO's mismatched pairs too, formed over the pairs training keeps."""
    from cbpo_orch.data.tasks import load_task
    from cbpo_orch.orchestrator import driver
    from cbpo_orch.orchestrator.spec import JobSpec
    from cbpo_orch.orchestrator.workspace import Workspace
    from cbpo_orch.workers.context import history_datasets
    from cbpo_orch.workers.personalize import personalize_users
    from cbpo_orch.workers.user_context import load_user_context

    task, space = load_task("lamp4"), Workspace.open(home)
    users = dev_users[:2]
    job = _create_job(home, tiny_model_dir, users, ("kto",))
    spec, resources = JobSpec.from_config(space.registry.job(job).config)
    datasets = history_datasets(spec.data, spec.split, task)
    history = driver._history(space, spec, datasets, driver.Progress())
    stages = []
    pending = space.registry.runs(job, states=("pending",))
    planned = driver._planned_items(spec, datasets[0], history, pending)
    values = driver._reference_pass(space, spec, task, planned, None, resources, driver.Progress(stage=stages.append))
    assert any(stage.startswith("π_ref's pass over") and " mismatched pairs (KTO's, each user's own)" in stage for stage in stages), stages

    config = spec.config_for("kto")
    seeded = load_user_context(task, datasets[0], history, tiny_model_dir, None, "cpu", values)
    fresh = load_user_context(task, datasets[0], history, tiny_model_dir, None, "cpu")
    together, alone = personalize_users(seeded, users, config), personalize_users(fresh, users, config)
    assert seeded.reference.computed == 0, "every pair a KTO worker reads, mismatched ones included, came from the pass"
    assert fresh.reference.computed == len(values)
    for a, b in zip(together, alone):
        assert a.metrics["losses"] == pytest.approx(b.metrics["losses"], rel=1e-5, abs=1e-6)


def test_kto_mismatched_pairs_skip_what_training_leaves_out():
    from cbpo_orch.data.tasks import Budgets
    from cbpo_orch.method.methods import mismatched_pairs
    from cbpo_orch.orchestrator.driver import _mismatched
    from cbpo_orch.storage.reference_cache import LEFT_OUT, pair_text_key

    assert mismatched_pairs([("a", "1"), ("b", "2"), ("c", "3")]) == [("a", "2"), ("b", "3"), ("c", "1")]
    budgets = Budgets(64, 8)
    kept, left_out, unknown = ("a", "1"), ("b", "2"), ("z", "9")
    entries = {pair_text_key(*pair, 64, 8): (bytes([i + 1]) * 16, -1.0) for i, pair in enumerate([kept, ("c", "3")])}
    entries[pair_text_key(*left_out, 64, 8)] = LEFT_OUT
    cycles = {(kept, left_out, ("c", "3")): None, (kept, unknown): None}
    assert _mismatched(cycles, entries, budgets) == [("a", "3"), ("c", "1")]  # b is left out; z's pass failed: its worker computes


def test_the_task_adapter_trains_on_a_whole_node_and_shows_its_steps(local_ray, home, tiny_model_dir, dev_users, monkeypatch):
    from dataclasses import replace

    from cbpo_orch.orchestrator import cluster, driver, scheduler
    from cbpo_orch.orchestrator.spec import JobSpec
    from cbpo_orch.orchestrator.workspace import Workspace

    config, resources = _spec_config(tiny_model_dir, dev_users[:1])
    spec = replace(JobSpec.from_config(config)[0], task_adapter="auto", task_adapter_epochs=1)
    asked, run_remote = {}, scheduler.run_remote

    def recorded(fn, *args, **kwargs):
        asked.update(threads=args[-1], num_cpus=kwargs["num_cpus"])
        return run_remote(fn, *args, **kwargs)

    monkeypatch.setattr(scheduler, "run_remote", recorded)
    stages = []
    path = driver._task_adapter(Workspace.open(home), spec, resources, driver.Progress(stage=stages.append))
    cpus = cluster.largest_node_cpus()
    assert asked == {"threads": cpus, "num_cpus": cpus} and cpus >= 1
    assert stages[0].endswith(f"; {cpus} CPUs)") and (Path(path) / "adapter_model.safetensors").is_file()
    shown = [re.search(r": step (\d+)/(\d+), loss ", stage) for stage in stages[1:]]
    assert all(shown) and len(stages) <= 11, stages  # a line per tenth of the steps at most


def test_model_that_cannot_load_fails_every_run_without_retries(local_ray, home, tmp_path, dev_users):
    from cbpo_orch.orchestrator.driver import run_job
    from cbpo_orch.orchestrator.spec import Resources
    from cbpo_orch.orchestrator.workspace import Workspace

    broken = tmp_path / "emptied-model"  # checked at submit, emptied before the job ran
    broken.mkdir()
    job = _create_job(home, broken, dev_users[:3])
    space = Workspace.open(home)

    state = run_job(space, job, Resources(max_retries=2, workers=1))

    assert state == "failed"
    assert space.registry.job(job).counts == {"pending": 0, "running": 0, "succeeded": 0, "failed": 3}
    runs = space.registry.runs(job)
    assert sorted(run.attempts for run in runs) == [0, 0, 1]  # one sent, the others never
    [error] = {run.error for run in runs}
    assert error.startswith("WorkerCannotStart: ModelError: ") and str(broken) in error


def test_cancel_while_running_finishes_started_run_only(local_ray, home, tiny_model_dir, dev_users):
    from cbpo_orch.orchestrator.driver import run_job
    from cbpo_orch.orchestrator.spec import Resources
    from cbpo_orch.orchestrator.workspace import Workspace

    job = _create_job(home, tiny_model_dir, dev_users[:3])
    local_ray.write_text(json.dumps({"db": f"sqlite:///{home / 'registry.db'}", "job_id": job}))
    space = Workspace.open(home)

    state = run_job(space, job, Resources(workers=1), worker_fn=faulty_worker.cancel_job_then_personalize)

    assert state == "cancelled"
    info = space.registry.job(job)
    assert info.state == "cancelled"
    assert info.counts == {"pending": 0, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 2}
    runs = space.registry.runs(job)
    started = [r for r in runs if r.attempts]
    assert len(started) == 1 and started[0].state == "succeeded"
    assert len(space.registry.results(job)) == 1



def test_a_worker_process_loads_the_embedder_once_for_all_its_shards(monkeypatch):
    from cbpo_orch.data.embedding import embed, load_embedder
    from cbpo_orch.workers import embedding as worker

    loads = []
    monkeypatch.setattr(worker, "load_embedder", lambda name: loads.append(name) or load_embedder(name))
    worker._embedder.cache_clear()
    texts = ["a headline\\nan article", "another headline\\nanother article", "a third"]
    first, second = worker.embed_shard(texts[:2], None, 1), worker.embed_shard(texts[2:], None, 1)
    assert loads == [None]
    np.testing.assert_allclose(np.concatenate([first, second]), embed(load_embedder(), texts), atol=1e-6)
    worker._embedder.cache_clear()


def test_the_jobs_gamma_pass_estimates_each_distinct_input_once_and_a_failed_pass_only_slows(local_ray, home, tiny_model_dir, dev_users, monkeypatch):
    from cbpo_orch.data.tasks import load_task
    from cbpo_orch.orchestrator import driver
    from cbpo_orch.orchestrator.spec import JobSpec, Resources
    from cbpo_orch.orchestrator.workspace import Workspace
    from cbpo_orch.workers.context import history_datasets
    from cbpo_orch.workers.gamma_pass import estimated_gamma
    from cbpo_orch.workers.user_items import gamma_inputs, user_items

    space = Workspace.open(home)
    job = _create_job(home, tiny_model_dir, dev_users[:2], ("sft", "bco", "cbpo", "cbpo-raw"))
    spec, _ = JobSpec.from_config(space.registry.job(job).config)
    datasets = history_datasets(spec.data, spec.split, load_task("lamp4"))
    history = driver._history(space, spec, datasets, driver.Progress())
    pending = space.registry.runs(job, states=("pending",))
    shown = {"stage": [], "notice": []}
    planned = driver._planned_items(spec, datasets[0], history, pending)
    gammas = driver._gamma_pass(history, planned, driver.Progress(stage=shown["stage"].append, notice=shown["notice"].append))

    config = spec.config_for("cbpo")
    keys = [gamma_inputs(user_items(datasets[0], history, user, config), config) for user in dev_users[:2]]
    assert gammas == {key: estimated_gamma(history, key) for key in keys}, "cbpo and cbpo-raw share each user's estimate"
    assert shown["stage"][0].startswith("γ's pass over 2 users' items") and shown["notice"] == []

    real_shard = driver.GAMMA_SHARD
    monkeypatch.setattr(driver, "GAMMA_SHARD", faulty_worker.gamma_shard_fails)
    shown = {"stage": [], "notice": []}
    assert driver._gamma_pass(history, planned, driver.Progress(stage=shown["stage"].append, notice=shown["notice"].append)) == {}
    assert len(shown["notice"]) == 1 and "each worker estimates its own" in shown["notice"][0]
    sft_only = [run for run in pending if run.method in ("sft", "bco")]
    assert driver._gamma_pass(history, driver._planned_items(spec, datasets[0], history, sft_only), driver.Progress(stage=pytest.fail)) == {}, "no γ read: no pass"

    monkeypatch.setattr(driver, "GAMMA_SHARD", real_shard)
    assert driver.run_job(space, job, Resources(workers=1, max_retries=0), worker_fn=faulty_worker.gamma_from_the_jobs_pass) == "succeeded"
    assert {(row["user_id"], row["gamma"]) for row in space.registry.results(job) if row["method"].startswith("cbpo")} == {
        (user, gammas[key][0]) for user, key in zip(dev_users[:2], keys)
    }, "every worker took its γ from the pass (the worker raises otherwise)"
