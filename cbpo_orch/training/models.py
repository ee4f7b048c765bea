"""Loading causal LMs and tokenizers from local paths, and caching a GGUF as an HF model.

Model hubs are never contacted: every path is local (``HF_HUB_OFFLINE`` is set).
"""

from __future__ import annotations

import ctypes
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from cbpo_orch.method.config import LoraSettings  # noqa: E402
from cbpo_orch.training.model_dirs import ModelError, check_model_dir  # noqa: E402
from cbpo_orch.training.multi_lora import MultiLora  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    path: str


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def training_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and imprecise)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_tokenizer(path: str | Path):
    """The model's tokenizer; it must have an end-of-sequence token (completions end with it)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of {str(path)!r} has no end-of-sequence token (set eos_token in its tokenizer_config.json)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_adaptable(path: str | Path, lora: LoraSettings) -> None:
    """Fail with ModelError unless the model at ``path`` is a causal LM holding ``lora``'s
    target layers; it is built from its config on the meta device, so no weight is read."""
    try:
        config = AutoConfig.from_pretrained(str(path))
        with torch.device("meta"):
            MultiLora(AutoModelForCausalLM.from_config(config), lora, 1)
    except (OSError, ValueError, TypeError) as error:
        raise ModelError(f"model {str(path)!r} cannot be personalized: {str(error).splitlines()[0]}") from None


def model_context(path: str | Path) -> int | None:
    """The longest sequence the model at ``path`` takes (its config's position count), if it says."""
    return AutoConfig.from_pretrained(str(path)).to_dict().get("max_position_embeddings")


M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter: the size from which an allocation gets its own mapping."""

LARGE_ALLOCATION_BYTES = 2**20
"""Allocations from this size on are mapped alone, and unmapped when freed (1 MiB)."""


def return_large_frees_to_the_system() -> bool:
    """Have glibc serve every allocation of ``LARGE_ALLOCATION_BYTES`` or more from its own
    mapping, given back to the system when freed; whether it could be set (glibc only).

    glibc's default threshold rises with the largest block freed, up to 32 MiB, so a
    training pass's tensors (one layer's hidden states at 8 rows of 560 tokens of SmolLM2:
    10 MiB) come from the heap, which keeps what they free in holes it cannot give back. A
    checkpointed SmolLM2 pass with 0.33 GiB of live tensors left 1.8 GiB resident that way,
    and a pass peaked at 2.73 GiB resident instead of 1.77 (8 rows of 560 tokens). Fresh
    mappings cost page faults: a micro-batched pass took 56.5 CPU seconds instead of 51.6 (one
    run each on a shared machine, where a repeat moved by as much)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION_BYTES))


def load_model(path: str | Path, device: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer from a local folder onto ``device``, frozen; from
    here on the process gives large freed blocks back (``return_large_frees_to_the_system``)."""
    path = check_model_dir(path)
    return_large_frees_to_the_system()
    target = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=training_dtype(target))
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model from {str(path)!r}: {str(error).splitlines()[0]}") from None
    model.to(target)
    model.requires_grad_(False)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, device=target, path=str(path))


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain bf16 Hugging Face folder at ``out_dir``.

    ``save_pretrained`` refuses GGUF-loaded models, so the model is rebuilt from its
    config and given the loaded state dict before saving. Written to a temporary
    folder first and renamed, so a crash leaves no half-written model.
    """
    gguf_file = Path(gguf_file)
    out_dir = Path(out_dir)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    config = AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16)
    staging = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(out_dir)
    return out_dir
