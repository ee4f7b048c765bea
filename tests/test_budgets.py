"""Token budgets of every built-in task, with the real SmolLM2-135M-Instruct tokenizer
(its chat template): the query reaches the model whole, and long targets keep their length."""

from __future__ import annotations

import pytest

from cbpo_orch.data.dataset import load_split
from cbpo_orch.data.tasks import BUILTIN_TASKS, load_task
from cbpo_orch.home import default_model_dir, home_dir
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.orchestrator.spec import check_budgets
from cbpo_orch.training.encoding import encode_pair, prompt_ids
from cbpo_orch.training.models import load_tokenizer

FIXTURE_OF = {"lamp4": "lamp4", "lamp5": "lamp5", "longlamp2": "longlamp2", "longlamp3": "longlamp3", "longlamp4": "longlamp4", "commit-subject": "lamp4"}


@pytest.fixture(scope="module")
def smollm2():
    folder = default_model_dir(home_dir())
    if not (folder / "config.json").is_file():
        pytest.skip(f"SmolLM2-135M-Instruct not cached at {folder}: run `cbpo-orch setup-model`")
    return load_tokenizer(folder)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", list(BUILTIN_TASKS))
def test_every_builtin_task_gives_the_whole_query_and_keeps_long_targets(name, smollm2, fixtures_dir):
    task = BUILTIN_TASKS[name]
    budgets = task.budgets()
    dataset = load_split(fixtures_dir / FIXTURE_OF[name], "dev", task)
    for user in dataset.users.values():
        for query in user.queries:
            text = smollm2.decode(prompt_ids(smollm2, task.prompt(query), budgets.prompt_tokens))
            assert query.input in text and text.rstrip().endswith("assistant")
        x = dataset.examples(user.id)[0].x
        long_target = "the tone of this amp is warm and full " * 200
        pair = encode_pair(smollm2, x, long_target, budgets)
        assert list(pair.input_ids[pair.prompt_len :]) == _ids(smollm2, long_target)[: budgets.new_tokens]


def test_longlamp3_on_real_reviews_gets_whole_prompts_and_whole_reviews(smollm2, shared_dir):
    """The user's headline job, `submit --task longlamp3 --data …/amazon-musical-review --users 5`,
    at the default budgets: it passes the submit check, every query prompt holds its review
    request whole, and every review of those users' profiles is trained on whole (with EOS)."""
    task = load_task("longlamp3")
    budgets = task.budgets()
    dataset = load_split(shared_dir / "data" / "amazon-musical-review", "dev", task)
    users = tuple(dataset.users)[:5]
    check_budgets(task, dataset, users, str(default_model_dir(home_dir())), TrainConfig())
    for user_id in users:
        for query in dataset.user(user_id).queries:
            assert query.input in smollm2.decode(prompt_ids(smollm2, task.prompt(query), budgets.prompt_tokens))
        for example in dataset.examples(user_id):
            pair = encode_pair(smollm2, example.x, example.y, budgets)
            assert list(pair.input_ids[pair.prompt_len :]) == _ids(smollm2, example.y) + [smollm2.eos_token_id]

