"""Users without gold outputs (LaMP's test split, a product's real users) are personalized and
answered: their predictions are recorded, their scores are n/a in ``results``, and one job may
mix users with and without golds. A split that claims golds and misses one is still refused."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from sqlalchemy import MetaData, create_engine, insert, select, update

from cbpo_orch.data.dataset import DataError, load_split
from cbpo_orch.data.tasks import load_task
from cbpo_orch.home import SAMPLE_DATA
from cbpo_orch.storage.models import SCHEMA_VERSION, Job, Metric, SchemaVersion, UserRun
from cbpo_orch.storage.registry import Registry
from tests.helpers import FAST_JOB, Cli, cli_in_process, ok_line

METRICS = {"rouge1": None, "rougeL": None, "gamma": None, "gamma_reason": None, "n_pos": 4, "n_aux": 0, "seconds": 1.5,
           "phase_seconds": {}, "extra": {"predictions": [{"id": "q1", "prediction": "a headline", "gold": None}]}}
TASK = load_task("lamp4")


def _questions(n: int) -> list[dict]:
    """The first question of each of the first ``n`` users of the shipped sample's dev split."""
    firsts: dict[str, dict] = {}
    for question in json.loads((SAMPLE_DATA / "dev_questions.json").read_text()):
        firsts.setdefault(question["user_id"], question)
    return list(firsts.values())[:n]


def _golds(questions: list[dict]) -> dict:
    outputs = {g["id"]: g for g in json.loads((SAMPLE_DATA / "dev_outputs.json").read_text())["golds"]}
    return {"task": "LaMP_4", "golds": [outputs[q["id"]] for q in questions]}


@pytest.fixture
def registry(db_url: str):
    with Registry(db_url) as opened:
        yield opened


def test_a_run_without_golds_is_recorded_with_scores_none(registry):
    job = registry.create_job("lamp4", ["base"], ["u1"], {})
    run = registry.runs(job)[0]
    registry.mark_running(run.run_id)
    assert registry.record_success(run.run_id, METRICS, None)
    [row] = registry.results(job)
    assert (row["rouge1"], row["rougeL"], row["n_pos"]) == (None, None, 4)
    assert registry.extras(job)[("u1", "base")]["predictions"][0]["prediction"] == "a headline"


def test_one_score_without_the_other_is_refused(registry):
    job = registry.create_job("lamp4", ["base"], ["u1"], {})
    run = registry.runs(job)[0]
    registry.mark_running(run.run_id)
    with pytest.raises(ValueError, match="both"):
        registry.record_success(run.run_id, {**METRICS, "rouge1": 0.5}, None)
    assert registry.runs(job)[0].state == "running"


def test_a_version_3_registry_is_migrated_and_keeps_its_scores(db_url):
    """A registry made before scores could be absent (NOT NULL columns) takes runs without
    golds once opened, and its recorded scores survive the migration."""
    with Registry(db_url) as registry:
        job = registry.create_job("lamp4", ["base"], ["u1", "u2"], {})
        first, second = registry.runs(job)
    engine = create_engine(db_url)
    old = MetaData()
    UserRun.__table__.to_metadata(old)  # the metrics table's foreign key names it
    table = Metric.__table__.to_metadata(old)
    for column in ("rouge1", "rougeL"):
        table.c[column].nullable = False
    with engine.begin() as connection:
        Metric.__table__.drop(connection)
        old.create_all(connection, tables=[table], checkfirst=False)
        connection.execute(insert(table).values(run_id=first.run_id, rouge1=0.25, rougeL=0.2, n_pos=3, n_aux=0, seconds=1.0, phase_seconds={}))
        connection.execute(update(UserRun).where(UserRun.id == first.run_id).values(state="succeeded"))
        connection.execute(update(SchemaVersion).values(version=3))
    engine.dispose()

    with Registry(db_url) as registry:
        registry.mark_running(second.run_id)
        registry.record_success(second.run_id, METRICS, None)
        scores = {row["user_id"]: (row["rouge1"], row["rougeL"]) for row in registry.results(job)}
    assert scores == {"u1": (0.25, 0.2), "u2": (None, None)}
    engine = create_engine(db_url)
    with engine.connect() as connection:
        assert connection.scalar(select(SchemaVersion.version)) == SCHEMA_VERSION
        assert connection.scalar(select(Job.job_id)) == job
    engine.dispose()


def test_a_test_split_may_give_golds_to_some_users_only(tmp_path):
    questions = _questions(3)
    (tmp_path / "test_questions.json").write_text(json.dumps(questions))
    (tmp_path / "test_outputs.json").write_text(json.dumps(_golds(questions[:1])))
    rows = [{"user_id": q["user_id"], "input": q["input"], "profile": q["profile"]} for q in questions]
    rows[0]["output"] = "a gold"
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "test.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    for folder in (tmp_path, tmp_path / "rows"):
        users = load_split(folder, "test", TASK).users.values()
        assert [user.queries[0].gold is None for user in users] == [False, True, True]


@pytest.mark.parametrize("layout", ["lamp", "rows"])
def test_a_dev_split_missing_a_gold_is_refused_at_submit(layout, tmp_path, tiny_model_dir, monkeypatch, capsys):
    questions = _questions(2)
    if layout == "lamp":
        (tmp_path / "dev_questions.json").write_text(json.dumps(questions))
        (tmp_path / "dev_outputs.json").write_text(json.dumps(_golds(questions[:1])))
        hint = f"no gold for question {questions[1]['id']!r}"
    else:
        rows = [{"user_id": q["user_id"], "input": q["input"], "output": "gold", "profile": q["profile"]} for q in questions]
        del rows[1]["output"]
        (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
        hint = "line 2"
    monkeypatch.setenv("CBPO_ORCH_HOME", str(tmp_path / "home"))
    code, out, err = cli_in_process(monkeypatch, capsys, "submit", "--data", str(tmp_path), "--model", str(tiny_model_dir), *FAST_JOB)
    assert code == 2 and out == "" and "Traceback" not in err
    [line] = err.splitlines()
    assert line.startswith("error: ") and hint in line and "only a 'test' split" in line
    assert not (tmp_path / "home" / "registry.db").exists()
    with pytest.raises(DataError):
        load_split(tmp_path, "dev", TASK)


def test_a_job_mixing_users_with_and_without_golds_succeeds_and_records_every_prediction(tmp_path, tiny_model_dir):
    """LaMP's layout, a test split whose outputs file has the first user's gold only."""
    data = tmp_path / "lamp4"
    data.mkdir()
    questions = _questions(2)
    (data / "test_questions.json").write_text(json.dumps(questions))
    (data / "test_outputs.json").write_text(json.dumps(_golds(questions[:1])))
    (tmp_path / "home").mkdir()
    cli = Cli(tmp_path / "home")
    try:
        submitted = cli.run("submit", "--data", str(data), "--split", "test", "--users", "all", "--method", "base,sft",
                            "--model", str(tiny_model_dir), "--workers", "1", *FAST_JOB)
        job = ok_line(submitted)
        assert "gold: n/a" in " ".join(submitted.stdout.split())
        as_json, as_csv, table, aggregate = (cli.run("results", job, *args) for args in
                                             (["--format", "json"], ["--format", "csv"], [], ["--aggregate", "--format", "json"]))
    finally:
        cli.cleanup()
    rows = {(row["user_id"], row["method"]): row for row in json.loads(as_json.stdout)}
    scored, unscored = questions[0]["user_id"], questions[1]["user_id"]
    assert set(rows) == {(u, m) for u in (scored, unscored) for m in ("base", "sft")}
    for method in ("base", "sft"):
        assert 0.0 <= rows[(scored, method)]["rouge1"] <= 1.0
        assert rows[(unscored, method)]["rouge1"] is None and rows[(unscored, method)]["rougeL"] is None
    assert Path(rows[(unscored, "sft")]["adapter_path"], "predictions.jsonl").is_file()
    for line in csv.DictReader(io.StringIO(as_csv.stdout)):
        assert (line["rouge1"] == "n/a") == (line["user_id"] == unscored)
    assert table.stdout.count("n/a") == 4  # rouge1 and rougeL of the unscored user's two runs
    assert [(m["method"], m["users"], m["scored"]) for m in json.loads(aggregate.stdout)] == [("base", 2, 1), ("sft", 2, 1)]
    with Registry(f"sqlite:///{tmp_path / 'home' / 'registry.db'}") as registry:
        assert registry.job(job).state == "succeeded"
        extras = registry.extras(job)
    for user, question in ((scored, questions[0]), (unscored, questions[1])):
        [prediction] = extras[(user, "sft")]["predictions"]
        assert prediction["id"] == question["id"] and isinstance(prediction["prediction"], str)
    assert extras[(unscored, "sft")]["predictions"][0]["gold"] is None

    # serving answers the user without golds as the job recorded it
    from cbpo_orch.data.records import Query
    from cbpo_orch.orchestrator.workspace import Workspace
    from cbpo_orch.serving.catalog import load_catalog
    from cbpo_orch.serving.generator import BatchedGenerator, Row, load_user_adapter
    from cbpo_orch.training.encoding import prompt_ids
    from cbpo_orch.training.task_adapter import starting_model

    catalog = load_catalog(Workspace.open(tmp_path / "home"), job, "sft")
    assert set(catalog.servable) == {scored, unscored}
    loaded = starting_model(catalog.model_path, catalog.task_adapter, "cpu")
    adapter = load_user_adapter(unscored, catalog.adapter(unscored).adapter_path, catalog.lora, "cpu")
    ids = prompt_ids(loaded.tokenizer, catalog.task.prompt(Query("q", questions[1]["input"], None)), catalog.budgets.prompt_tokens)
    [served] = BatchedGenerator(loaded, catalog.lora, 1, catalog.task.decoding).generate([Row(ids, catalog.budgets.new_tokens, adapter)])
    assert served.text == extras[(unscored, "sft")]["predictions"][0]["prediction"]
