"""bench/throughput.py end to end on a tiny random-weight shape: its check finds packed and
alone training equal, and its report has the documented JSON contract."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SPEC = importlib.util.spec_from_file_location("throughput", Path(__file__).parent.parent / "bench" / "throughput.py")
throughput = importlib.util.module_from_spec(SPEC)
sys.modules["throughput"] = throughput  # its dataclasses look their module up there
SPEC.loader.exec_module(throughput)


def test_throughput_report_and_check_on_cpu(tmp_path):
    argv = ["--shape", "tiny", "--users", "4", "--queries", "1", "--new-tokens", "4", "--device", "cpu", "--check", "--pass-rows", "1,4",
            "--out", str(tmp_path)]
    assert throughput.main(argv) == 0
    [report_file] = tmp_path.glob("throughput-cpu-tiny-random-weights.json")
    report = json.loads(report_file.read_text())
    assert {"device", "model", "users", "single", "multi", "ratio", "check", "shared_phase_seconds"} <= report.keys()
    assert report["check"]["passed"] and report["check"]["loss_rel_diff"] <= report["check"]["tolerance"][0]
    assert set(report["pass_tokens_per_s"]) == {"1", "4"} and all(rate > 0 for rate in report["pass_tokens_per_s"].values())
    assert report["slots"] == 4  # a CPU gives every user of the pack a slot
    shared = report["shared_phase_seconds"]
    assert set(shared) == {"reference", "index", "gamma", "registry"} and all(shared[k] > 0 for k in ("reference", "gamma", "registry"))
    pairs = report["reference_pairs"]  # every aux item is another user's own: the job's pass computes it once
    assert pairs["requested"] == 2 * pairs["computed"] > 0
    for mode in ("single", "multi"):
        phases = report[mode]["phase_seconds"]
        assert set(phases) == {"reference", "training", "generation", "export"}
        assert phases["training"] > 0 and phases["generation"] > 0
        assert report[mode]["reference_pairs_computed"] == 0  # both paths start from the job's pass
        assert report[mode]["seconds"] == pytest.approx(sum(phases.values()) + sum(shared.values()), abs=0.06)
        assert report[mode]["users_per_hour"] == pytest.approx(3600 * 4 / report[mode]["seconds"], rel=1e-2)
        assert report[mode]["train_tokens_per_s"] > 0
    assert report["ratio"] == round(report["multi"]["users_per_hour"] / report["single"]["users_per_hour"], 3)


def test_each_user_answers_and_exports_from_its_own_adapter():
    """The multi path's refill hands each user's own adapter to generation and export: the
    files of users packed through fewer slots than users are the files each gets alone."""
    model, _ = throughput.build_model(argparse.Namespace(model=None, shape="tiny"), torch.device("cpu"))
    users = throughput.synthetic_users(3, 48, model.config.vocab_size)
    prompts = throughput.synthetic_prompts(users, 1)
    config = throughput.TrainConfig(method="sft", epochs=1, lora=throughput.LoraSettings(dropout=0.0))
    packed = throughput.run_pack(model, users, prompts, config, torch.device("cpu"), 2, 2, throughput.ReferenceLogps())
    alone = throughput.run_alone(model, users, prompts, config, torch.device("cpu"), 2, throughput.ReferenceLogps())
    assert len(packed.files) == 3 and packed.files[0].keys() == alone.files[0].keys()
    for together, own in zip(packed.weights, alone.weights):
        assert all(torch.allclose(together[k], own[k], rtol=1e-4, atol=1e-6) for k in own)
    assert packed.seconds["reference"] == 0  # sft never reads π_ref


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
