"""How completions end and what they may not repeat (``Decoding``), the same in evaluation and
serving: hand-made token streams, and generation with a tiny random model."""

from __future__ import annotations

import pytest
import torch

from cbpo_orch.data.dataset import DataError
from cbpo_orch.data.tasks import BUILTIN_TASKS, Budgets, Decoding, Task, load_task
from cbpo_orch.training.generation import NoRepeatInCompletion, RowEnds, banned_tokens, generate, generate_batch


def test_banned_tokens_are_those_that_would_repeat_an_ngram():
    # trigrams of 1 2 3 1 2: (1,2,3) (2,3,1) (3,1,2); the last two tokens (1, 2) were once followed by 3
    assert banned_tokens([1, 2, 3, 1, 2], 3) == [3]
    # bigrams: the last token 2 was followed by 3 once
    assert banned_tokens([1, 2, 3, 1, 2], 2) == [3]
    assert banned_tokens([1, 2], 3) == []  # no earlier trigram to repeat
    assert banned_tokens([7, 7], 2) == [7]  # "7 7" then 7 again would repeat it
    assert banned_tokens([1, 2, 3], 0) == []


def test_the_guard_ignores_the_prompt():
    # prompt 5 6 7, completion 5 6: the prompt's trigram (5, 6, 7) may be copied; the
    # completion 1 2 3 1 2 may not repeat its own (1, 2, 3)
    scores = torch.zeros(2, 10)
    input_ids = torch.tensor([[5, 6, 7, 5, 6], [5, 6, 7, 1, 2]])
    NoRepeatInCompletion(2, prompt_width=3)(input_ids, scores)
    assert torch.isfinite(scores[0]).all()
    scores = torch.zeros(1, 10)
    NoRepeatInCompletion(3, prompt_width=2)(torch.tensor([[9, 9, 1, 2, 3, 1, 2]]), scores)
    assert scores[0, 3] == float("-inf") and torch.isfinite(scores[0, [0, 1, 2, 4, 5]]).all()


def test_decoding_finishes_single_line_text_at_its_first_line():
    assert Decoding(single_line=True).finish("\n  A headline\nand more\n") == "A headline"
    assert Decoding(single_line=False).finish("\n  A body\nand more\n") == "A body\nand more"
    assert not Decoding(single_line=True).ended("\n\n  ")  # leading line breaks are no end
    assert Decoding(single_line=True).ended("\nA headline\n")


def _feed(ends: RowEnds, streams: list[list[int]]) -> list[bool]:
    """Feed ``ends`` one token per row per step, as generate does; the done flags after each step."""
    done, sequences = [], [[0] for _ in streams]
    for step in range(max(len(s) for s in streams)):
        for row, stream in enumerate(streams):
            sequences[row].append(stream[step] if step < len(stream) else 0)
        done.append(ends(torch.tensor(sequences), None).tolist())
    return done


def test_row_ends_at_eos_at_a_line_break_after_text_or_at_its_budget(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    line, rest = ids("\nthe mayor spoke"), ids("\nrain all week")
    eos = tokenizer.eos_token_id
    ends = RowEnds(tokenizer, Decoding(single_line=True), budgets=[50, 50, 3], prompt_tokens=[4, 4, 4])
    done = _feed(ends, [line + rest, ids("a park") + [eos], ids("markets fell sharply today")])
    first_break = len(line)  # the step that emits rest's leading line break ends row 0
    assert [step[0] for step in done].index(True) == first_break
    assert ends.completion(0).text == "the mayor spoke" and ends.completion(0).finish_reason == "stop"
    assert ends.completion(1).text == "a park" and ends.completion(1).finish_reason == "stop"
    assert ends.completion(2).finish_reason == "length" and ends.completion(2).completion_tokens == 3


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    from cbpo_orch.training.models import load_model
    from tests.tiny_model import build_tiny_model

    return load_model(build_tiny_model(tmp_path_factory.mktemp("tiny-untied"), seed=3, tie_embeddings=False), "cpu")


def test_greedy_outputs_loop_without_the_guard_and_never_repeat_with_it(untied):
    """The random model loops under plain greedy decoding (a repeated bigram in some row); with
    no_repeat_ngram 2 no row repeats a bigram of its own completion."""
    tokenizer = untied.tokenizer
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("the mayor spoke", "rain all week", "a new park")]

    def tokens(n: int) -> list[list[int]]:
        ends = RowEnds(tokenizer, Decoding(no_repeat_ngram=n), [40] * 3, [len(p) for p in prompts])
        generate_batch(untied.model, prompts, 40, tokenizer.pad_token_id, tokenizer.eos_token_id, "cpu", ends=ends, no_repeat_ngram=n)
        return ends.tokens

    def repeats(row: list[int]) -> bool:
        bigrams = list(zip(row, row[1:]))
        return len(set(bigrams)) < len(bigrams)

    assert any(repeats(row) for row in tokens(0))
    assert not any(repeats(row) for row in tokens(2))


def test_generate_reports_rows_that_ran_to_their_budget(untied):
    answers = generate(untied.model, untied.tokenizer, ["the mayor spoke", "rain all week"], Budgets(64, 5), 2, "cpu")
    assert [a.finish_reason for a in answers] == ["length", "length"]
    assert all(a.completion_tokens == 5 for a in answers)


def test_single_line_tasks_and_task_files(tmp_path):
    assert {name for name, task in BUILTIN_TASKS.items() if task.single_line} == {"lamp4", "lamp5", "commit-subject"}
    assert all(task.decoding.no_repeat_ngram >= 2 for task in BUILTIN_TASKS.values())
    path = tmp_path / "task.json"
    path.write_text('{"name": "t", "item_prompt": "{a}", "item_target": "{b}", "single_line": true, "no_repeat_ngram": 4}')
    assert load_task(path).decoding == Decoding(single_line=True, no_repeat_ngram=4)
    path.write_text('{"name": "t", "item_prompt": "{a}", "item_target": "{b}", "single_line": "yes"}')
    with pytest.raises(DataError, match="'single_line' must be true or false"):
        load_task(path)
    with pytest.raises(DataError, match="no_repeat_ngram must be 0"):
        Task(name="t", item_prompt="{a}", item_target="{b}", no_repeat_ngram=1)
