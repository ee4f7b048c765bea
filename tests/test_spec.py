"""The job spec: stored and read back exactly, users resolved, the task adapter's cache key."""

from dataclasses import replace

import pytest

from cbpo_orch.data.dataset import DataError, load_split
from cbpo_orch.data.tasks import load_task
from cbpo_orch.home import SAMPLE_DATA
from cbpo_orch.method.config import ConfigError, TrainConfig
from cbpo_orch.method.methods import UnknownMethod
from cbpo_orch.orchestrator.job_model import task_adapter_key
from cbpo_orch.orchestrator.spec import JobSpec, Resources, parse_methods, resolve_users

DATASET = load_split(SAMPLE_DATA, "dev", load_task("lamp4"))
IDS = list(DATASET.users)


def spec(**changes) -> JobSpec:
    base = JobSpec("lamp4", str(SAMPLE_DATA), "dev", "/models/m", ("sft", "cbpo"), tuple(IDS[:2]), TrainConfig(gamma=0.3, max_profile=16), "auto")
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
