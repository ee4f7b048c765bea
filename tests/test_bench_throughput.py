"""bench/throughput.py end to end on a tiny random-weight shape: its check finds packed and
alone training equal, and its report has the documented JSON contract."""

import importlib.util
import json
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("throughput", Path(__file__).parent.parent / "bench" / "throughput.py")
throughput = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(throughput)


def test_throughput_report_and_check_on_cpu(tmp_path):
    assert throughput.main(["--shape", "tiny", "--users", "4", "--device", "cpu", "--check", "--out", str(tmp_path)]) == 0
    [report_file] = tmp_path.glob("throughput-cpu-tiny-random-weights.json")
    report = json.loads(report_file.read_text())
    assert {"device", "model", "users", "single", "multi", "ratio", "check"} <= report.keys()
    assert report["check"]["passed"] and report["check"]["loss_rel_diff"] <= report["check"]["tolerance"][0]
    for mode in ("single", "multi"):
        assert report[mode]["users_per_hour"] > 0 and report[mode]["train_tokens_per_s"] > 0
    assert report["ratio"] == round(report["multi"]["users_per_hour"] / report["single"]["users_per_hour"], 3)


GENERATION_SPEC = importlib.util.spec_from_file_location("batched_generation", Path(__file__).parent.parent / "bench" / "batched_generation.py")


def test_batched_generation_report_and_check_on_cpu(tmp_path):
    """bench/batched_generation.py (the serving engine's part of `make gpu-check`) on the tiny
    shape: rows generated together equal each alone, and its report has its contract."""
    generation = importlib.util.module_from_spec(GENERATION_SPEC)
    GENERATION_SPEC.loader.exec_module(generation)
    argv = ["--shape", "tiny", "--device", "cpu", "--users", "4", "--requests", "8", "--max-tokens", "4", "--out", str(tmp_path)]
    assert generation.main(argv) == 0
    report = json.loads((tmp_path / "generation-cpu-tiny-random-weights.json").read_text())
    assert report["check"] == {"rows": 8, "identical": 8, "passed": True}
    assert set(report["levels"]) == {"1", "8", "32"} and all(level["rows_per_s"] > 0 for level in report["levels"].values())
    assert report["ratio"] == round(report["levels"]["32"]["rows_per_s"] / report["levels"]["1"]["rows_per_s"], 3)
