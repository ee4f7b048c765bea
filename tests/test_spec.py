"""The job spec: stored and read back exactly, users resolved, the task adapter's cache key."""

import socket
from dataclasses import replace

import pytest

from cbpo_orch.data.dataset import DataError, load_split
from cbpo_orch.data.tasks import load_task
from cbpo_orch.home import SAMPLE_DATA
from cbpo_orch.method.config import ConfigError, TrainConfig
from cbpo_orch.method.methods import UnknownMethod
from cbpo_orch.orchestrator.job_model import task_adapter_key
from cbpo_orch.orchestrator.spec import JobSpec, Resources, UnreachableCluster, parse_methods, plan_job, resolve_users
from cbpo_orch.training.encoding import BudgetError
from cbpo_orch.training.model_dirs import ModelError

DATASET = load_split(SAMPLE_DATA, "dev", load_task("lamp4"))
IDS = list(DATASET.users)


def spec(**changes) -> JobSpec:
    base = JobSpec(task="lamp4", data=str(SAMPLE_DATA), split="dev", model="/models/m", methods=("sft", "cbpo"), users=tuple(IDS[:2]), train=TrainConfig(gamma=0.3, max_profile=16), task_adapter="auto")
    return replace(base, **changes)


def test_spec_round_trips_through_the_registry_config():
    resources = Resources(address="auto", gpus_per_user=0.25, workers=3, max_retries=1)
    assert JobSpec.from_config(spec().to_config(resources)) == (spec(), resources)


def test_users_all_first_n_and_ids():
    assert resolve_users("all", DATASET) == tuple(IDS)
    assert resolve_users("2", DATASET) == tuple(IDS[:2])
    assert resolve_users(f"{IDS[3]}, {IDS[1]},{IDS[3]}", DATASET) == (IDS[3], IDS[1])
    with pytest.raises(DataError, match="nobody"):
        resolve_users(f"{IDS[0]},nobody", DATASET)
    with pytest.raises(DataError):
        resolve_users("0", DATASET)


def test_methods_are_checked_and_deduplicated():
    assert parse_methods("cbpo, sft,cbpo") == ("cbpo", "sft")
    with pytest.raises(UnknownMethod):
        parse_methods("cbpo,dpo")
    with pytest.raises(ConfigError):
        parse_methods(" , ")


def test_task_adapter_key_changes_with_what_the_adapter_depends_on():
    key = task_adapter_key(spec())
    assert key == task_adapter_key(spec(methods=("kto",), users=tuple(IDS[2:4])))
    assert key == task_adapter_key(spec(train=TrainConfig(gamma=0.7, max_profile=16, lr=5e-3)))
    # what concerns only user adapters leaves the task adapter alone
    assert key == task_adapter_key(spec(train=TrainConfig(max_profile=16, eval_items=8, selection=True, beta=1.0)))
    for changed in (spec(task_adapter_lr=2e-3), spec(task_adapter_epochs=1), spec(model="/models/other"),
                    spec(train=TrainConfig(max_profile=8)), spec(train=TrainConfig(max_profile=16, seed=1))):
        assert task_adapter_key(changed) != key


def test_a_spec_is_built_by_keyword():
    with pytest.raises(TypeError):
        JobSpec("lamp4", str(SAMPLE_DATA), "dev", "/models/m", ("sft",), tuple(IDS[:1]))


def test_plan_job_runs_every_check_and_builds_the_spec(tiny_model_dir, tmp_path):
    """plan_job gives the job of valid input with absolute paths; each mistake fails it with
    its own one-line reason (a free port stands for a cluster that is not there)."""
    good = dict(
        task="lamp4", data=str(SAMPLE_DATA), model=tiny_model_dir, users="2", methods=("sft", "cbpo"), split="dev",
        train=TrainConfig(method="sft", max_prompt_tokens=448, max_new_tokens=32), task_adapter="none", task_adapter_lr=1e-4, task_adapter_epochs=3, embedder=None, address=None,
    )
    planned = plan_job(**good)
    assert planned == JobSpec(task="lamp4", data=str(SAMPLE_DATA.resolve()), split="dev", model=str(tiny_model_dir.resolve()),
                              methods=("sft", "cbpo"), users=tuple(IDS[:2]), train=TrainConfig(method="sft", max_prompt_tokens=448, max_new_tokens=32))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    mistakes = [
        ({"data": str(tmp_path / "none")}, DataError, "none"),
        ({"model": tmp_path}, ModelError, str(tmp_path)),
        ({"users": "nobody"}, DataError, "nobody"),
        ({"split": "test"}, DataError, "test"),
        ({"train": TrainConfig(method="sft")}, BudgetError, "context of 512"),
        ({"task_adapter": str(tmp_path)}, ModelError, "--task-adapter"),
        ({"task_adapter_lr": float("nan")}, ConfigError, "--task-adapter-lr"),
        ({"address": f"127.0.0.1:{free}"}, UnreachableCluster, f"127.0.0.1:{free}"),
    ]
    for change, error, words in mistakes:
        with pytest.raises(error, match=words.replace(".", r"\.")):
            plan_job(**{**good, **change})
