"""Each method trains with its own recipe (``MethodSpec``: epochs, lr, β) unless the job sets
one: a job of several methods gives each method its recipe, an explicit value serves all, and
the trainer descends with the resolved values (tiny random-weight model, fp32)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cbpo_orch.data.tasks import Budgets
from cbpo_orch.method import methods
from cbpo_orch.method.config import LoraSettings, TrainConfig
from cbpo_orch.method.methods import METHODS, method_spec
from cbpo_orch.training.models import load_model
from cbpo_orch.training.multi_lora import attached_multi_lora
from cbpo_orch.training.trainer import UserTraining, encode_samples, train_adapters

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
BUDGETS = Budgets(48, 12)


@pytest.mark.parametrize("method", sorted(m for m, spec in METHODS.items() if spec.trains))
def test_a_config_without_values_takes_its_methods_recipe(method):
    spec = method_spec(method)
    config = TrainConfig(method=method)
    assert (config.resolved_epochs, config.resolved_lr, config.resolved_beta) == (spec.default_epochs, spec.default_lr, spec.default_beta)


def test_each_method_of_a_job_resolves_its_own_recipe_and_explicit_values_win(monkeypatch):
    monkeypatch.setitem(METHODS, "sft", replace(METHODS["sft"], default_lr=1e-3))
    monkeypatch.setitem(METHODS, "cbpo", replace(METHODS["cbpo"], default_lr=5e-3, default_beta=0.3))
    job = TrainConfig(method="sft")
    assert job.resolved_lr == 1e-3
    assert (job.with_method("cbpo").resolved_lr, job.with_method("cbpo").resolved_beta) == (5e-3, 0.3)
    explicit = TrainConfig(method="sft", lr=2e-2, beta=1.0).with_method("cbpo")
    assert (explicit.resolved_lr, explicit.resolved_beta) == (2e-2, 1.0)
    assert TrainConfig.from_dict(job.to_dict()) == job, "an unset value stays unset in the registry's copy"


@pytest.mark.parametrize("config_error", [{"lr": 0.0}, {"lr": float("nan")}, {"beta": -1.0}])
def test_explicit_values_are_still_checked(config_error):
    with pytest.raises(ValueError):
        TrainConfig(**config_error)


def _train(tiny_model_dir, config: TrainConfig) -> dict[str, torch.Tensor]:
    loaded = load_model(tiny_model_dir, "cpu")
    own = [(f"Generate a headline: story {i}", f"Headline {i}") for i in range(4)]
    aux = [(f"Generate a headline: other {i}", f"Other {i}") for i in range(4)]
    user = UserTraining(samples=encode_samples(loaded.tokenizer, own, True, BUDGETS) + encode_samples(loaded.tokenizer, aux, False, BUDGETS), gamma=0.2, seed=3)
    with attached_multi_lora(loaded.model, LORA, 1) as multi:
        train_adapters(multi, loaded.tokenizer, [user], config, "cpu")
        return multi.slot_state(0)


def test_the_trainer_descends_with_the_methods_lr_and_beta(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(methods.METHODS, "cbpo", replace(METHODS["cbpo"], default_lr=7e-3, default_beta=0.4))
    recipe = _train(tiny_model_dir, TrainConfig(method="cbpo", epochs=1, batch_size=4, lora=LORA))
    explicit = _train(tiny_model_dir, TrainConfig(method="cbpo", epochs=1, batch_size=4, lora=LORA, lr=7e-3, beta=0.4))
    other_beta = _train(tiny_model_dir, TrainConfig(method="cbpo", epochs=1, batch_size=4, lora=LORA, lr=7e-3, beta=0.1))
    for key, value in explicit.items():
        torch.testing.assert_close(recipe[key], value, rtol=0, atol=0)
    assert any(not torch.equal(other_beta[k], v) for k, v in explicit.items()), "β must change the C-BPO step"


def test_submit_help_lists_every_method_of_the_catalogue():
    from typer.testing import CliRunner

    from cbpo_orch.cli.main import app

    result = CliRunner().invoke(app, ["submit", "--help"], env={"COLUMNS": "2000", "TERMINAL_WIDTH": "2000"})
    assert result.exit_code == 0
    for name, spec in METHODS.items():
        assert f"{name}: {spec.summary}" in result.output
