"""Tests of the data layer: task definitions, loading splits of every shape, strict validation."""

import json
from pathlib import Path

import pytest

import cbpo_orch
from cbpo_orch.data.dataset import DataError, User, find_splits, load_split
from cbpo_orch.data.records import ProfileItem
from cbpo_orch.data.tasks import BUILTIN_TASKS, Budgets, load_task

SAMPLE = Path(cbpo_orch.__file__).parent / "samples" / "huffpost-headline"
ITEM = {"id": "a", "text": "An article.", "title": "A Title", "date": "2020-01-01"}


def _write(folder: Path, files: dict[str, object]) -> None:
    """Write each file: a str as is, anything else as JSON."""
    for name, content in files.items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))


def _question(question_id: str, **fields: object) -> dict[str, object]:
    """A valid LaMP-4 question of user 'u', with the given fields replaced."""
    return {"id": question_id, "user_id": "u", "input": f"Generate a headline for the following article: {question_id}",
            "profile": [ITEM], **fields}


def _golds(*ids: str) -> dict[str, object]:
    return {"task": "LaMP_4", "golds": [{"id": i, "output": f"gold {i}"} for i in ids]}


def _items(*dates: str | None) -> tuple[ProfileItem, ...]:
    return tuple(ProfileItem(id=f"i{n}", fields={}, date=date) for n, date in enumerate(dates))


# --- fixtures of each official shape -------------------------------------------------------

# task -> (folder, user ids (prefixes), a user, that user's first pair: their oldest item by date)
FIXTURE_CASES = {
    "lamp4": ("lamp4", ["400", "401", "402"], "400",
              ("Generate a headline for the following article: The mayor said the budget would not include new taxes.",
               "Mayor Promises No New Taxes")),
    "lamp5": ("lamp5", ["500", "501"], "500",
              ("Generate a title for the following abstract of a paper: "
               "We propose a transformer variant whose memory grows linearly.",
               "Efficient Transformers for Long Inputs")),
    "longlamp2": ("longlamp2", ["Ada_Lovelace-", "grace-hopper"], "grace-hopper",
                  ('Generate an abstract for the title "A Language for Business".',
                   "We design a language close to English.")),
    "longlamp3": ("longlamp3", ["A2SUAM1J3GNN3B", "A1B2C3D4E5F6G7"], "A1B2C3D4E5F6G7",
                  ('Generate the review text written by a reviewer who has given an overall rating of "3.0" '
                   'for a product with description "A USB cable.". The summary of the review text is "It\'s fine".',
                   "Works. Nothing special.")),
    "longlamp4": ("longlamp4", ["throwaway_42", "cat-person"], "cat-person",
                  ("Generate the content for a reddit post My cat hates the vacuum",
                   "Every Saturday she hides under the bed for hours.")),
}


@pytest.mark.parametrize("folder, task_name", [(case[0], name) for name, case in FIXTURE_CASES.items()])
def test_fixture_loads_with_users_pairs_and_prompts(fixtures_dir, folder, task_name):
    _, user_ids, user_id, first_pair = FIXTURE_CASES[task_name]
    task = load_task(task_name)
    dataset = load_split(fixtures_dir / folder, "dev", task)
    assert [u[: len(want)] for u, want in zip(dataset.users, user_ids)] == user_ids
    assert len(dataset.users) == len(user_ids)
    examples = dataset.examples(user_id)
    assert (examples[0].x, examples[0].y) == first_pair
    assert {e.user_id for e in examples} == {user_id}
    assert [e.item_id for e in examples] == [item.id for item in dataset.users[user_id].recent()]
    for user in dataset.users.values():
        for query in user.queries:
            assert query.gold
            prompt = task.prompt(query)
            assert prompt == query.input
            assert prompt[:30] == examples[0].x[:30], "profile prompts must be phrased like the queries"


def test_rows_of_one_user_share_profile_and_get_stable_ids(fixtures_dir):
    dataset = load_split(fixtures_dir / "longlamp2", "dev", load_task("longlamp2"))
    ada = next(iter(dataset.users.values()))
    assert ada.id.startswith("Ada_Lovelace-") and len(ada.id) == len("Ada_Lovelace-") + 8
    assert [q.id for q in ada.queries] == [f"{ada.id}-q0", f"{ada.id}-q1"]
    assert [item.id for item in ada.profile] == [f"{ada.id}-p0", f"{ada.id}-p1"]
    assert ada.profile[0].fields["year"] == "2019"


def test_numbers_become_strings(fixtures_dir):
    dataset = load_split(fixtures_dir / "longlamp3", "dev", load_task("longlamp3"))
    item = dataset.users["A2SUAM1J3GNN3B"].profile[0]
    assert item.fields["overall"] == "5.0"
    assert item.fields["asin"] == "B000001"


def test_find_splits(fixtures_dir, tmp_path):
    assert find_splits(fixtures_dir / "lamp4") == ("dev",)
    assert find_splits(fixtures_dir / "longlamp3") == ("dev",)
    assert find_splits(tmp_path) == ()


def test_unknown_user_is_a_data_error(fixtures_dir):
    dataset = load_split(fixtures_dir / "lamp5", "dev", load_task("lamp5"))
    with pytest.raises(DataError, match="has no user 'nobody'"):
        dataset.examples("nobody")


# --- real data and the shipped sample ------------------------------------------------------

@pytest.mark.parametrize("name, task_name, split, n_users", [
    ("huffpost-headline", "lamp4", "train", 18),
    ("huffpost-headline", "lamp4", "dev", 56),
    ("numpy-commit-subject", "commit-subject", "train", 7),
    ("numpy-commit-subject", "commit-subject", "dev", 21),
])
def test_real_data_loads(shared_dir, name, task_name, split, n_users):
    task = load_task(task_name)
    dataset = load_split(shared_dir / "data" / name, split, task)
    assert len(dataset.users) == n_users
    prefix = task.item_prompt.split("{")[0]
    for user in dataset.users.values():
        assert len(user.queries) == 2 and all(q.gold for q in user.queries)
        assert all(task.prompt(q).startswith(prefix) for q in user.queries)
        assert user.profile
    assert len(dataset.profile_examples()) == sum(len(u.profile) for u in dataset.users.values())


def test_real_numeric_dates_order_recent(shared_dir):
    dataset = load_split(shared_dir / "data" / "numpy-commit-subject", "dev", load_task("commit-subject"))
    for user in dataset.users.values():
        dates = [float(item.date) for item in user.recent(10)]
        assert dates == sorted(dates)
        assert dates[-1] == max(float(item.date) for item in user.profile)


@pytest.mark.parametrize("split", ["train", "dev"])
def test_shipped_sample_loads(split):
    dataset = load_split(SAMPLE, split, load_task("lamp4"))
    assert len(dataset.users) == 6
    assert all(len(u.queries) == 2 and len(u.profile) == 40 for u in dataset.users.values())
    assert sum(f.stat().st_size for f in SAMPLE.iterdir()) < 1_000_000
    assert "CC BY 4.0" in (SAMPLE / "README.md").read_text()


# --- recency ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dates, n, expected", [
    (["2020-03-01", "2019-12-31", "2020-01-15"], 2, ["i2", "i0"]),
    (["2020-03-01", "2019-12-31", "2020-01-15"], None, ["i1", "i2", "i0"]),
    (["100", "9", "10"], 2, ["i2", "i0"]),
    (["100", "9", "10"], 5, ["i1", "i2", "i0"]),
    (["2020-01-01", "2020-01-01", "2019-01-01"], 2, ["i0", "i1"]),
    (["2020-01-01", None, "2019-01-01"], 2, ["i1", "i2"]),
    (["2020-01-01", "2019-01-01"], 0, []),
])
def test_recent_orders_by_date(dates, n, expected):
    user = User(id="u", profile=_items(*dates), queries=())
    assert [item.id for item in user.recent(n)] == expected


def test_recent_rejects_negative():
    with pytest.raises(ValueError):
        User(id="u", profile=_items("1"), queries=()).recent(-1)


# --- tasks -----------------------------------------------------------------------------------

def test_builtin_tasks_fields_and_lengths():
    assert {name: task.item_fields() for name, task in BUILTIN_TASKS.items()} == {
        "lamp4": ("text", "title"),
        "lamp5": ("abstract", "title"),
        "longlamp2": ("title", "abstract"),
        "longlamp3": ("overall", "description", "summary", "reviewText"),
        "longlamp4": ("summary", "content"),
        "commit-subject": ("text", "title"),
    }
    short, long = ("lamp4", "lamp5", "commit-subject"), ("longlamp2", "longlamp3", "longlamp4")
    assert all(BUILTIN_TASKS[n].budgets().new_tokens <= 100 for n in short)
    assert all(BUILTIN_TASKS[n].budgets() == Budgets(1536, 512) for n in long)
    assert BUILTIN_TASKS["lamp4"].budgets(None, 7) == Budgets(512, 7)


def test_user_task_file_loads_and_reads_its_fields(tmp_path):
    task_file = tmp_path / "topic.json"
    task_file.write_text(json.dumps({
        "name": "topic-io", "item_prompt": "Write a post about: {input}", "item_target": "{output}",
        "max_new_tokens": 600, "description": "topic writing with profile items {input, output}",
    }))
    task = load_task(task_file)
    assert task.item_fields() == ("input", "output")
    _write(tmp_path, {"dev.json": [{"author": "u1", "input": "Write a post about: rain", "output": "Wet.",
                                    "profile": [{"input": "sun", "output": "Warm."}]}]})
    dataset = load_split(tmp_path, "dev", task)
    assert [(e.x, e.y) for e in dataset.examples("u1")] == [("Write a post about: sun", "Warm.")]
    assert task.prompt(dataset.users["u1"].queries[0]) == "Write a post about: rain"


@pytest.mark.parametrize("content, expected", [
    (None, ["unknown task", "lamp4, lamp5, longlamp2, longlamp3, longlamp4, commit-subject"]),
    ("{", ["task.json", "not valid JSON"]),
    ([], ["task.json", "expected a JSON object"]),
    ({"name": "t", "item_prompt": "{text}"}, ["task.json", "lacks field 'item_target'"]),
    ({"name": "t", "item_prompt": "{text}", "item_target": "{title}", "colour": "red"},
     ["task.json", "unknown field 'colour'"]),
    ({"name": "t", "item_prompt": "{text}", "item_target": "{title}", "query_prompt": "{title}"},
     ["task.json", "query_prompt may use only {input}"]),
    ({"name": "t", "item_prompt": "{}", "item_target": "{title}"}, ["task.json", "plain field name"]),
    ({"name": "t", "item_prompt": "{text", "item_target": "{title}"}, ["task.json", "bad template"]),
    ({"name": "t", "item_prompt": "x", "item_target": "{title}"}, ["task.json", "uses no profile item field"]),
    ({"name": "t", "item_prompt": "{text}", "item_target": "{title}", "max_new_tokens": "9"},
     ["task.json", "'max_new_tokens' must be an integer"]),
    ({"name": "t", "item_prompt": "{text}", "item_target": "{title}", "max_new_tokens": 0},
     ["task.json", "positive integer"]),
])
def test_bad_task_is_one_line_data_error(tmp_path, content, expected):
    task_file = tmp_path / "task.json"
    if content is not None:
        _write(tmp_path, {"task.json": content})
    with pytest.raises(DataError) as error:
        load_task(task_file)
    message = str(error.value)
    assert "\n" not in message
    assert all(part in message for part in expected), message


# --- validation of data files ----------------------------------------------------------------

BAD_DATA = {
    "not-json": ({"dev_questions.json": "[{", "dev_outputs.json": _golds()},
                 ["dev_questions.json", "not valid JSON", "line 1"]),
    "not-a-list": ({"dev_questions.json": _question("q1"), "dev_outputs.json": _golds("q1")},
                   ["dev_questions.json", "expected a JSON list"]),
    "record-not-object": ({"dev_questions.json": ["q1"], "dev_outputs.json": _golds()},
                          ["dev_questions.json: record 0", "expected a JSON object"]),
    "missing-input": ({"dev_questions.json": [{"id": "q1", "profile": [ITEM]}], "dev_outputs.json": _golds("q1")},
                      ["dev_questions.json: record 0 (id 'q1')", "lacks field 'input'"]),
    "input-not-text": ({"dev_questions.json": [_question("q1", input=["x"])], "dev_outputs.json": _golds("q1")},
                       ["record 0 (id 'q1')", "field 'input' must be a string or number, got list"]),
    "empty-profile": ({"dev_questions.json": [_question("q1"), _question("q2", user_id="v", profile=[])],
                       "dev_outputs.json": _golds("q1", "q2")},
                      ["dev_questions.json: record 1 (id 'q2')", "empty profile"]),
    "duplicate-question-id": ({"dev_questions.json": [_question("q1"), _question("q1")],
                               "dev_outputs.json": _golds("q1")},
                              ["dev_questions.json: record 1 (id 'q1')", "duplicate question id 'q1'"]),
    "duplicate-gold-id": ({"dev_questions.json": [_question("q1")], "dev_outputs.json": _golds("q1", "q1")},
                          ["dev_outputs.json: gold 1", "duplicate id 'q1'"]),
    "missing-gold": ({"dev_questions.json": [_question("q1"), _question("q2")], "dev_outputs.json": _golds("q1")},
                     ["dev_outputs.json", "no gold for question 'q2'", "record 1"]),
    "gold-for-unknown-question": ({"dev_questions.json": [_question("q1")], "dev_outputs.json": _golds("q1", "zz")},
                                  ["dev_outputs.json", "gold for unknown question 'zz'"]),
    "outputs-not-object": ({"dev_questions.json": [_question("q1")], "dev_outputs.json": []},
                           ["dev_outputs.json", "expected an object"]),
    "outputs-missing": ({"dev_questions.json": [_question("q1")]},
                        ["dev_outputs.json", "missing", "only a 'test' split"]),
    "duplicate-profile-item-id": ({"dev_questions.json": [_question("q1", profile=[ITEM, {**ITEM, "title": "B"}])],
                                   "dev_outputs.json": _golds("q1")},
                                  ["record 0 (id 'q1')", "profile item 1", "duplicate profile item id 'a'"]),
    "unsafe-question-id": ({"dev_questions.json": [_question("../x")], "dev_outputs.json": _golds("../x")},
                           ["dev_questions.json: record 0", "'../x'", "unsafe as a file name"]),
    "unsafe-user-id": ({"dev_questions.json": [_question("q1", user_id=".hidden")], "dev_outputs.json": _golds("q1")},
                       ["record 0 (id 'q1')", "'.hidden'", "unsafe as a file name"]),
    "missing-task-field": ({"dev_questions.json": [_question("q1", profile=[{"id": "a", "text": "t"}])],
                            "dev_outputs.json": _golds("q1")},
                           ["dev_questions.json: record 0 (id 'q1'): profile item 0", "lacks field 'title'", "lamp4"]),
    "profiles-differ": ({"dev_questions.json": [_question("q1"), _question("q2", profile=[{**ITEM, "id": "b"}])],
                         "dev_outputs.json": _golds("q1", "q2")},
                        ["record 1 (id 'q2')", "profile differs", "user 'u'"]),
    "no-records": ({"dev_questions.json": [], "dev_outputs.json": _golds()},
                   ["dev_questions.json", "contains no records"]),
    "missing-split": ({"train_questions.json": [_question("q1")], "train_outputs.json": _golds("q1")},
                      ["no split 'dev'", "dev_questions.json, dev.json, dev.jsonl", "splits found: train"]),
    "ambiguous-split": ({"dev_questions.json": [_question("q1")], "dev_outputs.json": _golds("q1"), "dev.json": []},
                        ["split 'dev' is ambiguous", "dev_questions.json", "dev.json"]),
    "jsonl-bad-line": ({"dev.jsonl": '{"author": "u", "input": "i", "profile": []}\n{oops\n'},
                       ["dev.jsonl: line 2", "not valid JSON"]),
    "row-without-user": ({"dev.json": [{"input": "i", "output": "o", "profile": [ITEM]}]},
                         ["dev.json: record 0", "lacks a user id", "'author'"]),
    "row-unsafe-id": ({"dev.json": [{"author": "u", "id": "a/b", "input": "i", "output": "o", "profile": [ITEM]}]},
                      ["dev.json: record 0 (user 'u')", "'a/b'", "unsafe as a file name"]),
    "row-missing-output": ({"dev.json": [{"author": "u", "input": "i", "output": "o", "profile": [ITEM]},
                                         {"author": "v", "input": "j", "profile": [ITEM]}]},
                           ["dev.json: record 1 (user 'v')", "lacks field 'output'", "only a 'test' split"]),
    "row-empty-profile": ({"dev.jsonl": '{"author": "u", "input": "i", "output": "o", "profile": []}\n'},
                          ["dev.jsonl: line 1 (user 'u')", "empty profile"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_line_data_error(tmp_path, case):
    files, expected = BAD_DATA[case]
    _write(tmp_path, files)
    with pytest.raises(DataError) as error:
        load_split(tmp_path, "dev", load_task("lamp4"))
    message = str(error.value)
    assert "\n" not in message
    assert all(part in message for part in expected), message


def test_no_such_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such data folder"):
        load_split(tmp_path / "absent", "dev", load_task("lamp4"))


def test_exact_repeat_of_a_profile_item_is_kept_once(tmp_path):
    _write(tmp_path, {"dev_questions.json": [_question("q1", profile=[ITEM, ITEM, {**ITEM, "id": "b"}])],
                      "dev_outputs.json": _golds("q1")})
    dataset = load_split(tmp_path, "dev", load_task("lamp4"))
    assert [item.id for item in dataset.users["u"].profile] == ["a", "b"]


def test_test_split_without_outputs_has_no_golds(tmp_path):
    _write(tmp_path, {"test_questions.json": [_question("q1")]})
    dataset = load_split(tmp_path, "test", load_task("lamp4"))
    assert dataset.users["u"].queries[0].gold is None


def test_official_lamp_question_is_its_own_user(tmp_path):
    question = {key: value for key, value in _question("q1").items() if key != "user_id"}
    _write(tmp_path, {"dev_questions.json": [question, {**question, "id": "q2"}],
                      "dev_outputs.json": _golds("q1", "q2")})
    assert list(load_split(tmp_path, "dev", load_task("lamp4")).users) == ["q1", "q2"]


def test_no_profile_holds_a_query(tmp_path):
    leaked = {"id": "x", "text": "q2", "title": "gold q2"}
    _write(tmp_path, {"dev_questions.json": [_question("q1", profile=[ITEM, leaked]), _question("q2", user_id="v")],
                      "dev_outputs.json": _golds("q1", "q2")})
    dataset = load_split(tmp_path, "dev", load_task("lamp4"))
    examples = dataset.profile_examples()
    assert [(e.user_id, e.item_id) for e in examples] == [("u", "a"), ("v", "a")]
    assert [e.item_id for e in dataset.examples("u")] == ["a"]


def test_jsonl_lines_are_split_at_newlines_only(tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 raw inside a string (reviews pasted from the web
    hold them); ``str.splitlines`` would cut the record there."""
    review = "Great tone.\u2028Stays in tune\u0085for weeks.\u2029Five stars."
    item = {"overall": 5.0, "summary": "s", "description": "d", "reviewText": review}
    row = {"reviewerId": "u", "input": "i", "output": f"gold {review}", "profile": [item]}
    _write(tmp_path, {"dev.jsonl": json.dumps(row, ensure_ascii=False) + "\r\n"})
    dataset = load_split(tmp_path, "dev", load_task("longlamp3"))
    assert dataset.users["u"].queries[0].gold == f"gold {review}"
    assert [example.y for example in dataset.examples("u")] == [review]
