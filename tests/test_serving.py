"""Serving a job (issue 13): export for vLLM / Ray Serve LLM, cross-user batched generation,
and the Ray Serve application talked to with the official ``openai`` client and raw HTTP.

One small real job per module (the tiny random-weight model, untied so that its greedy
outputs are words rather than blank lines; a task adapter; adapters trained without
selection at a high rate so that each user's adapter changes its outputs; one user whose
run fails), over a local Ray that this module starts and shuts down, and one server on it.
"""

from __future__ import annotations

import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from cbpo_orch.home import SAMPLE_DATA
from cbpo_orch.storage.artifacts import directory_sha256
from tests import faulty_worker
from tests.helpers import CLEAN_ENV, OPERATOR_KEY, REPO, cli_in_process, http_json

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own pydantic fields

ALICE_KEY = "alice-only-key-0123456789"


def _one_error_line(code: int, err: str, *hints: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(hint in lines[0] for hint in hints), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def job(tmp_path_factory, history_cache, dev_users):  # noqa: F811
    """A finished job: 3 users of the sample, cbpo with a task adapter; the middle user's run failed."""
    import shutil

    import ray

    from cbpo_orch.method.config import TrainConfig
    from cbpo_orch.orchestrator import cluster
    from cbpo_orch.orchestrator.driver import run_job
    from cbpo_orch.orchestrator.spec import JobSpec, Resources
    from cbpo_orch.orchestrator.workspace import Workspace
    from tests.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("serving")
    home = root / "home"
    shutil.copytree(history_cache, home / "cache")
    model = build_tiny_model(root / "tiny-untied", seed=2, tie_embeddings=False)
    users = dev_users[:3]
    assert users[1] == faulty_worker.FAILING_USER
    train = TrainConfig(method="cbpo", max_profile=8, epochs=2, lr=3e-2, selection=False, max_new_tokens=8, max_prompt_tokens=128)
    spec = JobSpec(task="lamp4", data=str(SAMPLE_DATA.resolve()), split="dev", model=str(model), methods=("cbpo",), users=tuple(users), train=train, task_adapter="auto", task_adapter_epochs=1)
    resources = Resources(workers=1, max_retries=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
        patch.setenv("CBPO_ORCH_HOME", str(home))
        for name in CLEAN_ENV:
            patch.delenv(name, raising=False)
        assert not ray.is_initialized()
        cluster.connect(None)
        try:
            space = Workspace.open(home, writes=True)
            job_id = space.registry.create_job("lamp4", ["cbpo"], users, spec.to_config(resources))
            assert run_job(space, job_id, resources, worker_fn=faulty_worker.bad_record_for_one_user) == "failed"
            rows = {r["user_id"]: r for r in space.registry.results(job_id)}
            served = sorted([users[0], users[2]])  # the server lists users by id
            assert sorted(rows) == sorted(served)
            predictions = {u: [json.loads(line) for line in (Path(rows[u]["adapter_path"]) / "predictions.jsonl").read_text().splitlines()] for u in served}
            yield SimpleNamespace(id=job_id, home=home, space=space, model=model, served=served, failed=users[1], rows=rows, predictions=predictions)
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def catalog(job):
    from cbpo_orch.serving.catalog import load_catalog

    return load_catalog(job.space, job.id, "cbpo")


@pytest.fixture(scope="module")
def dataset():
    from cbpo_orch.data.dataset import load_split
    from cbpo_orch.data.tasks import load_task

    return load_split(SAMPLE_DATA, "dev", load_task("lamp4"))


# ───────────────────────────── export ─────────────────────────────


def test_export_writes_each_servable_adapter_the_merged_base_and_a_manifest(job, catalog, dataset, tmp_path, monkeypatch, capsys):
    import torch
    from peft import PeftModel

    from cbpo_orch.training.generation import generate
    from cbpo_orch.training.models import load_model

    out = tmp_path / "export"
    code, stdout, err = cli_in_process(monkeypatch, capsys, "export", "--job", job.id, "--method", "cbpo", "--out", str(out), "--home", str(job.home))
    assert code == 0, err
    assert stdout.strip() == str(out) and f"not exported: {job.failed}" in err

    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(["base", "manifest.json", *job.served])
    assert manifest["job_id"] == job.id and manifest["method"] == "cbpo"
    assert manifest["base_model"] == {"name": job.model.name, "source": str(job.model), "path": "base", "task_adapter_merged": catalog.task_adapter}
    assert [u["user_id"] for u in manifest["users"]] == job.served
    assert faulty_worker.injected_error(job.failed) in manifest["not_exported"][job.failed]
    assert manifest["max_lora_rank"] == 8
    for entry in manifest["users"]:
        folder, registered = out / entry["path"], Path(job.rows[entry["user_id"]]["adapter_path"])
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert (folder / name).read_bytes() == (registered / name).read_bytes()
        assert entry["sha256"] == directory_sha256(folder)
        assert (entry["rank"], entry["alpha"], entry["target_modules"]) == (8, 8, ["q_proj", "v_proj"])
    assert len({e["sha256"] for e in manifest["users"]}) == 2  # two trained, different adapters

    # What a serving engine does with the export: the base folder plus a user's folder,
    # stock transformers + peft, answers the user's queries as the job recorded them.
    budgets = catalog.budgets
    for user in job.served:
        base = load_model(out / "base", "cpu")
        model = PeftModel.from_pretrained(base.model, str(out / user)).eval()
        prompts = [catalog.task.prompt(q) for q in dataset.user(user).queries]
        answers = generate(model, base.tokenizer, prompts, budgets, 16, torch.device("cpu"), decoding=catalog.task.decoding)
        assert [a.text for a in answers] == [p["prediction"] for p in job.predictions[user]]


def _registered_adapter_job(job, tiny_model_dir, edit=lambda config: config, r: int = 4) -> str:
    """A job in the same registry whose one user's adapter (a real export of a LoRA of rank
    ``r`` on the tiny model, its config changed by ``edit``) is registered as succeeded."""
    from cbpo_orch.method.config import LoraSettings, TrainConfig
    from cbpo_orch.orchestrator.spec import JobSpec, Resources
    from cbpo_orch.training.models import load_model
    from cbpo_orch.training.multi_lora import attached_multi_lora

    lora = LoraSettings(r=r, alpha=r)
    user = "ad7c7cfda48"
    spec = JobSpec(task="lamp4", data=str(SAMPLE_DATA.resolve()), split="dev", model=str(tiny_model_dir), methods=("sft",), users=(user,), train=TrainConfig(method="sft", lora=lora))
    registry, store = job.space.registry, job.space.artifacts
    job_id = registry.create_job("lamp4", ["sft"], [user], spec.to_config(Resources()))
    with attached_multi_lora(load_model(tiny_model_dir, "cpu").model, lora, 1) as multi:
        multi.init_slot(0, seed=0)
        files = multi.export_slot(0)
    files["adapter_config.json"] = json.dumps(edit(json.loads(files["adapter_config.json"]))).encode()
    info = store.write_dir(f"adapters/{job_id}/{user}/sft/attempt-1", files)
    [run] = registry.runs(job_id)
    registry.mark_running(run.run_id)
    registry.record_success(run.run_id, {"rouge1": 0.0, "rougeL": 0.0, "n_pos": 1, "n_aux": 0, "seconds": 1.0}, info.as_dict())
    return job_id


UNSERVABLE = {
    "rank 4": ({"r": 4}, "rank 4 is not one vLLM serves"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head']"),
    "embedding target": ({"target_modules": ["q_proj", "embed_tokens"]}, "target modules ['embed_tokens']"),
}


@pytest.mark.parametrize("case", list(UNSERVABLE))
def test_export_refuses_an_adapter_vllm_cannot_serve_and_writes_nothing(case, job, tiny_model_dir, tmp_path, monkeypatch, capsys):
    changes, hint = UNSERVABLE[case]
    bad_job = _registered_adapter_job(job, tiny_model_dir, lambda config: {**config, **changes}, r=changes.get("r", 8))
    out = tmp_path / "export"
    code, stdout, err = cli_in_process(monkeypatch, capsys, "export", "--job", bad_job, "--method", "sft", "--out", str(out), "--home", str(job.home))
    _one_error_line(code, err, "cannot be served by vLLM", hint, "ad7c7cfda48")
    assert stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["--job", "NOSUCHJOB"], "NOSUCHJOB"),
        (["--method", "sft"], "did not run method 'sft'"),
    ],
)
def test_export_of_what_does_not_exist_is_one_error_line(argv, hint, job, tmp_path, monkeypatch, capsys):
    args = {"--job": job.id, "--method": "cbpo", **dict(zip(argv[::2], argv[1::2]))}
    out = tmp_path / "export"
    code, _, err = cli_in_process(monkeypatch, capsys, "export", *[x for kv in args.items() for x in kv], "--out", str(out), "--home", str(job.home))
    _one_error_line(code, err, hint)
    assert not out.exists()


# ───────────────────────────── batched generation ─────────────────────────────


def test_batched_generation_equals_one_at_a_time_and_the_recorded_predictions(job, catalog, dataset):
    from cbpo_orch.serving.generator import BatchedGenerator, Row, load_user_adapter
    from cbpo_orch.training.encoding import prompt_ids
    from cbpo_orch.training.task_adapter import starting_model

    loaded = starting_model(catalog.model_path, catalog.task_adapter, "cpu")
    adapters = {u: load_user_adapter(u, catalog.adapter(u).adapter_path, catalog.lora, "cpu") for u in job.served}
    queries = [(u, q) for u in (*job.served, job.failed) for q in dataset.user(u).queries]
    rows, keys = [], []
    for owner, query in queries:  # every query with every adapter and with none
        ids = prompt_ids(loaded.tokenizer, catalog.task.prompt(query), catalog.budgets.prompt_tokens)
        for user in (*job.served, None):
            rows.append(Row(ids, catalog.budgets.new_tokens, adapters.get(user)))
            keys.append((owner, query.id, user))
    generator = BatchedGenerator(loaded, catalog.lora, max_rows=len(rows), decoding=catalog.task.decoding)

    together = [c.text for c in generator.generate(rows)]
    alone = [generator.generate([row])[0].text for row in rows]
    assert together == alone
    answers = dict(zip(keys, together))
    for user in job.served:
        for prediction in job.predictions[user]:
            assert answers[(user, prediction["id"], user)] == prediction["prediction"]
    # The adapters matter: each user's answers differ from the base's and from the other user's.
    for user in job.served:
        mine = [v for k, v in answers.items() if k[2] == user]
        assert mine != [v for k, v in answers.items() if k[2] is None]
    assert [v for k, v in answers.items() if k[2] == job.served[0]] != [v for k, v in answers.items() if k[2] == job.served[1]]
    assert all(answers.values())  # words, not blank lines

    # Rows end on their own max_tokens; the streamed chunks add up to each row's text.
    steps = []
    short = [Row(rows[0].prompt_ids, 2, rows[0].adapter), rows[1]]
    done = generator.generate(short, steps.append)
    assert done[0].completion_tokens <= 2 and done[0].finish_reason in ("stop", "length")
    assert done[1].text == together[1]
    for i, completion in enumerate(done):
        assert "".join(step[i].text for step in steps if step[i] is not None) == completion.text
    # A sampled row draws its own tokens; the greedy rows beside it keep their answers.
    sampled = generator.generate([Row(rows[0].prompt_ids, 8, rows[0].adapter, temperature=1.5, top_p=0.9), *rows[1:4]])
    assert [c.text for c in sampled[1:]] == together[1:4] and sampled[0].completion_tokens >= 1


# ───────────────────────────── the server ─────────────────────────────


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(job, catalog, tmp_path_factory):
    """The application on this module's Ray, on loopback; keys: an operator and one for the first user."""
    from ray import serve

    from cbpo_orch.serving.app import ServeOptions, start
    from cbpo_orch.serving.keys import load_api_keys

    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    keys_file.write_text(json.dumps({OPERATOR_KEY: "*", ALICE_KEY: [job.served[0]]}))
    port = _free_port()
    # One adapter per replica: alternating users evicts and reloads them.
    start(catalog, load_api_keys(keys_file), ServeOptions(max_adapters_per_replica=1, max_batch_size=8, batch_wait_s=0.05), "127.0.0.1", port, None)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def _post(url: str, body, key: str | None = OPERATOR_KEY, raw: bytes | None = None) -> tuple[int, dict]:
    return http_json(f"{url}/v1/completions", raw if raw is not None else json.dumps(body).encode(), key)


def _models(url: str, key: str | None) -> tuple[int, dict]:
    return http_json(f"{url}/v1/models", None, key)


def test_the_openai_client_gets_each_users_recorded_answers_streamed_or_not(server, job, catalog, dataset):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=OPERATOR_KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [catalog.base_name, *job.served]

    for user in [*job.served, *job.served]:  # twice each, alternating: through LRU eviction
        for query, recorded in zip(dataset.user(user).queries, job.predictions[user]):
            answer = client.completions.create(model=user, prompt=query.input, max_tokens=8)
            assert answer.object == "text_completion" and answer.model == user
            assert answer.choices[0].text == recorded["prediction"]
            assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens <= 8
            chunks = list(client.completions.create(model=user, prompt=query.input, max_tokens=8, stream=True))
            assert "".join(c.choices[0].text for c in chunks) == recorded["prediction"]
            assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason

    query = dataset.user(job.served[0]).queries[0]
    base = client.completions.create(model=catalog.base_name, prompt=query.input, max_tokens=8).choices[0].text
    assert base and base != job.predictions[job.served[0]][0]["prediction"]
    streamed = client.completions.create(model=catalog.base_name, prompt=query.input, max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == base


def test_concurrent_requests_of_different_users_are_batched_together_each_with_its_own_answer(server, job, catalog, dataset):
    from ray import serve

    from cbpo_orch.serving.app import app_name

    stats = serve.get_deployment_handle("AdapterServer", app_name=app_name(catalog)).stats
    before = stats.remote().result()
    asks = [(user, query, recorded["prediction"]) for user in job.served for query, recorded in zip(dataset.user(user).queries, job.predictions[user])] * 3
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda ask: _post(server, {"model": ask[0], "prompt": ask[1].input, "max_tokens": 8}), asks))
    assert [status for status, _ in answers] == [200] * len(asks)
    assert [body["choices"][0]["text"] for _, body in answers] == [want for _, _, want in asks]
    after = stats.remote().result()
    assert after["rows"] - before["rows"] == len(asks)
    assert after["batches"] - before["batches"] < len(asks) and after["most_users"] >= 2  # one generate held several users


def test_bad_requests_get_json_errors_and_the_server_keeps_answering(server, job, dataset):
    prompt = dataset.user(job.served[0]).queries[0].input
    ok = {"model": job.served[0], "prompt": prompt, "max_tokens": 8}
    cases = [
        (_post(server, None, raw=b"{not json"), 400, "not JSON"),
        (_post(server, {"prompt": prompt}), 400, "`model` is required"),
        (_post(server, {**ok, "prompt": ""}), 400, "`prompt`"),
        (_post(server, {**ok, "max_tokens": 0}), 400, "from 1 to 8"),
        (_post(server, {**ok, "max_tokens": 9}), 400, "from 1 to 8"),
        (_post(server, {**ok, "max_tokens": "8"}), 400, "`max_tokens`"),
        (_post(server, {**ok, "temperature": 5}), 400, "`temperature`"),
        (_post(server, {**ok, "n": 2}), 400, "`n` must be 1"),
        (_post(server, {**ok, "prompt": "word " * 400}), 400, "exceeds the prompt budget of 128"),
        (_post(server, {**ok, "model": "no-such-user"}), 404, "no user 'no-such-user'"),
        (_post(server, {**ok, "model": job.failed}), 409, faulty_worker.injected_error(job.failed)),
    ]
    for (status, body), expected, hint in cases:
        assert status == expected, body
        assert hint in body["error"]["message"] and body["error"]["code"] == expected
    status, body = _post(server, ok)
    assert status == 200 and body["choices"][0]["text"] == job.predictions[job.served[0]][0]["prediction"]


def test_keys_decide_who_may_use_which_adapter_and_are_never_logged(server, job, catalog, dataset):
    import ray

    prompt = dataset.user(job.served[0]).queries[0].input
    alice, other = job.served
    for key in (None, "not-a-key-at-all-000000"):
        status, body = _post(server, {"model": alice, "prompt": prompt}, key=key)
        assert status == 401 and "Bearer" in body["error"]["message"]
        assert _models(server, key)[0] == 401
    status, body = _post(server, {"model": other, "prompt": prompt}, key=ALICE_KEY)
    assert status == 403 and other in body["error"]["message"]
    assert _post(server, {"model": "no-such-user", "prompt": prompt}, key=ALICE_KEY)[0] == 403  # no probing for users
    for model in (alice, catalog.base_name):
        assert _post(server, {"model": model, "prompt": prompt, "max_tokens": 2}, key=ALICE_KEY)[0] == 200
    status, listed = _models(server, ALICE_KEY)
    assert status == 200 and [m["id"] for m in listed["data"]] == [catalog.base_name, alice]

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in (p for p in logs.rglob("*") if p.is_file()):
        text = path.read_bytes()
        assert OPERATOR_KEY.encode() not in text and ALICE_KEY.encode() not in text, f"a key is in {path}"


# ───────────────────────────── the serve command's own checks ─────────────────────────────


def test_serve_refuses_a_non_loopback_host_without_keys_and_a_bad_key_file(job, tmp_path, monkeypatch, capsys):
    code, out, err = cli_in_process(monkeypatch, capsys, "serve", "--job", job.id, "--host", "0.0.0.0", "--home", str(job.home))
    _one_error_line(code, err, "refusing to serve on 0.0.0.0 without --api-keys")
    bad = tmp_path / "keys.json"
    bad.write_text(json.dumps({OPERATOR_KEY: "everyone"}))
    code, out, err = cli_in_process(monkeypatch, capsys, "serve", "--job", job.id, "--host", "0.0.0.0", "--api-keys", str(bad), "--home", str(job.home))
    assert OPERATOR_KEY not in _one_error_line(code, err, "key #1")
    code, out, err = cli_in_process(monkeypatch, capsys, "serve", "--job", job.id, "--method", "base", "--home", str(job.home))
    _one_error_line(code, err, "did not run method 'base'")
    code, out, err = cli_in_process(monkeypatch, capsys, "serve", "--job", job.id, "--follow-every", "0", "--home", str(job.home))
    _one_error_line(code, err, "--follow-every must be > 0")
