"""One live driver per job: the registry's lease, its heartbeat, takeover and refusal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from cbpo_orch.home import SAMPLE_DATA
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.orchestrator.lease import JobLease, LeaseLost, dead_here, owner_pid
from cbpo_orch.orchestrator.processes import alive, signal_group
from cbpo_orch.orchestrator.spec import JobSpec, Resources
from cbpo_orch.storage.registry import LeaseHeld, Registry
from tests.helpers import cli_in_process, wait_until

ELSEWHERE = "another-host:4242:abcdef12"


@pytest.fixture
def registry(db_url: str):
    with Registry(db_url) as opened:
        yield opened


def _job(registry: Registry, users=("a", "b")) -> str:
    spec = JobSpec(task="lamp4", data=str(SAMPLE_DATA.resolve()), split="dev", model="/no/model/needed", methods=("sft",), users=tuple(users), train=TrainConfig(method="sft"))
    return registry.create_job("lamp4", ["sft"], list(users), spec.to_config(Resources(workers=1)))


def test_a_live_lease_refuses_others_and_an_expired_one_is_taken_over(registry: Registry) -> None:
    job = _job(registry)
    assert registry.lease(job)["owner"] is None
    registry.take_lease(job, "A", ttl_s=0.4)
    registry.take_lease(job, "A", ttl_s=0.4)  # its own lease: taken again
    with pytest.raises(LeaseHeld, match=f"job {job} is being run by another driver \\(A\\)"):
        registry.take_lease(job, "B", ttl_s=0.4)
    assert registry.renew_lease(job, "A", ttl_s=0.4) and not registry.renew_lease(job, "B", ttl_s=0.4)
    wait_until(lambda: registry.lease(job)["seconds_left"] <= 0, what="A's lease expiring")
    registry.take_lease(job, "B", ttl_s=30)
    assert not registry.renew_lease(job, "A", ttl_s=30), "an expired owner's heartbeat must not win the lease back"
    registry.release_lease(job, "A")  # not A's any more: nothing changes
    assert registry.lease(job)["owner"] == "B" and registry.lease(job)["seconds_left"] > 29
    registry.release_lease(job, "B")
    assert registry.lease(job)["owner"] is None
    registry.take_lease(job, "C", ttl_s=30)


def test_a_dead_drivers_lease_is_replaced_only_when_named(registry: Registry) -> None:
    job = _job(registry)
    registry.take_lease(job, ELSEWHERE, ttl_s=30)
    with pytest.raises(LeaseHeld):
        registry.take_lease(job, "B", ttl_s=30, replacing="someone-else")
    registry.take_lease(job, "B", ttl_s=30, replacing=ELSEWHERE)
    assert registry.lease(job)["owner"] == "B"


def test_drivers_racing_for_one_lease_exactly_one_wins(db_url: str, registry: Registry) -> None:
    job = _job(registry)
    contenders = 8
    barrier = threading.Barrier(contenders)
    won: list[str] = []
    refused: list[str] = []

    def contend(name: str) -> None:
        with Registry(db_url) as own:
            barrier.wait()
            try:
                own.take_lease(job, name, ttl_s=30)
                won.append(name)
            except LeaseHeld:
                refused.append(name)

    threads = [threading.Thread(target=contend, args=(f"driver-{i}",)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == contenders - 1
    assert registry.lease(job)["owner"] == won[0]


def test_the_heartbeat_keeps_the_lease_past_its_ttl_and_exit_frees_it(registry: Registry) -> None:
    job = _job(registry)
    with JobLease(registry, job, ttl_s=0.3) as lease:
        time.sleep(1.0)  # three times the TTL: only the heartbeat keeps it
        with pytest.raises(LeaseHeld):
            registry.take_lease(job, ELSEWHERE, ttl_s=30)
        lease.check()
    assert registry.lease(job)["owner"] is None


def _lost(lease: JobLease) -> bool:
    try:
        lease.check()
    except LeaseLost:
        return True
    return False


def test_a_driver_whose_lease_was_taken_over_stops(registry: Registry) -> None:
    job = _job(registry)
    with JobLease(registry, job, ttl_s=0.3) as lease:
        registry.take_lease(job, ELSEWHERE, ttl_s=30, replacing=lease.owner)  # as if it had stalled past its lease
        wait_until(lambda: _lost(lease), what="the heartbeat seeing the takeover")
        with pytest.raises(LeaseLost, match="lost job .* lease to another driver"):
            lease.check()
    assert registry.lease(job)["owner"] == ELSEWHERE, "the lost driver must not release the new owner's lease"


def test_owner_pid_reads_the_pid_of_host_pid_nonce_and_nothing_else() -> None:
    assert owner_pid("node-1:4321:ab12cd34") == 4321
    assert [owner_pid(o) for o in ("node-1", "node-1:4321", "node-1:-5:ab", "node-1::ab", "node-1:12x:ab")] == [None] * 5


def test_a_local_driver_that_died_is_replaced_at_once_a_live_one_is_not(registry: Registry) -> None:
    job = _job(registry)
    import socket

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = f"{socket.gethostname()}:{child.pid}:00000000"
        registry.take_lease(job, alive, ttl_s=30)
        assert not dead_here(alive) and not dead_here(ELSEWHERE) and not dead_here(None)
        with pytest.raises(LeaseHeld):
            JobLease(registry, job).__enter__()
    finally:
        child.kill()
        child.wait()
    assert dead_here(alive)
    with JobLease(registry, job) as lease:
        assert registry.lease(job)["owner"] == lease.owner


def test_run_job_refuses_a_job_another_live_driver_runs_and_changes_nothing(tmp_path: Path, registry: Registry) -> None:
    from cbpo_orch.orchestrator.driver import run_job
    from cbpo_orch.orchestrator.workspace import Workspace

    job = _job(registry)
    running = registry.runs(job)[0]
    registry.mark_running(running.run_id)  # the other driver's run in flight
    registry.take_lease(job, ELSEWHERE, ttl_s=30)
    space = Workspace.open(tmp_path / "home", registry.url, None)
    with pytest.raises(LeaseHeld):
        run_job(space, job)
    assert registry.job(job).state == "pending"
    assert [r.state for r in registry.runs(job)] == ["running", "pending"], "a refused driver must not reset the other's runs"


def test_resume_of_a_job_another_driver_runs_is_one_clear_line(tmp_path: Path, monkeypatch, capfd) -> None:
    from cbpo_orch.cli.main import main

    home = tmp_path / "home"
    with Registry(f"sqlite:///{home / 'registry.db'}") as registry:
        job = _job(registry)
        registry.take_lease(job, ELSEWHERE, ttl_s=30)
    monkeypatch.delenv("CBPO_ORCH_DB", raising=False)
    monkeypatch.setattr(sys, "argv", ["cbpo-orch", "resume", job, "--home", str(home)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capfd.readouterr().err  # the driver runs in a child process
    assert exit_info.value.code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert re.fullmatch(
        f"error: job {job} is being run by another driver \\({ELSEWHERE}\\); wait for it to finish, or if it has died, "
        f"`cbpo-orch resume {job}` can take over once its lease expires \\(in \\d+ s without a heartbeat\\)",
        line,
    ), line
    assert "Traceback" not in err


def _as_left_by_version(db_url: str, version: int, undo: str) -> None:
    """Turn the registry back into what schema ``version`` left: ``undo``, then its version row."""
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text(undo))
        connection.execute(text(f"UPDATE schema_version SET version = {version}"))
    engine.dispose()


def test_a_version_1_registry_gets_a_free_lease_for_every_job(db_url: str, registry: Registry) -> None:
    jobs = [_job(registry), _job(registry, users=("c",))]
    _as_left_by_version(db_url, 1, "DROP TABLE driver_leases")  # no lease table
    with Registry(db_url) as migrated:
        for job in jobs:
            assert migrated.lease(job)["owner"] is None
            migrated.take_lease(job, "A", ttl_s=30)


def test_a_version_2_registry_gets_the_lease_notice_column(db_url: str, registry: Registry) -> None:
    job = _job(registry)
    registry.take_lease(job, "A", ttl_s=30)
    _as_left_by_version(db_url, 2, "ALTER TABLE driver_leases DROP COLUMN notice")  # no notice column
    with Registry(db_url) as migrated:
        assert migrated.lease(job)["owner"] == "A" and migrated.lease(job)["notice"] is None
        migrated.set_lease_notice(job, "A", "Ray dashboard: http://127.0.0.1:8265")
        assert migrated.lease(job)["notice"] == "Ray dashboard: http://127.0.0.1:8265"


def test_the_lease_notice_is_its_owners_and_goes_with_the_lease(registry: Registry) -> None:
    job = _job(registry)
    registry.take_lease(job, "A", ttl_s=30)
    registry.set_lease_notice(job, "B", "not the owner")
    assert registry.lease(job)["notice"] is None
    registry.set_lease_notice(job, "A", "Ray dashboard: http://10.0.0.1:8265")
    assert registry.lease(job)["notice"] == "Ray dashboard: http://10.0.0.1:8265"
    registry.release_lease(job, "A")
    assert registry.lease(job) | {"seconds_left": None} == {"owner": None, "seconds_left": None, "notice": None}


def test_status_shows_where_to_watch_a_running_job_and_how_to_sign_in(tmp_path, monkeypatch, capsys) -> None:

    home = tmp_path / "home"
    monkeypatch.setenv("CBPO_ORCH_HOME", str(home))
    line = "Ray dashboard: http://127.0.0.1:8265 (token authentication: sign in with the token `ray get-auth-token` prints)"
    with Registry(f"sqlite:///{home / 'registry.db'}") as registry:
        live, dead = _job(registry), _job(registry, users=("c",))
        for job, ttl in ((live, 30), (dead, -1)):  # the second driver died without releasing its lease
            registry.set_job_state(job, "running")
            registry.take_lease(job, f"driver-of-{job}", ttl_s=ttl)
            registry.set_lease_notice(job, f"driver-of-{job}", line)
    code, out, _ = cli_in_process(monkeypatch, capsys, "status")
    assert code == 0 and f"{live}: {line}" in out.splitlines()
    assert not [shown for shown in out.splitlines() if shown.startswith(f"{dead}:")], "a dead driver's dashboard is not shown"
    code, out, _ = cli_in_process(monkeypatch, capsys, "status", live)
    assert code == 0 and out.splitlines()[-1] == f"{live}: {line}"


def test_taking_over_a_dead_local_driver_stops_what_its_local_ray_left(registry: Registry) -> None:
    import socket

    # A driver leads its process group; what it started (its local Ray) is in that group.
    leader = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "left = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
         "print(left.pid, flush=True); time.sleep(120)"],
        start_new_session=True, stdout=subprocess.PIPE, text=True,
    )
    left_behind = int(leader.stdout.readline())
    try:
        job = _job(registry)
        registry.take_lease(job, f"{socket.gethostname()}:{leader.pid}:00000000", ttl_s=30)
        leader.kill()
        leader.wait()
        assert alive(left_behind), "the dead driver's child must outlive it for this test"
        with JobLease(registry, job):
            deadline = time.monotonic() + 10
            while alive(left_behind) and time.monotonic() < deadline:
                time.sleep(0.05)
        assert not alive(left_behind), "resume must stop what the dead driver left running"
    finally:
        signal_group(leader.pid, 9)


def test_stat_fields_read_past_a_command_name_with_spaces_and_parentheses(tmp_path: Path) -> None:
    from cbpo_orch.orchestrator.processes import stat_fields

    odd = tmp_path / "a) b (c"
    odd.symlink_to(Path("/bin/sleep"))
    proc = subprocess.Popen([str(odd), "30"], start_new_session=True)
    try:
        fields = stat_fields(proc.pid)
        assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "a) b (c"
        assert fields[0] in "RS" and int(fields[1]) == os.getpid() and int(fields[2]) == int(fields[3]) == proc.pid
        assert alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert stat_fields(proc.pid) is None and not alive(proc.pid)
