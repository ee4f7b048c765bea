"""Crash anywhere, resume, same result.

One job's driver is crashed at every stage in turn, each crash hitting the driver that
``resume`` started after the one before: while embedding the histories, while training
the task adapter, mid fan-out, between writing an adapter folder and recording it, and
by stopping its local Ray's GCS. Each time the command says in one line what to run,
nothing that had finished is trained again, and the next driver stops what the dead
one's local Ray left running. The last ``resume`` completes the job: every run recorded
once, checksums intact, nothing unregistered left on disk.

The kill timings are drawn from a seed: the suite runs seeds 0 and 1,
``CBPO_CRASH_SEEDS=0,1,2,3,4`` runs the campaign over five.

Each seed's campaign takes minutes, over the suite's 60 s a test: it starts six drivers, each
with a local Ray of its own (about 10 s apiece on 2 cores), and trains for real through the
console script, whose worker no test can swap for a stub; its stages (embedding, the task
adapter, the fan-out) are the ones a crash must hit.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from cbpo_orch.orchestrator.lease import owner_pid
from cbpo_orch.storage.artifacts import directory_sha256
from cbpo_orch.storage.registry import Registry
from tests.helpers import FAST_JOB, JOB_TIMEOUT, REPO, Cli, attempt_dirs, group_members, ok_line

SEEDS = [int(s) for s in os.environ.get("CBPO_CRASH_SEEDS", "0,1").split(",")]
USERS = 4
COMMON = ["--users", str(USERS), "--method", "sft", "--workers", "1", *FAST_JOB]
DIED = r"error: the driver of job {job} died \({how}\) before the job finished.*`cbpo-orch resume {job}` finishes the job"
CLUSTER_LOST = r"error: the Ray cluster went away under the driver .*`cbpo-orch resume {job}` finishes the job"


class Watched:
    """A started ``cbpo-orch`` driver command whose stderr is read as it comes."""

    def __init__(self, cli: Cli, args: list[str], env: dict[str, str]) -> None:
        saved = cli.env
        cli.env = {**saved, **env}
        try:
            self.proc = cli.start(*args)
        finally:
            cli.env = saved
        self.job = self.proc.stdout.readline().strip() if args[0] == "submit" else args[1]
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    def output(self) -> str:
        return "".join(self.lines)[-3000:]

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + JOB_TIMEOUT
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, f"exited before {text!r}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {text!r} in time:\n{self.output()}"
            time.sleep(0.05)

    def ended_with_one_line(self) -> str:
        self.proc.wait(timeout=JOB_TIMEOUT)
        self.reader.join(timeout=10)  # it has read the pipe to its end (or a process the driver left holds it)
        errors = [line.strip() for line in self.lines if line.startswith("error:")]
        assert self.proc.returncode == 1 and len(errors) == 1, f"exit {self.proc.returncode}:\n{self.output()}"
        return errors[0]


def _driver_pid(registry: Registry, job: str, other_than: int | None) -> int:
    """The pid of the job's driver once it holds the lease (``host:pid:nonce``)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        owner = registry.lease(job)["owner"]
        if owner is not None and owner_pid(owner) != other_than:
            assert owner.partition(":")[0] == socket.gethostname()
            return owner_pid(owner)
        assert time.monotonic() < deadline, "no driver took the job's lease"
        time.sleep(0.05)


def _succeeded(registry: Registry, job: str) -> dict[tuple[str, str], tuple[str, int]]:
    """(sha256, attempts) of each succeeded run."""
    attempts = {(r.user_id, r.method): r.attempts for r in registry.runs(job)}
    return {(r["user_id"], r["method"]): (r["sha256"], attempts[(r["user_id"], r["method"])]) for r in registry.results(job)}


def _sigkill_once(text: str, longest: float):
    def kill(watched: Watched, registry: Registry, driver: int, rng: random.Random) -> None:
        watched.wait_for(text)
        time.sleep(rng.uniform(0, longest))
        os.kill(driver, signal.SIGKILL)

    return kill


def _sigkill_after_a_success(watched: Watched, registry: Registry, driver: int, rng: random.Random) -> None:
    done = len(registry.runs(watched.job, states=("succeeded",)))
    deadline = time.monotonic() + JOB_TIMEOUT
    while len(registry.runs(watched.job, states=("succeeded",))) == done:
        assert time.monotonic() < deadline and watched.proc.poll() is None, watched.output()
        time.sleep(0.02)
    os.kill(driver, signal.SIGKILL)


def _stop_its_gcs(watched: Watched, registry: Registry, driver: int, rng: random.Random) -> None:
    watched.wait_for("personalizing users")
    time.sleep(rng.uniform(0, 1.0))
    (gcs,) = [pid for pid in group_members(driver) if Path(f"/proc/{pid}/comm").read_text().strip() == "gcs_server"]
    os.kill(gcs, signal.SIGKILL)


HOOKS = str(REPO / "tests" / "crash_hooks")

CRASHES = [
    # (where, how, environment of that driver, what its command may say: patterns)
    ("while embedding the histories", _sigkill_once("embedding users' histories", 2.0), {}, [DIED.replace("{how}", "signal 9")]),
    ("while training the task adapter", _sigkill_once("training the task adapter", 2.0), {}, [DIED.replace("{how}", "signal 9")]),
    ("mid fan-out", _sigkill_after_a_success, {}, [DIED.replace("{how}", "signal 9")]),
    ("between writing an adapter and recording it", lambda *_: None, {"CBPO_TEST_DIE_BEFORE_RECORD": "1"}, [DIED.replace("{how}", "exit code 137")]),
    # Ray ends a driver whose GCS is gone after this many seconds (60 by default); a
    # driver that sees its raylet die first says so itself.
    ("when its Ray's GCS goes away", _stop_its_gcs, {"RAY_gcs_rpc_server_reconnect_timeout_s": "5"}, [DIED.replace("{how}", "exit code 1"), CLUSTER_LOST]),
]


@pytest.fixture
def bare_home(tmp_path) -> Path:
    """A home without the history cache: the job embeds the histories itself."""
    folder = tmp_path / "bare-home"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("seed", SEEDS)
def test_a_job_crashed_at_every_stage_in_turn_resumes_to_the_same_complete_result(bare_home, tiny_model_dir, seed):
    rng = random.Random(seed)
    cli = Cli(bare_home)
    cli.env["PYTHONPATH"] = os.pathsep.join(filter(None, [HOOKS, str(REPO), cli.env.get("PYTHONPATH")]))
    command = ["submit", *COMMON, "--model", str(tiny_model_dir), "--task-adapter", "auto", "--task-adapter-epochs", "1"]
    registry = Registry(f"sqlite:///{bare_home / 'registry.db'}")
    try:
        finished: dict = {}
        dead = None
        for where, crash, env, said in CRASHES:
            watched = Watched(cli, command, env)
            assert watched.job, watched.output()
            driver = _driver_pid(registry, watched.job, other_than=dead)
            if dead is not None:
                assert group_members(dead) == [], "what the driver killed before left running survived the takeover"
            crash(watched, registry, driver, rng)
            line = watched.ended_with_one_line()
            assert any(re.fullmatch(pattern.replace("{job}", watched.job), line) for pattern in said), f"{where}: {line}"
            now = _succeeded(registry, watched.job)
            assert {k: now[k] for k in finished} == finished, f"{where}: a finished run was trained again or rewritten"
            assert len(now) < USERS, f"{where}: the crash came too late"
            finished, dead = now, driver
            command = ["resume", watched.job, "--workers", "1"]
        ok_line(cli.run(*command))
        assert group_members(dead) == []
        job = watched.job
        info = registry.job(job)
        assert info.state == "succeeded" and info.counts == {"pending": 0, "running": 0, "succeeded": USERS, "failed": 0}
        rows = registry.results(job)
        assert len(rows) == USERS == len({(r["user_id"], r["method"]) for r in rows}), "every run recorded exactly once"
        for row in rows:
            key = (row["user_id"], row["method"])
            assert directory_sha256(row["adapter_path"]) == row["sha256"]
            assert attempt_dirs(bare_home, job, *key) == [Path(row["adapter_path"]).name], "resume leaves only registered folders"
        assert {k: v for k, v in _succeeded(registry, job).items() if k in finished} == finished
    finally:
        registry.close()
        cli.cleanup()
