"""The shipped sample's task adapter for the default model: what `make demo` starts from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cbpo_orch.home import SAMPLE_DATA, default_model_dir, home_dir

ADAPTER = SAMPLE_DATA / "task-adapter-SmolLM2-135M-Instruct"
ROOT = Path(__file__).parent.parent


def test_make_demo_starts_from_the_shipped_task_adapter_and_scores_more_than_the_queries():
    makefile = (ROOT / "Makefile").read_text()
    demo = re.search(r"^demo:.*\n\t(.*)$", makefile, re.M).group(1)
    assert "--task-adapter $(SAMPLE_TASK_ADAPTER)" in demo and "--eval-items" in demo
    assert "SAMPLE_TASK_ADAPTER := $(SAMPLE)/task-adapter-SmolLM2-135M-Instruct" in makefile
    assert (ROOT / "cbpo_orch/samples/huffpost-headline") == SAMPLE_DATA


def test_the_shipped_task_adapter_is_a_stock_peft_lora_of_the_task_adapter_layout():
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    assert (config["r"], sorted(config["target_modules"])) == (16, ["k_proj", "o_proj", "q_proj", "v_proj"])
    weights = load_file(ADAPTER / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    # SmolLM2-135M: 30 layers, hidden 576, 3 KV heads of 64
    assert len(weights) == 30 * 4 * 2
    assert {tuple(t.shape) for k, t in weights.items() if "k_proj.lora_B" in k} == {(192, 16)}


def test_the_shipped_task_adapter_merges_into_the_default_model_and_acts():
    folder = default_model_dir(home_dir())
    if not folder.exists():
        pytest.skip(f"SmolLM2-135M-Instruct not cached at {folder}: run `cbpo-orch setup-model`")
    from cbpo_orch.training.models import load_model
    from cbpo_orch.training.task_adapter import starting_model

    ids = load_model(folder, "cpu").tokenizer("Generate a headline for the following article: rain all week", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = load_model(folder, "cpu").model(ids).logits
        tuned = starting_model(folder, ADAPTER, "cpu").model(ids).logits
    assert not torch.allclose(base, tuned, atol=1e-3)
