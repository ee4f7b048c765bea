"""The driver without Ray, for the lifecycle tests: ``run_job`` as the CLI runs it, with its
shards and its fan-out run one after the other in this process, and histories embedded by a
hash of each text (unit vectors that claim nothing about meaning). Plus versions of the
shipped HuffPost sample's dev split as data sets of a few users each."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from cbpo_orch.home import SAMPLE_DATA

EMBED_DIM = 16


def hashed_embedding(texts: list[str], embedder, threads: int = 1) -> np.ndarray:
    """One unit vector per text, drawn from a generator seeded by the text's digest."""
    rows = [np.random.default_rng(int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")).normal(size=EMBED_DIM) for t in texts]
    vectors = np.asarray(rows, dtype=np.float32).reshape(len(texts), EMBED_DIM)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def map_here(fn, items, *args, min_shard, gpus=False, rounds=1, cost=None, on_done=lambda done, total: None):
    """``scheduler.map_shards`` as one shard in this process."""
    result = [fn(items, *args, threads=1)]
    on_done(1, 1)
    return result


def fan_out_here(work, setup, slots, start, finish, tick=lambda: None, users_per_step=1):
    """``scheduler.fan_out`` one unit at a time in this process, from one loaded context; a
    run's permanent error fails it as the scheduler fails it (any other error fails the test)."""
    from cbpo_orch.data.dataset import load_split
    from cbpo_orch.data.tasks import load_task
    from cbpo_orch.orchestrator.cluster import first_line
    from cbpo_orch.orchestrator.packing import Failure
    from cbpo_orch.orchestrator.scheduler import PERMANENT_ERRORS
    from cbpo_orch.workers.user_context import load_user_context

    task = load_task(setup.task)
    dataset = load_split(setup.data, setup.split, task)
    context = load_user_context(task, dataset, setup.history, setup.model, setup.task_adapter, "cpu", setup.reference, setup.gammas, setup.summaries, setup.incumbents)
    for unit in work:
        if start(unit):
            try:
                [outcome] = setup.worker_fn(context, [unit.user_id], unit.config)
            except PERMANENT_ERRORS as error:
                outcome = Failure(first_line(error), permanent=True)
            finish(unit, outcome)


def without_ray(monkeypatch) -> None:
    """Make the driver run every stage in this process (see the module's docstring)."""
    from cbpo_orch.orchestrator import cluster, driver, scheduler

    monkeypatch.setattr(cluster, "connect", lambda address: None)
    monkeypatch.setattr(scheduler, "worker_fit", lambda setup: cluster.Fit(1, setup.cpus_per_user, setup.gpus_per_user, 0, ("CPU",)))
    monkeypatch.setattr(scheduler, "map_shards", map_here)
    monkeypatch.setattr(scheduler, "fan_out", fan_out_here)
    monkeypatch.setattr(driver, "EMBED_SHARD", hashed_embedding)


def sample_users() -> list[str]:
    """The dev users of the shipped sample, in file order."""
    questions = json.loads((SAMPLE_DATA / "dev_questions.json").read_text())
    return list(dict.fromkeys(q["user_id"] for q in questions))


def write_data(out: Path, users: list[str], without_newest: dict[str, int] | None = None) -> Path:
    """A LaMP dev split of the sample's ``users``, each of ``without_newest`` missing its
    newest N profile items (by date)."""
    questions = json.loads((SAMPLE_DATA / "dev_questions.json").read_text())
    golds = json.loads((SAMPLE_DATA / "dev_outputs.json").read_text())
    kept = []
    for question in questions:
        if question["user_id"] not in users:
            continue
        drop = (without_newest or {}).get(question["user_id"], 0)
        profile = sorted(question["profile"], key=lambda item: item["date"])
        kept.append({**question, "profile": profile[: len(profile) - drop]})
    ids = {q["id"] for q in kept}
    out.mkdir(parents=True)
    (out / "dev_questions.json").write_text(json.dumps(kept))
    (out / "dev_outputs.json").write_text(json.dumps({**golds, "golds": [g for g in golds["golds"] if g["id"] in ids]}))
    return out


TRAIN = dict(epochs=1, max_profile=4, max_new_tokens=4, max_prompt_tokens=128)
"""The smallest training that runs every stage: one step a user."""


def finished_job(root: Path, model: Path, methods: tuple[str, ...] = ("sft",), db: str | None = None, **train):
    """A home under ``root`` (its registry at ``db``, by default SQLite in the home), data v1 (4 sample users, the first missing its 3 newest items)
    and v2 (the first complete, a fifth user new), and a job on v1 run to its end (``TRAIN``,
    with ``train``'s options over it): returns (workspace, job id, the sample's users, v1, v2).
    Call :func:`without_ray` first."""
    from cbpo_orch.method.config import TrainConfig
    from cbpo_orch.orchestrator.driver import run_job
    from cbpo_orch.orchestrator.spec import JobSpec, Resources
    from cbpo_orch.orchestrator.workspace import Workspace

    users = sample_users()
    v1 = write_data(root / "v1", users[:4], {users[0]: 3})
    v2 = write_data(root / "v2", users[:5])
    space = Workspace.open(root / "home", db, writes=True)
    spec = JobSpec(task="lamp4", data=str(v1), split="dev", model=str(model), methods=methods, users=tuple(users[:4]), train=TrainConfig(method=methods[0], **{**TRAIN, **train}))
    job = space.registry.create_job("lamp4", list(methods), users[:4], spec.to_config(Resources(workers=1)))
    assert run_job(space, job) == "succeeded"
    return space, job, users, v1, v2
