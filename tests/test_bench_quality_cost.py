"""The quality benchmark names each arm's cost (issue 29): a run's seconds go into the ledger,
and the report gives each arm's mean seconds per user."""

from __future__ import annotations

from bench import quality


def test_the_ledger_keeps_each_runs_seconds_and_the_table_gives_each_arms_seconds_per_user(tmp_path):
    ledger = quality.Ledger(tmp_path / "runs.json")
    rows = [{"user_id": user, "method": method, "rouge1": r1, "rougeL": r1, "gamma": None, "adapter_path": None, "seconds": seconds}
            for user, method, r1, seconds in (("a", "sft", 0.3, 40.0), ("b", "sft", 0.5, 60.0), ("a", "rag", 0.2, 9.0), ("b", "rag", 0.4, 11.0))]
    ledger.file("group", "job1", rows)
    found = quality.Ledger(tmp_path / "runs.json").scores("group")
    assert found[("a", "rag")]["seconds"] == 9.0

    per_seed = {0: {method: {user: found[(user, method)] for user in "ab"} for method in ("sft", "rag")}}
    summary = quality.summarize(per_seed, ["a", "b"])
    assert summary["arms"]["sft"]["seconds_mean"] == 50.0 and summary["arms"]["rag"]["seconds_mean"] == 10.0
    table = quality.markdown(summary, "t")
    assert "| s / user |" in table and "| 10.0 |" in table and "| 50.0 |" in table
