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


def _jobs(tmp_path, state: dict | None = None):
    args = type("Args", (), {"split": "dev", "task_adapter": "auto", "home": tmp_path / "home", "workers": 1,
                             "task": "lamp4", "data": tmp_path / "data", "model": tmp_path / "model"})()
    state_file = tmp_path / "state.json"
    if state is not None:
        state_file.write_text(quality.json.dumps(state))
    return quality.Jobs(args, state_file, quality.Ledger(tmp_path / "ledger.json"))


def _row(user, method, r1, gamma=None):
    return {"user_id": user, "method": method, "rouge1": r1, "rougeL": r1 / 2, "gamma": gamma, "adapter_path": None}


ARMS = {"sft": ("sft", {}), "cbpo": ("cbpo", {})}


def test_report_mode_reads_the_recorded_jobs_files_them_and_starts_nothing(tmp_path, monkeypatch):
    key = _jobs(tmp_path).key({"lr": "3e-3"}, 0)
    jobs = _jobs(tmp_path, {key: [{"job": "j1", "users": ["a", "b"], "methods": ["sft", "cbpo"]}]})
    monkeypatch.setattr(quality.subprocess, "Popen", None)  # report mode must not submit
    asked = []
    jobs.results = lambda job: asked.append(job) or [_row("a", "sft", 0.2), _row("a", "cbpo", 0.3, 0.4)]
    per_arm = quality.run_arms(jobs, ARMS, ["a", "b"], {"lr": "3e-3"}, 0, submit=False)
    assert asked == ["j1"]  # both arms share one options group, so one job
    assert per_arm["cbpo"] == {"a": {"rouge1": 0.3, "rougeL": 0.15, "gamma": 0.4}} and list(per_arm["sft"]) == ["a"]
    assert quality.run_arms(jobs, ARMS, ["a", "b"], {"lr": "1e-3"}, 0, submit=False) == {"sft": {}, "cbpo": {}}
    filed = quality.json.loads((tmp_path / "ledger.json").read_text())
    assert filed == {key: {"cbpo/a": {"job": "j1", "scores": {"rouge1": 0.3, "rougeL": 0.15, "gamma": 0.4}},
                           "sft/a": {"job": "j1", "scores": {"rouge1": 0.2, "rougeL": 0.1, "gamma": None}}}}


class FakeSubmit:
    """``subprocess.Popen`` of ``cbpo-orch submit``: records the command, prints a job id."""

    def __init__(self, commands: list):
        self.commands = commands

    def __call__(self, command, **_):
        self.commands.append(command)
        self.stdout = type("Out", (), {"readline": lambda _: "j2\n"})()
        return self

    def communicate(self):
        return None


def test_a_later_session_trains_only_the_runs_its_ledger_lacks(tmp_path, monkeypatch):
    first = _jobs(tmp_path, {})
    key = first.key({}, 0)
    first.ledger.file(key, "j1", [_row("a", "sft", 0.2), _row("a", "cbpo", 0.3, 0.4), _row("b", "sft", 0.1)])

    later = _jobs(tmp_path, {})  # a fresh home: no job state, only the committed ledger
    assert later.ledger.scores(key)[("a", "cbpo")] == {"rouge1": 0.3, "rougeL": 0.15, "gamma": 0.4}
    commands = []
    monkeypatch.setattr(quality.subprocess, "Popen", FakeSubmit(commands))
    monkeypatch.setattr(quality, "TASK_ADAPTERS", tmp_path / "pinned")
    later.results = lambda job: {"j2": [_row("b", "cbpo", 0.5, 0.1)]}[job]
    per_arm = quality.run_arms(later, ARMS, ["a", "b"], {}, 0)

    [command] = commands
    assert command[command.index("--users") + 1] == "b" and command[command.index("--method") + 1] == "cbpo"
    assert per_arm["cbpo"]["b"]["rouge1"] == 0.5 and per_arm["sft"]["a"]["rouge1"] == 0.2
    assert set(quality.Ledger(tmp_path / "ledger.json").scores(key)) == {("a", "sft"), ("a", "cbpo"), ("b", "sft"), ("b", "cbpo")}


def _adapter(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_text(text)
    return folder


def test_a_cancelled_job_is_not_resumed_and_its_unfinished_runs_go_to_a_new_job(tmp_path, monkeypatch):
    key = _jobs(tmp_path).key({}, 0)
    jobs = _jobs(tmp_path, {key: [{"job": "j1", "users": ["a", "b"], "methods": ["sft"]}]})
    asked = []

    def run(command, **_):
        asked.append(command[len(quality.CLI)])
        return type("Done", (), {"stdout": quality.json.dumps([{"state": "cancelled"}])})()

    commands = []
    monkeypatch.setattr(quality.subprocess, "run", run)
    monkeypatch.setattr(quality.subprocess, "Popen", FakeSubmit(commands))
    monkeypatch.setattr(quality, "TASK_ADAPTERS", tmp_path / "pinned")
    jobs.results = lambda job: {"j1": [_row("a", "sft", 0.2)], "j2": [_row("b", "sft", 0.3)]}[job]
    per_arm = quality.run_arms(jobs, {"sft": ("sft", {})}, ["a", "b"], {}, 0)
    assert asked == ["status"], "a cancelled job is not resumed"  # its finished run of a is kept
    [command] = commands
    assert command[command.index("--users") + 1] == "b"
    assert {user: scores["rouge1"] for user, scores in per_arm["sft"].items()} == {"a": 0.2, "b": 0.3}


def test_task_adapters_are_pinned_both_ways_and_a_different_one_stops_the_benchmark(tmp_path):
    home, committed = tmp_path / "home", tmp_path / "committed"
    local = home / "artifacts" / "task-adapters"
    _adapter(local / ("a" * 24), "trained here")
    _adapter(committed / ("b" * 24), "committed")
    _adapter(local / ("b" * 24), "committed")
    _adapter(local / (("c" * 24) + ".staging"), "half written")
    quality.pin_task_adapters(home, committed)
    assert (committed / ("a" * 24) / "adapter_model.safetensors").read_text() == "trained here"
    assert sorted(p.name for p in committed.iterdir()) == ["a" * 24, "b" * 24]

    (local / ("b" * 24) / "adapter_model.safetensors").write_text("trained again, differently")
    with pytest.raises(SystemExit, match="differs from the committed"):
        quality.pin_task_adapters(home, committed)
    assert (committed / ("b" * 24) / "adapter_model.safetensors").read_text() == "committed"


def test_a_fresh_home_adopts_the_committed_task_adapter(tmp_path):
    _adapter(tmp_path / "committed" / ("d" * 24), "committed")
    quality.pin_task_adapters(tmp_path / "home", tmp_path / "committed")
    assert (tmp_path / "home" / "artifacts" / "task-adapters" / ("d" * 24) / "adapter_model.safetensors").read_text() == "committed"


def test_tune_report_files_finished_runs_and_leaves_out_a_point_that_lacks_a_user(tmp_path, monkeypatch, capsys):
    probe = _jobs(tmp_path)
    on, off = probe.key({"lr": "3e-3", "selection": "on"}, 0), probe.key({"lr": "3e-3", "selection": "off"}, 0)
    jobs = _jobs(tmp_path, {on: [{"job": "j1", "users": ["a", "b"], "methods": ["sft"]}],
                            off: [{"job": "j2", "users": ["a", "b"], "methods": ["sft"]}]})
    monkeypatch.setattr(quality.subprocess, "Popen", None)  # a report submits nothing
    jobs.results = lambda job: {"j1": [_row("a", "sft", 0.2), _row("b", "sft", 0.4)], "j2": [_row("a", "sft", 0.9)]}[job]
    rows = quality.tune_rows(jobs, {"selection": "on,off"}, {"lr": "3e-3"}, ["sft"], ["a", "b"], [0], submit=False)
    assert rows == [{"options": {"lr": "3e-3", "selection": "on"}, "method": "sft", "rouge1": pytest.approx(0.3), "rougeL": pytest.approx(0.15)}]
    assert "partial: 1 of 2 users finished" in capsys.readouterr().out
    filed = quality.json.loads((tmp_path / "ledger.json").read_text())
    assert set(filed[off]) == {"sft/a"}, "the unfinished point's finished run is filed for the next session"


def test_tune_without_a_grid_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["tune", "--task", "lamp4", "--data", str(tmp_path), "--model", str(tmp_path), "--home", str(tmp_path / "h")])
    assert exit_info.value.code == 2 and "tune needs at least one --grid" in capsys.readouterr().err


def test_missing_runs_never_ask_again_for_a_finished_run():
    covered = {("a", "cbpo"), ("b", "cbpo")}
    jobs = quality.missing_runs(["a", "b", "c"], ["sft", "kto", "cbpo"], covered)
    assert jobs == [(["a", "b", "c"], ["sft", "kto"]), (["c"], ["cbpo"])]
    asked = {(u, m) for users, methods in jobs for u in users for m in methods}
    assert not asked & covered and len(asked) == 7
    assert quality.missing_runs(["a"], ["cbpo"], covered) == []


def test_validation_users_are_drawn_at_random_below_the_largest_and_never_reported():
    sizes = {f"u{i}": size for i, size in enumerate([5, 300, 12, 40, 41, 8, 60, 9, 1000, 30, 2])}
    validation, report = quality.draw_validation(sizes, 3, min_items=5)
    assert len(validation) == 3 and not set(validation) & set(report)
    assert set(validation) | set(report) == {u for u, s in sizes.items() if s >= 5}  # u10 has 2 items
    assert "u8" not in validation and all(sizes[u] <= 300 for u in validation)  # 90th percentile of 10 users: 300
    assert validation != ["u0", "u1", "u2"]  # not the first users of the file
    assert quality.draw_validation(sizes, 3, min_items=5) == (validation, report)
    assert quality.draw_validation(sizes, 3, min_items=5, n_report=2)[1] == report[:2]


def test_summarize_gives_cis_against_base_steps_and_the_share_of_outputs_at_the_budget():
    def run(r1, steps, hit, scored=10):
        return {**scores(r1), "steps": steps, "hit_budget": hit, "n_scored": scored}

    per_seed = {0: {"base": {"a": run(0.2, 0, 1), "b": run(0.4, 0, 3)}, "sft": {"a": run(0.3, 6, 0), "b": run(0.5, 10, 1)}}}
    arms = quality.summarize(per_seed, ["a", "b"])["arms"]
    assert arms["sft"]["ci_vs_base"]["rouge1"] == pytest.approx([0.1, 0.1])
    assert arms["sft"]["steps_mean"] == 8 and arms["sft"]["items_mean"] == 10
    assert arms["base"]["hit_budget_share"] == pytest.approx(4 / 20)
    table = quality.markdown(quality.summarize(per_seed, ["a", "b"]), "t")
    assert "+0.1000 [+0.1000, +0.1000]" in table and "| 20% |" in table


def test_two_benchmarks_filing_into_one_ledger_at_once_keep_each_others_runs(tmp_path):
    tune, run = quality.Ledger(tmp_path / "ledger.json"), quality.Ledger(tmp_path / "ledger.json")  # both read it before either wrote
    tune.file("tune-group", "j1", [_row("a", "sft", 0.2)])
    run.file("run-group", "j2", [_row("b", "cbpo", 0.3, 0.4)])
    tune.file("tune-group", "j1", [_row("a", "sft", 0.2), _row("c", "sft", 0.1)])
    filed = quality.Ledger(tmp_path / "ledger.json")
    assert set(filed.scores("tune-group")) == {("a", "sft"), ("c", "sft")} and set(filed.scores("run-group")) == {("b", "cbpo")}
