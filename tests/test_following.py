"""A server following the registry, without Ray: what a new reading changes
(``catalog.changes``), what is current in a job's line (``Registry.served``, on SQLite and
PostgreSQL), and the follower that hands a server's ingress each new reading and key file
(``serving/follow.py``), here with an ingress that records what it is handed."""

from __future__ import annotations

import json
import threading

import pytest

from cbpo_orch.serving.catalog import Changes, UserAdapterEntry, changes, served_users
from cbpo_orch.serving.follow import Follower
from cbpo_orch.serving.keys import load_api_keys
from cbpo_orch.storage.lineage import PlannedRun
from cbpo_orch.storage.registry import Registry

METRICS = {"rouge1": 0.5, "rougeL": 0.5, "n_pos": 4, "n_aux": 0, "seconds": 1.0}
OPERATOR = "operator-key-0123456789"
ALICE = "alice-key-0123456789abc"


def _version(user: str, number: int, digest: str = "a") -> UserAdapterEntry:
    return UserAdapterEntry(user, "succeeded", f"/adapters/{user}/{number}", digest * 64, None, number)


def _waiting(user: str, state: str = "failed") -> UserAdapterEntry:
    return UserAdapterEntry(user, state, error="it broke")


# ───────────────────────────── what a reading changes ─────────────────────────────


def test_changes_name_new_replaced_and_gone_users_and_ignore_users_served_in_neither():
    before = {"u1": _version("u1", 1), "u2": _version("u2", 1, "b"), "u3": _waiting("u3"), "u5": _waiting("u5")}
    after = {"u1": _version("u1", 2, "c"), "u3": _version("u3", 1, "d"), "u4": _waiting("u4", "pending"), "u5": _waiting("u5", "pending")}
    found = changes(before, after)
    assert found == Changes(added=("u3",), replaced=(("u1", 1, 2),), removed=("u2",))
    assert found.summary() == "now serving u3; u1 v1 → v2; no longer serving u2"
    assert not changes(before, dict(before)) and changes(before, dict(before)).summary() == ""


def test_a_rollback_and_a_user_trained_anew_after_forget_are_replacements():
    assert changes({"u1": _version("u1", 2, "c")}, {"u1": _version("u1", 1)}).replaced == (("u1", 2, 1),)
    # forgotten, then trained again by a later update: its numbers start again at 1, its bytes differ
    again = changes({"u1": _version("u1", 1, "a")}, {"u1": _version("u1", 1, "e")})
    assert again.replaced == (("u1", 1, 1),)
    assert _version("u1", 1, "a").model_id != _version("u1", 1, "e").model_id != _version("u1", 2, "a").model_id


# ───────────────────────────── what is current in a line ─────────────────────────────


def _succeed(registry: Registry, job: str, user: str, score: float = 0.5, method: str = "sft") -> None:
    (run,) = [r for r in registry.runs(job) if (r.user_id, r.method) == (user, method) and r.source_run_id is None]
    registry.mark_running(run.run_id)
    registry.record_success(run.run_id, {**METRICS, "rouge1": score, "rougeL": score}, {"path": f"/a/{job}/{user}/{method}", "sha256": user[-1] * 64, "bytes": 1})


def _fail(registry: Registry, job: str, user: str) -> None:
    (run,) = [r for r in registry.runs(job) if (r.user_id, r.method) == (user, "sft")]
    registry.mark_running(run.run_id)
    registry.record_failure(run.run_id, "out of memory", final=True)


def _update(registry: Registry, parent: str, trained: list[str], carried: list[str], promote: str = "check") -> str:
    basis = registry.update_basis(parent)
    planned = [PlannedRun(u, "sft") for u in trained] + [PlannedRun(u, "sft", basis[(u, "sft")].carry_run_id) for u in carried]
    return registry.create_update(parent, {}, planned, promote)


def _served(registry: Registry, job: str) -> dict[str, tuple]:
    return {user: (e.state, e.version, e.adapter_path, e.error) for user, e in served_users(registry, job, "sft").items()}


def test_served_is_the_lines_current_versions_and_each_other_users_latest_run(db_url):
    with Registry(db_url) as registry:
        job = registry.create_job("lamp4", ["sft", "cbpo"], ["u2", "u1", "u3"], {})
        _succeed(registry, job, "u1")
        _succeed(registry, job, "u2", method="cbpo")  # another method's adapter: not this server's
        _fail(registry, job, "u2")
        assert _served(registry, job) == {
            "u1": ("succeeded", 1, f"/a/{job}/u1/sft", None),
            "u2": ("failed", None, None, "out of memory"),
            "u3": ("pending", None, None, None),
        }
        assert list(_served(registry, job)) == ["u1", "u2", "u3"]

        update = _update(registry, job, ["u1", "u2", "u4"], [])
        _succeed(registry, update, "u1", score=0.1)  # worse: rejected, v1 stays current
        _succeed(registry, update, "u4")  # a new user
        for either in (job, update):  # any job of the line serves the same
            assert _served(registry, either) == {
                "u1": ("succeeded", 1, f"/a/{job}/u1/sft", None),
                "u2": ("pending", None, None, None),  # its latest run: the update's, not yet trained
                "u3": ("pending", None, None, None),
                "u4": ("succeeded", 1, f"/a/{update}/u4/sft", None),
            }
        later = _update(registry, update, ["u1"], ["u4"], promote="always")
        _succeed(registry, later, "u1", score=0.1)
        assert _served(registry, job)["u1"] == ("succeeded", 3, f"/a/{later}/u1/sft", None)
        registry.rollback(later, "u1")
        assert _served(registry, job)["u1"] == ("succeeded", 1, f"/a/{job}/u1/sft", None)
        registry.forget("u1")
        assert "u1" not in _served(registry, later)
        other = registry.create_job("lamp4", ["sft"], ["u1"], {})  # the user again, in a line of its own
        _succeed(registry, other, "u1")
        assert "u1" not in _served(registry, job) and _served(registry, other)["u1"][1] == 1


# ───────────────────────────── the follower ─────────────────────────────


class RecordingIngress:
    """An ingress that keeps what it is handed; ``restart()`` loses it, as a restarted replica does."""

    def __init__(self) -> None:
        self.stamp, self.handed = 0, []

    def following(self) -> int:
        return self.stamp

    def follow(self, users, keys, stamp) -> None:
        self.handed.append((users, keys))
        self.stamp = stamp

    def restart(self) -> None:
        self.stamp = 0


@pytest.fixture
def line(sqlite_url):
    with Registry(sqlite_url) as registry:
        job = registry.create_job("lamp4", ["sft"], ["u1", "u2"], {})
        _succeed(registry, job, "u1")
        _succeed(registry, job, "u2")
        yield registry, job


def _follower(registry: Registry, job: str, keys_path=None) -> tuple[Follower, RecordingIngress]:
    ingress = RecordingIngress()
    keys = None if keys_path is None else load_api_keys(keys_path)
    return Follower(lambda: served_users(registry, job, "sft"), ingress, served_users(registry, job, "sft"), keys_path, keys), ingress


def test_the_follower_hands_the_ingress_each_change_once_and_all_again_after_a_restart(line):
    registry, job = line
    follower, ingress = _follower(registry, job)
    assert follower.poll() == [] and ingress.handed == []  # nothing changed: nothing handed

    update = _update(registry, job, ["u1", "u3"], ["u2"], promote="always")
    _succeed(registry, update, "u1")
    _succeed(registry, update, "u3")
    assert follower.poll() == ["now serving u3; u1 v1 → v2"]
    [(users, keys)] = ingress.handed
    assert (users["u1"].version, users["u1"].adapter_path, users["u3"].version, keys) == (2, f"/a/{update}/u1/sft", 1, None)
    assert follower.poll() == [] and len(ingress.handed) == 1

    ingress.restart()  # back to what `serve` started with: the next poll hands it all again
    assert follower.poll() == [] and len(ingress.handed) == 2 and ingress.handed[1][0] == users

    registry.forget("u2")  # the next poll takes the user away
    assert follower.poll() == ["no longer serving u2"]
    assert sorted(ingress.handed[-1][0]) == ["u1", "u3"]


def test_the_follower_reloads_the_key_file_and_keeps_the_old_keys_while_it_is_broken(line, tmp_path):
    registry, job = line
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({OPERATOR: "*"}))
    follower, ingress = _follower(registry, job, path)
    assert follower.poll() == []

    path.write_text(json.dumps({OPERATOR: "*", ALICE: ["u1"]}))
    assert follower.poll() == [f"API keys reloaded from {path}: 2 keys"]
    assert ingress.handed[-1][1].access(f"Bearer {ALICE}", "u1").allowed

    path.write_text(json.dumps({ALICE: []}))  # broken: said once, the keys held stay
    [problem] = follower.poll()
    assert "key #1" in problem and "still using the keys read before" in problem and ALICE not in problem
    assert follower.poll() == [] and len(ingress.handed) == 1

    path.write_text(json.dumps({OPERATOR: "*"}))  # ALICE revoked
    assert follower.poll() == [f"API keys reloaded from {path}: 1 keys"]
    assert ingress.handed[-1][1].access(f"Bearer {ALICE}", "u1").status == 401


def test_run_says_once_that_a_poll_failed_and_goes_on_polling(line):
    registry, job = line
    stop, calls, reported = threading.Event(), [], []

    def read_users():
        calls.append(1)
        if len(calls) > 50:
            stop.set()  # a bound: the test fails below rather than hangs
        if len(calls) <= 3:
            raise RuntimeError("the database is away\nsecond line")
        return {**served_users(registry, job, "sft"), "u9": _version("u9", 1)}

    def report(line: str) -> None:
        reported.append(line)
        if line.startswith("now serving"):
            stop.set()

    follower = Follower(read_users, RecordingIngress(), served_users(registry, job, "sft"), None, None)
    follower.run(0.001, stop, report)
    assert reported == ["following the registry failed (RuntimeError: the database is away); still serving what was read last", "now serving u9"]
    assert len(calls) == 4
