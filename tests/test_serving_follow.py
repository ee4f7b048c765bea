"""A running server follows the registry (issue 32): a new user and a user's new version are
answered without a restart, with zero failed requests in a load loop running through the
switch and no answer from the replaced version once the switch is seen; a rollback goes back;
a forgotten user is answered 404; a changed key file is obeyed.

No training: the users' adapters are stock peft adapters with random weights (three of them,
each changing the tiny model's answers its own way), recorded in the registry as runs of a
job and of an update of it, as the driver records them. One local Ray and one server for the
module, its follower polling in a thread as ``serve``'s loop does.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from cbpo_orch.home import SAMPLE_DATA
from tests.helpers import CLEAN_ENV, OPERATOR_KEY, REPO, http_json, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic fields

ALICE_KEY = "alice-only-key-0123456789"
NEW_KEY = "new-key-for-u1-0123456789"
PROMPT = "The city council voted on Tuesday to turn the old rail yard into a park by the river."
POLL_S = 0.2


def _random_adapters(model_dir, lora, n: int) -> list[dict[str, bytes]]:
    """``n`` stock peft adapters (the files of a folder) whose B matrices are random, not zero."""
    import torch

    from cbpo_orch.training.models import load_model
    from cbpo_orch.training.multi_lora import attached_multi_lora

    files = []
    with attached_multi_lora(load_model(model_dir, "cpu").model, lora, n) as multi:
        for slot in range(n):
            multi.init_slot(slot, seed=slot)
            generator = torch.Generator().manual_seed(100 + slot)
            state = multi.slot_state(slot)
            multi.load_slot(slot, {key: torch.randn(value.shape, generator=generator) if "lora_B" in key else value for key, value in state.items()})
            files.append(multi.export_slot(slot))
    return files


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """A job of users u1 (adapter X), keep (Y) and gone (Z); ``record`` records a user's
    adapter as its run of a job, as the driver does."""
    from cbpo_orch.method.config import LoraSettings, TrainConfig
    from cbpo_orch.orchestrator.spec import JobSpec, Resources
    from cbpo_orch.orchestrator.workspace import Workspace
    from tests.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("follow")
    model = build_tiny_model(root / "tiny-untied", seed=2, tie_embeddings=False)
    lora = LoraSettings(r=8, alpha=8)
    train = TrainConfig(method="sft", lora=lora, max_new_tokens=8, max_prompt_tokens=128)
    users = ("u1", "keep", "gone")
    spec = JobSpec(task="lamp4", data=str(SAMPLE_DATA.resolve()), split="dev", model=str(model), methods=("sft",), users=users, train=train)
    space = Workspace.open(root / "home", writes=True)
    config = spec.to_config(Resources())
    job = space.registry.create_job("lamp4", ["sft"], list(users), config)
    x, y, z = _random_adapters(model, lora, 3)

    def record(job_id: str, user: str, files: dict[str, bytes]) -> None:
        info = space.artifacts.write_dir(f"adapters/{job_id}/{user}/sft/attempt-1", files)
        (run,) = [r for r in space.registry.runs(job_id) if r.user_id == user and r.source_run_id is None]
        space.registry.mark_running(run.run_id)
        space.registry.record_success(run.run_id, {"rouge1": 0.5, "rougeL": 0.5, "n_pos": 1, "n_aux": 0, "seconds": 1.0}, info.as_dict())

    for user, files in zip(users, (x, y, z)):
        record(job, user, files)
    return SimpleNamespace(home=root / "home", space=space, job=job, config=config, record=record, x=x, y=y, z=z)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(line, tmp_path_factory):
    """The application on a local Ray, and its follower polling every ``POLL_S`` in a thread."""
    import ray
    from ray import serve

    from cbpo_orch.serving.app import RunningIngress, ServeOptions, start
    from cbpo_orch.serving.catalog import load_catalog, served_users
    from cbpo_orch.serving.follow import Follower
    from cbpo_orch.serving.keys import load_api_keys

    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    keys_file.write_text(json.dumps({OPERATOR_KEY: "*", ALICE_KEY: ["u1"]}))
    catalog = load_catalog(line.space, line.job, "sft")
    keys = load_api_keys(keys_file)
    port = _free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
        patch.setenv("CBPO_ORCH_HOME", str(line.home))
        for name in CLEAN_ENV:
            patch.delenv(name, raising=False)
        assert not ray.is_initialized()
        stop, reported = threading.Event(), []
        try:
            # Two adapters a replica: a replaced version would still be held, and answered, if
            # the LRU were keyed by user.
            start(catalog, keys, ServeOptions(max_adapters_per_replica=2, max_batch_size=8, batch_wait_s=0.01), "127.0.0.1", port, None)
            follower = Follower(lambda: served_users(line.space.registry, line.job, "sft"), RunningIngress(catalog), catalog.users, keys_file, keys)
            thread = threading.Thread(target=follower.run, args=(POLL_S, stop, reported.append), daemon=True)
            thread.start()
            yield SimpleNamespace(url=f"http://127.0.0.1:{port}", base=catalog.base_name, keys_file=keys_file, reported=reported)
            stop.set()
            thread.join(timeout=30)
        finally:
            serve.shutdown()
            ray.shutdown()


def _answer(server, model: str, key: str = OPERATOR_KEY) -> tuple[int, str | None]:
    status, body = http_json(f"{server.url}/v1/completions", json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 8}).encode(), key)
    return status, body["choices"][0]["text"] if status == 200 else body["error"]["message"]


def _streamed(server, model: str) -> tuple[int, str]:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=OPERATOR_KEY, max_retries=0, timeout=120)
    try:
        return 200, "".join(chunk.choices[0].text for chunk in client.completions.create(model=model, prompt=PROMPT, max_tokens=8, stream=True))
    except openai.APIStatusError as error:
        return error.status_code, str(error)


def _listed(server, key: str = OPERATOR_KEY) -> dict[str, int | None]:
    status, body = http_json(f"{server.url}/v1/models", None, key)
    assert status == 200, body
    return {model["id"]: model.get("version") for model in body["data"]}


def test_a_new_user_and_a_new_version_are_served_without_a_restart_and_no_request_fails_through_the_switch(server, line):
    from cbpo_orch.storage.lineage import PlannedRun

    registry = line.space.registry
    answer_x, answer_y = _answer(server, "u1"), _answer(server, "keep")
    base = _answer(server, server.base)
    assert answer_x[0] == answer_y[0] == base[0] == 200
    assert len({answer_x[1], answer_y[1], base[1]}) == 3  # each adapter answers its own way
    assert _listed(server) == {server.base: None, "gone": 1, "keep": 1, "u1": 1}

    # Requests for u1, one after another in each of 4 loops (one streamed), through the switch.
    stop, seen = threading.Event(), [[] for _ in range(4)]

    def loop(i: int) -> None:
        while not stop.is_set() and len(seen[i]) < 2000:
            seen[i].append(_streamed(server, "u1") if i == 0 else _answer(server, "u1"))

    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(loop, i) for i in range(4)]
        try:
            wait_until(lambda: all(len(s) >= 2 for s in seen), 60, "requests before the switch")
            # The update: u1's new version has Y's weights (a folder of its own); "new" arrives with X's.
            basis = registry.update_basis(line.job)
            update = registry.create_update(line.job, line.config, [
                PlannedRun("u1", "sft"), PlannedRun("new", "sft"),
                PlannedRun("keep", "sft", basis[("keep", "sft")].carry_run_id), PlannedRun("gone", "sft", basis[("gone", "sft")].carry_run_id),
            ], "always")
            line.record(update, "new", line.x)
            line.record(update, "u1", line.y)
            wait_until(lambda: _answer(server, "u1") == answer_y, 30, "u1's new version answering")
            switched = [len(s) for s in seen]
            wait_until(lambda: all(len(s) >= n + 2 for s, n in zip(seen, switched)), 60, "requests after the switch")
        finally:
            stop.set()
        for future in running:
            future.result()
    for answers in seen:
        assert {status for status, _ in answers} == {200}, [a for a in answers if a[0] != 200][:3]
        texts = [text for _, text in answers]
        assert set(texts) <= {answer_x[1], answer_y[1]} and texts[-1] == answer_y[1]
        first_new = texts.index(answer_y[1])  # once a loop got the new version, never the old one again
        assert texts[:first_new] == [answer_x[1]] * first_new and set(texts[first_new:]) == {answer_y[1]}
    assert _answer(server, "new") == answer_x
    assert _listed(server) == {server.base: None, "gone": 1, "keep": 1, "new": 1, "u1": 2}
    # the two records may land in one poll or in two: each change is said once either way
    assert [sum(change in line for line in server.reported) for change in ("now serving new", "u1 v1 → v2")] == [1, 1]

    registry.rollback(update, "u1")
    wait_until(lambda: _answer(server, "u1") == answer_x, 30, "u1's rolled-back version answering")
    assert _listed(server)["u1"] == 1


def test_a_forgotten_user_is_answered_404_after_one_poll(server, line):
    from cbpo_orch.orchestrator.forget import forget_user

    assert _answer(server, "gone")[0] == 200
    forget_user(line.space, "gone")
    wait_until(lambda: _answer(server, "gone")[0] == 404, 10 * POLL_S + 10, "a 404 for the forgotten user")
    assert "no user 'gone'" in _answer(server, "gone")[1] and "gone" not in _listed(server)
    assert _answer(server, "keep")[0] == 200


def test_a_changed_key_file_is_obeyed_without_a_restart(server):
    assert _answer(server, "u1", ALICE_KEY)[0] == 200 and _answer(server, "u1", NEW_KEY)[0] == 401
    staged = server.keys_file.with_suffix(".new")
    staged.write_text(json.dumps({OPERATOR_KEY: "*", NEW_KEY: ["u1"]}))  # ALICE_KEY revoked, NEW_KEY given u1
    staged.replace(server.keys_file)
    wait_until(lambda: _answer(server, "u1", NEW_KEY)[0] == 200, 30, "the new key being accepted")
    assert _answer(server, "u1", ALICE_KEY)[0] == 401 and _answer(server, "keep", NEW_KEY)[0] == 403
    assert list(_listed(server, NEW_KEY)) == [server.base, "u1"]
