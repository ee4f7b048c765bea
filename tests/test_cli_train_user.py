"""`cbpo-orch train-user`: one user end to end, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
from peft import PeftModel

from cbpo_orch.home import SAMPLE_DATA
from cbpo_orch.training.models import load_model
from tests.helpers import bad_questions, cli_in_process, train_args



def test_train_user_writes_adapter_and_metrics(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CBPO_ORCH_HOME", str(tmp_path / "home"))
    out = tmp_path / "out"
    code, stdout, stderr = cli_in_process(monkeypatch, capsys, *train_args(SAMPLE_DATA, tiny_model_dir, out, "--method", "cbpo", "--selection"))
    assert code == 0, stderr
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "predictions.jsonl", "trainer_state.json"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("rouge1", "rougeL", "gamma", "n_pos", "n_aux", "train_seconds", "method", "config"):
        assert key in metrics
    assert metrics["method"] == "cbpo" and metrics["n_pos"] == 6 and metrics["n_aux"] == 6  # 2 of 8 held out for selection
    assert metrics["selection"]["n_held_out"] == 2 and len(metrics["selection"]["validation_logp"]) == 2
    assert 0 <= metrics["gamma"] <= 0.9
    PeftModel.from_pretrained(load_model(tiny_model_dir, "cpu").model, str(out))
    assert "ROUGE-1" in stdout


def _drop_title(records):
    del records[0]["profile"][0]["title"]
    return json.dumps(records)


def _empty_profile(records):
    for r in records:
        if r["user_id"] == records[0]["user_id"]:
            r["profile"] = []
    return json.dumps(records)


def _duplicate_question(records):
    records[1]["id"] = records[0]["id"]
    return json.dumps(records)


def _unsafe_id(records):
    for r in records:
        if r["user_id"] == records[0]["user_id"]:
            r["user_id"] = "../escape"
    return json.dumps(records)


@pytest.mark.parametrize(
    "mutate, message",
    [
        ("{ not json", "not valid JSON"),
        (_drop_title, "title"),
        (_empty_profile, "empty"),
        (_duplicate_question, "duplicate"),
        (_unsafe_id, "escape"),
    ],
    ids=["not-json", "missing-field", "empty-profile", "duplicate-id", "unsafe-id"],
)
def test_bad_data_files_fail_clearly_and_write_nothing(mutate, message, tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    bad_questions(data, mutate)
    out = tmp_path / "out"
    code, stdout, stderr = cli_in_process(monkeypatch, capsys, *train_args(data, tiny_model_dir, out))
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "dev_questions.json" in lines[0] and message in lines[0], stderr
    assert "Traceback" not in stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "dpo"], "unknown method 'dpo'"),
        (["--gamma", "1.5"], "gamma must be in [0, 1)"),
        (["--gamma", "high"], "gamma must be 'auto' or a number"),
        (["--aux-strategy", "closest"], "aux-strategy"),
        (["--lr", "inf"], "lr must be a finite number > 0"),
        (["--lr", "nan"], "lr must be a finite number > 0"),
        (["--beta", "inf"], "beta must be a finite number > 0"),
        (["--aux-ratio", "inf"], "aux-ratio must be a finite number > 0"),
        (["--seed", "-1"], "seed must be in [0, 2^32)"),
        (["--seed", str(2**32)], "seed must be in [0, 2^32)"),
    ],
)
def test_bad_options_fail_clearly(extra, message, tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, _, stderr = cli_in_process(monkeypatch, capsys, *train_args(SAMPLE_DATA, tiny_model_dir, out, *extra))
    assert code == 2 and stderr.startswith("error: ") and message in stderr, stderr
    assert not out.exists()


def test_unknown_user_missing_model_and_used_output_fail_clearly(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = train_args(SAMPLE_DATA, tiny_model_dir, out)
    args[args.index("--user") + 1] = "nobody"
    code, _, stderr = cli_in_process(monkeypatch, capsys, *args)
    assert code == 2 and "no user 'nobody'" in stderr

    code, _, stderr = cli_in_process(monkeypatch, capsys, *train_args(SAMPLE_DATA, tmp_path / "no-model", out))
    assert code == 2 and "no-model" in stderr and "not a folder" in stderr

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, stderr = cli_in_process(monkeypatch, capsys, *train_args(SAMPLE_DATA, tiny_model_dir, out))
    assert code == 2 and "already exists" in stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
