"""Hostile or broken input, through the real CLI: one ``error:`` line, exit code 2, nothing
written, never a traceback. Plus properties over arbitrary ids and records: they load or
raise DataError, and a loaded user's artifact path is one component of its job's folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cbpo_orch.data.dataset import DataError, load_split
from cbpo_orch.data.tasks import load_task
from cbpo_orch.home import SAMPLE_DATA
from cbpo_orch.orchestrator.workspace import ARTIFACTS_ENV, DB_ENV
from cbpo_orch.storage.artifacts import ArtifactStore
from tests.helpers import FAST_TRAIN_USER, bad_questions, cli_in_process, train_args

LAMP4 = load_task("lamp4")
ITEM = {"id": "a", "text": "An article.", "title": "A Title"}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A home folder (not created) that every in-process CLI call uses, and no other registry."""
    folder = tmp_path / "home"
    monkeypatch.setenv("CBPO_ORCH_HOME", str(folder))
    for name in (DB_ENV, ARTIFACTS_ENV):
        monkeypatch.delenv(name, raising=False)
    return folder


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


def error_line(code: int, out: str, err: str) -> str:
    """The one ``error:`` line of a refused command (exit code 2, no traceback, no output)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and out == "", err
    return lines[0]


# ───────────────────────────── the registry URL ─────────────────────────────

SHAPES = "(e.g. sqlite:///PATH or postgresql+psycopg://USER@HOST/DB)"


@pytest.mark.parametrize(
    "url, message",
    [
        ("notaurl://x", f"error: registry URL notaurl://x: unknown database dialect 'notaurl' {SHAPES}"),
        ("://", f"error: the registry URL is not a SQLAlchemy URL {SHAPES}"),
        ("postgresql+psycopg://u@host:port/x", f"error: the registry URL is not a SQLAlchemy URL {SHAPES}"),
    ],
    ids=["unknown-dialect", "unparsable", "port-not-a-number"],
)
def test_bad_registry_url_is_one_line(url, message, home, monkeypatch, capsys):
    assert error_line(*cli_in_process(monkeypatch, capsys, "status", "--db", url)) == message
    assert not home.exists()


def test_missing_postgres_driver_says_which_extra_to_install(home, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg were not installed
    line = error_line(*cli_in_process(monkeypatch, capsys, "status", "--db", "postgresql+psycopg://u:s3cret@127.0.0.1:1/x"))
    assert line.startswith("error: registry URL postgresql+psycopg://u:***@127.0.0.1:1/x: its database driver is not installed (")
    assert line.endswith("; pip install 'cbpo-orch[postgres]' and use a postgresql+psycopg:// URL") and "s3cret" not in line
    assert not home.exists()


def test_unreachable_server_is_one_line_without_the_password(home, monkeypatch, capsys):
    pytest.importorskip("psycopg")
    line = error_line(*cli_in_process(monkeypatch, capsys, "status", "--db", "postgresql+psycopg://u:s3cret@127.0.0.1:1/x"))
    assert line.startswith("error: cannot open the registry at postgresql+psycopg://u:***@127.0.0.1:1/x: connection failed")
    assert "s3cret" not in line
    assert not home.exists()


def test_sqlite_registry_under_a_file_is_one_line(a_file, home, monkeypatch, capsys):
    line = error_line(*cli_in_process(monkeypatch, capsys, "status", "--db", f"sqlite:///{a_file}/registry.db"))
    assert line == f"error: cannot open the registry at sqlite:///{a_file}/registry.db: [Errno 17] File exists: '{a_file}'"
    assert a_file.read_text() == "not a folder"


# ───────────────────────────── home, artifact and output folders ─────────────────────────────


@pytest.mark.parametrize("how", ["--home", "env", "--home below"])
def test_home_that_is_a_file_is_one_line(how, a_file, home, monkeypatch, capsys):
    chosen = a_file / "sub" if how.endswith("below") else a_file
    if how == "env":
        monkeypatch.setenv("CBPO_ORCH_HOME", str(chosen))
    argv = ["status"] if how == "env" else ["status", "--home", str(chosen)]
    line = error_line(*cli_in_process(monkeypatch, capsys, *argv))
    assert line == f"error: home folder {chosen} cannot be a folder: {a_file} is a file"
    assert a_file.read_text() == "not a folder"


def test_submit_with_artifacts_under_a_file_writes_no_job(a_file, home, tiny_model_dir, monkeypatch, capsys):
    argv = ["submit", "--model", str(tiny_model_dir), "--users", "1", "--method", "sft", "--artifacts", str(a_file / "artifacts"), *FAST_TRAIN_USER]
    line = error_line(*cli_in_process(monkeypatch, capsys, *argv))
    assert line == f"error: artifact folder {a_file / 'artifacts'} cannot be a folder: {a_file} is a file"
    assert not home.exists()


def test_train_user_with_out_under_a_file_is_refused_before_training(a_file, home, tiny_model_dir, monkeypatch, capsys):
    line = error_line(*cli_in_process(monkeypatch, capsys, *train_args(SAMPLE_DATA, tiny_model_dir, a_file / "out")))
    assert line == f"error: folder of --out {a_file} cannot be a folder: {a_file} is a file"


def _as_unprivileged(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess that honours folder permissions: as root (who writes into
    read-only folders) without the capabilities that let it, via setpriv."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("runs as root, which may write into read-only folders, and setpriv (to drop that) is missing")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    env = {k: v for k, v in os.environ.items() if k not in (DB_ENV, ARTIFACTS_ENV, "CBPO_ORCH_HOME")}
    return subprocess.run([*prefix, sys.executable, "-m", "cbpo_orch", *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_read_only_home_and_artifact_folders_are_one_line(tmp_path):
    read_only, home = tmp_path / "read-only", tmp_path / "home"
    read_only.mkdir()
    home.mkdir()
    read_only.chmod(0o555)

    done = _as_unprivileged(tmp_path, "status", "--home", str(read_only))
    line = error_line(done.returncode, done.stdout, done.stderr)
    assert line == f"error: cannot open the registry at sqlite:///{read_only}/registry.db: unable to open database file"

    done = _as_unprivileged(tmp_path, "resume", "somejob", "--home", str(home), "--artifacts", str(read_only / "artifacts"))
    line = error_line(done.returncode, done.stdout, done.stderr)
    assert line == f"error: artifact folder {read_only / 'artifacts'} is not writable: {read_only} is read-only"
    assert list(read_only.iterdir()) == [] and list(home.iterdir()) == []


# ───────────────────────────── data files ─────────────────────────────


FIRST_QUESTION = json.loads((SAMPLE_DATA / "dev_questions.json").read_text())[0]["id"]
ID_RULE = "letters, digits, '.', '_', '-' only, not starting with '.' or '-', at most 128 characters"


def _bad_data(tmp_path: Path, content) -> tuple[Path, Path]:
    """The shipped sample with its dev questions replaced or mutated (see bad_questions), and
    an output folder that must not appear."""
    data = tmp_path / "data"
    bad_questions(data, content)
    return data / "dev_questions.json", tmp_path / "out"


def _lone_surrogate_input(records):
    records[0]["input"] = "Generate a headline for the following article: \ud800"
    return json.dumps(records)  # written as the escape \ud800, valid JSON syntax but not text


@pytest.mark.parametrize(
    "content, message",
    [
        ("[" * 100_000, "unreadable JSON (maximum recursion depth exceeded"),
        ('[{"id": ' + "1" * 5000 + "}]", "unreadable JSON (Exceeds the limit (4300 digits) for integer string conversion"),
        (_lone_surrogate_input, f"record 0 (id {FIRST_QUESTION!r}): field 'input' holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text"),
    ],
    ids=["deep-nesting", "huge-number", "lone-surrogate"],
)
def test_unreadable_data_is_one_line(content, message, tiny_model_dir, tmp_path, home, monkeypatch, capsys):
    questions, out = _bad_data(tmp_path, content)
    line = error_line(*cli_in_process(monkeypatch, capsys, *train_args(questions.parent, tiny_model_dir, out)))
    assert line.startswith(f"error: {questions}: {message}"), line
    assert not out.exists()


@pytest.mark.parametrize("user_id", ["-x", "a/b", "..", "a\x00b", "a\x07\nb", "x" * 5000], ids=["dash", "slash", "dotdot", "nul", "control", "5000-chars"])
def test_unsafe_user_id_is_one_line(user_id, tiny_model_dir, tmp_path, home, monkeypatch, capsys):
    def mutate(records):
        first = records[0]["user_id"]
        for record in records:
            if record["user_id"] == first:
                record["user_id"] = user_id
        return json.dumps(records)

    questions, out = _bad_data(tmp_path, mutate)
    line = error_line(*cli_in_process(monkeypatch, capsys, *train_args(questions.parent, tiny_model_dir, out)))
    assert line == f"error: {questions}: record 0 (id {FIRST_QUESTION!r}): id {user_id!r} is unsafe as a file name ({ID_RULE})"
    assert not out.exists()


def test_invalid_utf8_is_one_line(tiny_model_dir, tmp_path, home, monkeypatch, capsys):
    questions, out = _bad_data(tmp_path, "")
    questions.write_bytes(b'[{"id": "q\xff"}]')
    line = error_line(*cli_in_process(monkeypatch, capsys, *train_args(questions.parent, tiny_model_dir, out)))
    assert line == f"error: {questions}: cannot read ('utf-8' codec can't decode byte 0xff in position 10: invalid start byte)"
    assert not out.exists()


# ───────────────────────────── model folders that are not causal LMs ─────────────────────────────


def _model_folder(tiny_model_dir: Path, folder: Path, kind: str) -> Path:
    """The tiny model's tokenizer with the config (and random weights) of another kind of model."""
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("config.json", "*.safetensors"))
    if kind == "bert":
        from transformers import BertConfig, BertLMHeadModel

        config = BertConfig(vocab_size=700, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        BertLMHeadModel(config).save_pretrained(folder)
    elif kind == "t5":
        from transformers import T5Config

        T5Config(vocab_size=700, d_model=32, d_ff=64, num_layers=1, num_heads=2).save_pretrained(folder)
    else:
        (folder / "config.json").write_text("{ not json")
    return folder


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("bert", "no module of the model matches the LoRA targets ['q_proj', 'v_proj']"),
        ("t5", "Unrecognized configuration class <class 'transformers.models.t5.configuration_t5.T5Config'> for this kind of AutoModel: AutoModelForCausalLM."),
        ("bad-json", "It looks like the config file at '{folder}/config.json' is not a valid JSON file."),
    ],
    ids=["bert", "t5", "bad-json"],
)
def test_model_that_is_not_a_causal_lm_is_one_line(kind, reason, tiny_model_dir, tmp_path, home, monkeypatch, capsys):
    model, out = _model_folder(tiny_model_dir, tmp_path / kind, kind), tmp_path / "out"
    line = error_line(*cli_in_process(monkeypatch, capsys, *train_args(SAMPLE_DATA, model, out)))
    assert line == f"error: model {str(model)!r} cannot be personalized: {reason.format(folder=model)}"
    assert not out.exists() and not home.exists()


# ───────────────────────────── properties over ids and records ─────────────────────────────

ID_CHARS = st.one_of(st.sampled_from("aZ09._-/\\ \x00\n\t@+=é"), st.characters(exclude_categories=()))
IDS = st.text(ID_CHARS, max_size=140)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(ID_CHARS, max_size=30))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
FIELD_VALUES = st.one_of(JSON_SCALARS, JSON_VALUES)
PROFILE_ITEM = st.fixed_dictionaries({}, optional={"id": FIELD_VALUES, "text": FIELD_VALUES, "title": FIELD_VALUES, "date": FIELD_VALUES})
RECORD = st.fixed_dictionaries(
    {},
    optional={
        "id": FIELD_VALUES,
        "user_id": FIELD_VALUES,
        "author": FIELD_VALUES,
        "input": FIELD_VALUES,
        "output": FIELD_VALUES,
        "profile": st.one_of(FIELD_VALUES, st.lists(st.one_of(PROFILE_ITEM, FIELD_VALUES), max_size=3)),
    },
)
FAST_PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _write_split(folder: Path, layout: str, records: list) -> None:
    """Write ``records`` as split 'dev' in one of the layouts a data folder may have."""
    if layout == "lamp":
        golds = [{"id": r["id"], "output": "gold"} for r in records if isinstance(r, dict) and isinstance(r.get("id"), str)]
        (folder / "dev_questions.json").write_text(json.dumps(records))
        (folder / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_4", "golds": golds}))
    elif layout == "rows":
        (folder / "dev.json").write_text(json.dumps(records))
    else:
        (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _load_or_data_error(layout: str, records: list):
    """The loaded split, or None where load_split raised DataError (any other exception fails)."""
    with tempfile.TemporaryDirectory() as folder:
        _write_split(Path(folder), layout, records)
        try:
            return load_split(folder, "dev", LAMP4)
        except DataError as error:
            assert "\n" not in str(error)
            return None


@FAST_PROPERTY
@given(layout=st.sampled_from(["lamp", "rows", "jsonl"]), user_id=IDS)
@example(layout="lamp", user_id="-x")
@example(layout="rows", user_id="-x")
@example(layout="rows", user_id="\ud800")
@example(layout="rows", user_id="x" * 5000)
def test_any_user_id_loads_or_is_a_data_error_and_its_adapter_stays_in_the_job_folder(layout, user_id):
    key = "user_id" if layout == "lamp" else "author"
    record = {"id": "q1", key: user_id, "input": "Generate a headline for the following article: x", "output": "o", "profile": [ITEM]}
    dataset = _load_or_data_error(layout, [record])
    if dataset is None:
        return
    with tempfile.TemporaryDirectory() as root:
        store = ArtifactStore(root)
        job = store.root / "adapters" / "job1"
        for user in dataset.users:
            info = store.write_dir(f"adapters/job1/{user}/cbpo/attempt-1", {"adapter_config.json": b"{}"})
            assert info.path == job / user / "cbpo" / "attempt-1"


@FAST_PROPERTY
@given(layout=st.sampled_from(["lamp", "rows", "jsonl"]), records=st.lists(st.one_of(RECORD, FIELD_VALUES), max_size=3))
def test_any_records_load_or_are_a_data_error(layout, records):
    dataset = _load_or_data_error(layout, records)
    if dataset is not None:
        for user in dataset.users.values():
            assert all(isinstance(q.input, str) for q in user.queries)
            if user.profile:
                dataset.examples(user.id)


@FAST_PROPERTY
@given(user_id=IDS)
@example(user_id="..")
@example(user_id="../../etc")
@example(user_id="/abs")
def test_an_artifact_path_for_any_id_is_refused_or_inside_the_job_folder(user_id):
    with tempfile.TemporaryDirectory() as root:
        store = ArtifactStore(root)
        try:
            info = store.write_dir(f"adapters/job1/{user_id}/cbpo/attempt-1", {"adapter_config.json": b"{}"})
        except ValueError:
            assert not (store.root / "adapters").exists()
            return
        assert info.path.resolve().is_relative_to(store.root / "adapters" / "job1")
