"""Worker functions for the orchestrator tests, importable by Ray workers as
``tests.faulty_worker`` (the test puts the repository root on ``PYTHONPATH``).

Each has the signature of :func:`cbpo_orch.workers.personalize.personalize_users`
as the driver calls it: ``worker_fn(context, user_ids, config)`` → one outcome per user.
The fault injectors test what the driver schedules, retries and records: the users they spare
get :func:`canned_outcomes`, a stub that trains nothing. :func:`bad_record_for_one_user` trains
them for real, as the serving tests need, unless given ``then=canned_outcomes`` (with
``functools.partial``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cbpo_orch.data.dataset import DataError
from cbpo_orch.training.numerics import NumericalError
from cbpo_orch.workers.personalize import UserOutcome, personalize_users
from cbpo_orch.workers.user_items import gamma_inputs, user_items

FAILING_USER = "a24e7d657a9"
"""The dev user of the shipped HuffPost sample that :func:`fail_one_user` fails."""

CANCEL_FILE_ENV = "CBPO_TEST_CANCEL_FILE"
"""Env var naming a JSON file ``{"db": URL, "job_id": ID}`` read by :func:`cancel_job_then_personalize`."""

DEATHS_DIR_ENV = "CBPO_TEST_DEATHS_DIR"
"""Env var naming a folder where :func:`die_once_for_one_user` remembers the deaths it caused."""


def injected_error(user_id: str) -> str:
    return f"injected failure for user {user_id}"


def canned_outcomes(context, user_ids: list[str], config) -> list[UserOutcome]:
    """A stub of the worker that trains nothing: each user succeeds at once with the same made-up
    scores and an adapter folder of its own with a trained one's files, for the driver to record."""
    metrics = {
        "rouge1": 0.5, "rougeL": 0.5, "gamma": None, "gamma_reason": None, "n_pos": 1, "n_aux": 0, "seconds": 0.01,
        "phase_seconds": {}, "losses": [], "selection": {}, "evaluation": {}, "prompting": {},
    }
    return [
        UserOutcome(user_id, config.method, {"user_id": user_id, "method": config.method, **metrics}, {
            "adapter_config.json": b"{}",
            "adapter_model.safetensors": b"canned weights",
            "trainer_state.json": json.dumps({"user_id": user_id, "method": config.method}).encode(),
        })
        for user_id in user_ids
    ]


def fail_one_user(context, user_ids: list[str], config):
    """Raise for a call that holds :data:`FAILING_USER`; every other call gets :func:`canned_outcomes`."""
    if FAILING_USER in user_ids:
        raise RuntimeError(injected_error(FAILING_USER))
    return canned_outcomes(context, user_ids, config)


def bad_record_for_one_user(context, user_ids: list[str], config, then=personalize_users):
    """Raise a :class:`DataError` (the input's fault: a retry fails alike) for
    :data:`FAILING_USER`, personalize every other user with ``then``."""
    if FAILING_USER in user_ids:
        raise DataError(injected_error(FAILING_USER))
    return then(context, user_ids, config)


def diverge_for_one_user(context, user_ids: list[str], config):
    """Raise a :class:`NumericalError` (seeded training that diverged: a retry diverges
    alike) for :data:`FAILING_USER`; every other user gets :func:`canned_outcomes`."""
    if FAILING_USER in user_ids:
        raise NumericalError(injected_error(FAILING_USER))
    return canned_outcomes(context, user_ids, config)


def die_once_for_one_user(context, user_ids: list[str], config):
    """Kill this worker process the first time :data:`FAILING_USER` is personalized
    with a method; every call after gets :func:`canned_outcomes`."""
    marker = Path(os.environ[DEATHS_DIR_ENV]) / f"{FAILING_USER}-{config.method}"
    if FAILING_USER in user_ids and not marker.exists():
        marker.touch()
        os._exit(1)
    return canned_outcomes(context, user_ids, config)


def cancel_job_then_personalize(context, user_ids: list[str], config):
    """Cancel the job named in ``$CBPO_TEST_CANCEL_FILE`` (as ``cbpo-orch cancel`` would,
    from another process), then answer with :func:`canned_outcomes`: a run already started finishes."""
    from cbpo_orch.storage.registry import Registry

    target = json.loads(open(os.environ[CANCEL_FILE_ENV], encoding="utf-8").read())
    with Registry(target["db"]) as registry:
        registry.cancel(target["job_id"])
    return canned_outcomes(context, user_ids, config)


def must_not_run(context, user_ids: list[str], config):
    raise AssertionError(f"a run of users {user_ids} was started")


def slow_steps(steps: int, seconds_per_step: float, on_step=None) -> str:
    """A task that reports ``steps`` steps of training, one every ``seconds_per_step``."""
    import time

    for step in range(1, steps + 1):
        time.sleep(seconds_per_step)
        on_step(step, steps, 1.0 / step)
    return "trained"


def shard_as_placed(items: list, argument, threads: int) -> tuple[list, object, int, dict]:
    """A shard task: its items, its argument, its threads and the resources Ray gave it."""
    import ray

    return items, argument, threads, ray.get_runtime_context().get_assigned_resources()


def reference_shard_fails(pairs: list, *args, threads: int):
    """A π_ref shard (``workers/reference_pass.py``'s signature) that raises."""
    raise RuntimeError(f"injected failure of a π_ref shard of {len(pairs)} pairs")


def gamma_shard_fails(inputs: list, *args, threads: int):
    """A γ shard (``workers/gamma_pass.py``'s signature) that raises."""
    raise RuntimeError(f"injected failure of a γ shard of {len(inputs)} runs")


def gamma_from_the_jobs_pass(context, user_ids: list[str], config):
    """Canned outcomes carrying each user's γ as the job's γ pass put it in the worker's context;
    raise for a user whose γ is not there (a worker would estimate it itself)."""
    outcomes = canned_outcomes(context, user_ids, config)
    for outcome in outcomes:
        inputs = gamma_inputs(user_items(context.dataset, context.history, outcome.user_id, config), config)
        if inputs is not None and inputs not in context.gammas:
            raise RuntimeError(f"user {outcome.user_id}'s γ is not in the worker's context")
        outcome.metrics["gamma"] = None if inputs is None else context.gammas[inputs][0]
    return outcomes
