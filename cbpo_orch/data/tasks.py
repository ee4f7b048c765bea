"""Task definitions: how a profile item becomes a pair (x, y) and a query becomes a prompt.

A task is declarative: ``str.format`` templates over a profile item's fields, and one over
``{input}`` for queries. Built-in tasks are in ``BUILTIN_TASKS``; a user brings another as a
JSON file with the same field names as ``Task`` (``load_task``). Item prompts follow the
phrasing of the tasks' query inputs, so that training pairs and queries look alike.

Every task carries its token budgets (METHOD.md §6): the rendered prompt's tokens and the
completion's (= the generation budget); the context is their sum. Short tasks (LaMP):
prompts up to 512 tokens, ~100 new tokens. Long tasks (LongLaMP): prompts up to 1,536
tokens, 512 new tokens, a 2,048-token context. A job may override either (``Budgets``).

Every task also carries its decoding (``Decoding``). Single-line tasks end at their first line
break and repeat no bigram of their own (``LINE_NO_REPEAT_NGRAM``): on validation users, plain
greedy decoding ran 16–25 % of outputs to the budget, and the bigram guard gave the best ROUGE-1
of 0, 2, 3 and 4 (HuffPost × SmolLM2 +0.020 [+0.000, +0.055] over no guard, numpy commit subjects
× commit-lm-17m +0.011 [+0.008, +0.015]; ``bench/decoding.py``). Long-form text legitimately
repeats short phrases ("of the"), so other tasks forbid only a repeated 4-gram
(``NO_REPEAT_NGRAM``), a loop guard not yet measured on validation users.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from string import Formatter
from cbpo_orch.data.errors import DataError
from cbpo_orch.data.records import ProfileItem, Query

SHORT_PROMPT_TOKENS = 512
SHORT_OUTPUT_TOKENS = 100
LONG_PROMPT_TOKENS = 1536
LONG_OUTPUT_TOKENS = 512
NO_REPEAT_NGRAM = 4
LINE_NO_REPEAT_NGRAM = 2


def _template_fields(template: str, where: str) -> tuple[str, ...]:
    """Field names a ``str.format`` template uses, in order; only plain named fields are allowed."""
    try:
        parsed = list(Formatter().parse(template))
    except ValueError as exc:
        raise DataError(f"{where}: bad template ({exc})") from None
    names = []
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if not name or name.isdigit() or "." in name or "[" in name or "{" in (spec or ""):
            raise DataError(f"{where}: template field {{{name}}} must be a plain field name")
        names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class Budgets:
    """Token budgets of a job: the rendered prompt, and the completion (training targets are
    cut to it, generation stops at it). Nothing of a prompt is ever cut: a prompt over its
    budget is an error (:func:`cbpo_orch.training.encoding.prompt_ids`)."""

    prompt_tokens: int
    new_tokens: int

    @property
    def context(self) -> int:
        """The longest sequence a model sees: prompt plus completion."""
        return self.prompt_tokens + self.new_tokens


@dataclass(frozen=True)
class Decoding:
    """How a completion ends and what it may not repeat: the task's generation settings, the
    same for every arm and for evaluation and serving alike.

    ``single_line``: the completion ends at its first line break after any text (headlines,
    titles, commit subjects are one line; a small model otherwise runs on to its budget).
    ``no_repeat_ngram``: no n-gram of the completion's own tokens occurs twice (0: off). The
    prompt does not count, so copying a phrase from the article stays allowed, and greedy
    decoding cannot fall into a loop.
    """

    single_line: bool = False
    no_repeat_ngram: int = 0

    def ended(self, text: str) -> bool:
        """Whether a completion's text so far has reached its end by the line rule."""
        return self.single_line and "\n" in text.lstrip()

    def finish(self, text: str) -> str:
        """The completion's final text: stripped, and cut to its first line when single-line."""
        text = text.strip()
        return text.split("\n", 1)[0].rstrip() if self.single_line else text


@dataclass(frozen=True)
class Task:
    """A generation task: templates giving (x, y) from a profile item and a query's prompt."""

    name: str
    item_prompt: str
    item_target: str
    query_prompt: str = "{input}"
    max_prompt_tokens: int = SHORT_PROMPT_TOKENS
    max_new_tokens: int = SHORT_OUTPUT_TOKENS
    description: str = ""
    single_line: bool = False
    no_repeat_ngram: int = NO_REPEAT_NGRAM

    def __post_init__(self) -> None:
        if not self.name:
            raise DataError("task: 'name' must not be empty")
        where = f"task {self.name!r}"
        for attribute in ("item_prompt", "item_target"):
            if not _template_fields(getattr(self, attribute), f"{where}: {attribute}"):
                raise DataError(f"{where}: {attribute} uses no profile item field")
        extra = set(_template_fields(self.query_prompt, f"{where}: query_prompt")) - {"input"}
        if extra:
            raise DataError(f"{where}: query_prompt may use only {{input}}, not {{{sorted(extra)[0]}}}")
        for attribute in ("max_prompt_tokens", "max_new_tokens"):
            value = getattr(self, attribute)
            if type(value) is not int or value <= 0:
                raise DataError(f"{where}: {attribute} must be a positive integer, got {value!r}")
        if type(self.no_repeat_ngram) is not int or self.no_repeat_ngram < 0 or self.no_repeat_ngram == 1:
            raise DataError(f"{where}: no_repeat_ngram must be 0 (off) or an integer ≥ 2, got {self.no_repeat_ngram!r}")

    def item_fields(self) -> tuple[str, ...]:
        """The profile item fields the item templates use, in order of first use."""
        names = _template_fields(self.item_prompt, self.name) + _template_fields(self.item_target, self.name)
        return tuple(dict.fromkeys(names))

    def pair(self, item: ProfileItem) -> tuple[str, str]:
        """The (x, y) pair of a profile item."""
        return self.item_prompt.format_map(item.fields), self.item_target.format_map(item.fields)

    def prompt(self, query: Query) -> str:
        """The prompt for a query."""
        return self.query_prompt.format(input=query.input)

    @property
    def decoding(self) -> Decoding:
        return Decoding(self.single_line, self.no_repeat_ngram)

    def budgets(self, prompt_tokens: int | None = None, new_tokens: int | None = None) -> Budgets:
        """The task's token budgets, each overridden where a value is given."""
        return Budgets(prompt_tokens or self.max_prompt_tokens, new_tokens or self.max_new_tokens)


BUILTIN_TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="lamp4",
            single_line=True,
            no_repeat_ngram=LINE_NO_REPEAT_NGRAM,
            item_prompt="Generate a headline for the following article: {text}",
            item_target="{title}",
            description="LaMP-4 personalized news headline generation (article -> headline).",
        ),
        Task(
            name="lamp5",
            single_line=True,
            no_repeat_ngram=LINE_NO_REPEAT_NGRAM,
            item_prompt="Generate a title for the following abstract of a paper: {abstract}",
            item_target="{title}",
            description="LaMP-5 personalized scholarly title generation (abstract -> title).",
        ),
        Task(
            name="longlamp2",
            item_prompt='Generate an abstract for the title "{title}".',
            item_target="{abstract}",
            max_prompt_tokens=LONG_PROMPT_TOKENS,
            max_new_tokens=LONG_OUTPUT_TOKENS,
            description="LongLaMP-2 personalized abstract generation (title -> abstract).",
        ),
        Task(
            name="longlamp3",
            item_prompt=(
                "Generate the review text written by a reviewer who has given an overall rating of "
                '"{overall}" for a product with description "{description}". '
                'The summary of the review text is "{summary}".'
            ),
            item_target="{reviewText}",
            max_prompt_tokens=LONG_PROMPT_TOKENS,
            max_new_tokens=LONG_OUTPUT_TOKENS,
            description="LongLaMP-3 personalized product review writing (rating, product, summary -> review).",
        ),
        Task(
            name="longlamp4",
            item_prompt="Generate the content for a reddit post {summary}",
            item_target="{content}",
            max_prompt_tokens=LONG_PROMPT_TOKENS,
            max_new_tokens=LONG_OUTPUT_TOKENS,
            description="LongLaMP-4 personalized topic writing (Reddit post summary -> post content).",
        ),
        Task(
            name="commit-subject",
            single_line=True,
            no_repeat_ngram=LINE_NO_REPEAT_NGRAM,
            item_prompt="Generate a commit subject line for the following change description: {text}",
            item_target="{title}",
            max_prompt_tokens=960,
            max_new_tokens=64,
            description=(
                "Commit subject generation (message body -> subject line), e.g. numpy-commit-subject; "
                "bodies run to ~950 tokens, so prompt and completion fill a 1,024-token context."
            ),
        ),
    )
}


def load_task(name_or_path: str | os.PathLike[str]) -> Task:
    """A built-in task by name, or a task defined in a user's JSON file."""
    key = os.fspath(name_or_path)
    if key in BUILTIN_TASKS:
        return BUILTIN_TASKS[key]
    path = Path(key)
    if not path.is_file():
        raise DataError(
            f"unknown task {key!r}: not a built-in task ({', '.join(BUILTIN_TASKS)}) "
            "nor a task definition file"
        )
    return _task_from_file(path)


_KINDS = {int: "an integer", bool: "true or false", str: "a string"}


def _task_from_file(path: Path) -> Task:
    """Parse and validate a JSON task definition file."""
    try:
        definition = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(definition, dict):
        raise DataError(f"{path}: expected a JSON object defining a task")
    known = {field.name: field for field in fields(Task)}
    unknown = sorted(set(definition) - set(known))
    if unknown:
        raise DataError(f"{path}: unknown field {unknown[0]!r} (known: {', '.join(known)})")
    for name in ("name", "item_prompt", "item_target"):
        if name not in definition:
            raise DataError(f"{path}: lacks field {name!r}")
    for name, value in definition.items():
        expected = {"max_prompt_tokens": int, "max_new_tokens": int, "no_repeat_ngram": int, "single_line": bool}.get(name, str)
        if type(value) is not expected:
            raise DataError(f"{path}: field {name!r} must be {_KINDS[expected]}")
    try:
        return Task(**definition)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None

