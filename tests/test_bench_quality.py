"""bench/quality.py's report math: seeds are averaged per user before the CIs over users."""

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("quality", Path(__file__).parent.parent / "bench" / "quality.py")
quality = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(quality)


def scores(r1: float, gamma: float | None = None) -> dict:
    return {"rouge1": r1, "rougeL": r1 / 2, "gamma": gamma}


def test_average_seeds_means_each_user_over_seeds_and_drops_incomplete_users():
    per_seed = {
        0: {"sft": {"a": scores(0.2), "b": scores(0.4)}, "cbpo": {"a": scores(0.3, 0.5), "b": scores(0.1, 0.2)}},
        1: {"sft": {"a": scores(0.4)}, "cbpo": {"a": scores(0.5, 0.7), "b": scores(0.3, 0.4)}},
    }
    averaged = quality.average_seeds(per_seed)
    assert averaged["sft"] == {"a": pytest.approx({"rouge1": 0.3, "rougeL": 0.15})}
    assert averaged["cbpo"]["a"] == pytest.approx({"rouge1": 0.4, "rougeL": 0.2, "gamma": 0.6})
    assert averaged["cbpo"]["b"] == pytest.approx({"rouge1": 0.2, "rougeL": 0.1, "gamma": 0.3})


def test_summarize_reports_seed_means_and_uses_only_users_every_arm_has():
    per_seed = {
        0: {"sft": {"a": scores(0.2), "b": scores(0.4), "c": scores(0.1)}, "cbpo": {"a": scores(0.3, 0.5), "b": scores(0.5, 0.2), "c": scores(0.2, 0.1)}},
        1: {"sft": {"a": scores(0.4), "b": scores(0.2), "c": scores(0.3)}, "cbpo": {"a": scores(0.5, 0.7), "b": scores(0.3, 0.4)}},
    }
    summary = quality.summarize(per_seed, ["a", "b", "c"])
    assert summary["users"] == ["a", "b"] and summary["seeds"] == [0, 1]
    cbpo = summary["arms"]["cbpo"]
    assert cbpo["rouge1"] == pytest.approx((0.4 + 0.4) / 2)
    assert cbpo["per_seed"][0]["rouge1"] == pytest.approx((0.3 + 0.5) / 2)
    assert cbpo["per_seed"][1]["rouge1"] == pytest.approx((0.5 + 0.3) / 2)
    assert summary["arms"]["sft"]["rouge1"] == pytest.approx((0.3 + 0.3) / 2)
    lo, hi = cbpo["ci_vs_sft"]["rouge1"]
    assert lo <= cbpo["rouge1"] - summary["arms"]["sft"]["rouge1"] <= hi
    assert "seeds 0, 1" in quality.markdown(summary, "t")


def test_a_bad_seeds_list_is_a_usage_error_not_a_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["run", "--task", "lamp4", "--data", "d", "--model", "m", "--seeds", "0,one"])
    assert exit_info.value.code == 2
    assert "expected comma-separated integers, got '0,one'" in capsys.readouterr().err


def test_cli_flags_turn_on_and_off_into_switches():
    assert quality.cli_flags({"selection": "off", "lr": "3e-3", "gamma": "on"}) == ["--gamma", "--lr", "3e-3", "--no-selection"]


def test_summarize_counts_users_below_base_and_kept_starting_models():
    def run(r1, epoch=None):
        return {**scores(r1), **({} if epoch is None else {"selected_epoch": epoch})}

    per_seed = {0: {"base": {"a": run(0.2), "b": run(0.4)}, "sft": {"a": run(0.3, 2), "b": run(0.4, 0)}, "cbpo": {"a": run(0.1, 1), "b": run(0.3, 3)}}}
    arms = quality.summarize(per_seed, ["a", "b"])["arms"]
    assert [arms[a]["users_below_base"] for a in ("base", "sft", "cbpo")] == [0, 0, 2]
    assert arms["sft"]["selected_start_share"] == 0.5 and arms["cbpo"]["selected_start_share"] == 0.0
    assert "selected_start_share" not in arms["base"]


def test_report_mode_reads_the_recorded_jobs_and_starts_nothing(tmp_path):
    args = type("Args", (), {"split": "dev", "task_adapter": "auto"})()
    state_file = tmp_path / "state.json"
    jobs = quality.Jobs(args, state_file)
    key = jobs.key({"lr": "3e-3"}, 0)
    state_file.write_text(quality.json.dumps({key: [{"job": "j1", "users": ["a", "b"], "methods": ["sft", "cbpo"]}]}))
    jobs = quality.Jobs(args, state_file)

    def never(*_):
        raise AssertionError("report mode must not submit or resume")

    asked = []
    jobs.run = never
    rows = {"j1": [
        {"user_id": "a", "method": "sft", "rouge1": 0.2, "rougeL": 0.1, "gamma": None, "adapter_path": None},
        {"user_id": "a", "method": "cbpo", "rouge1": 0.3, "rougeL": 0.2, "gamma": 0.4, "adapter_path": None},
    ]}
    jobs.results = lambda ids: asked.append(ids) or [row for job in ids for row in rows[job]]
    arms = {"sft": ("sft", {}), "cbpo": ("cbpo", {})}
    per_arm = quality.run_arms(jobs, arms, ["a", "b"], {"lr": "3e-3"}, 0, submit=False)
    assert asked == [["j1"]]  # both arms share one options group, so one job
    assert per_arm["cbpo"] == {"a": {"rouge1": 0.3, "rougeL": 0.2, "gamma": 0.4}} and list(per_arm["sft"]) == ["a"]
    assert quality.run_arms(jobs, arms, ["a", "b"], {"lr": "1e-3"}, 0, submit=False) == {"sft": {}, "cbpo": {}}
