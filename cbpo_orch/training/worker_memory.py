"""How much host memory one training worker asks Ray for (Ray's ``memory`` resource).

Ray places an actor only on a node whose unreserved ``memory`` holds its request, so workers
that ask for their peak never outnumber what a node's memory holds. Without a request Ray
places them by CPUs alone and its OOM monitor kills them mid-user (issue 28: a 2-worker
longlamp3 job on 24 GB lost 7 of its 10 cbpo runs that way).

A worker's peak is its runtime, the model's weights and one training pass's activations. The
activations are bounded by design: a CPU pass is checkpointed and cut into micro-batches to
stay within ``ACTIVATION_BUDGET`` (``micro_batch.py``). On a GPU they live on the device, and
the host holds the runtime and the weights as loaded. The estimate reads the model's size from
its safetensors headers, not its weights, and imports no torch: the driver sizes its workers
before any of them starts, and stays light.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ACTIVATION_BUDGET = 2**30
"""Estimated activation bytes one CPU forward/backward may keep (1 GiB)."""

WORKER_RUNTIME_BYTES = 5 * 2**28
"""A worker's resident memory besides the weights and the activations (1.25 GiB): the
interpreter with torch, transformers and Ray's worker, the tokenizer and the history index
(0.87 GiB: ``bench/memory.py``'s load phase, 1.37 GiB with SmolLM2-135M's 0.50 GiB of fp32
weights), and the LM head's chunk of fp32 logits with its softmax and gradient
(3 × ``logprobs.CHUNK_BYTES``, 0.375 GiB)."""

CPU_WEIGHT_BYTES, GPU_HOST_WEIGHT_BYTES = 4, 2
"""Bytes a parameter takes in host memory: fp32 on a CPU, bf16 as a GPU worker loads it
before moving it to the device (``models.training_dtype``)."""


def parameter_count(model_dir: str | Path) -> int:
    """The parameters of the model folder's weights, from the safetensors headers (each
    file's first bytes: a length, then the tensors' dtypes and shapes). A ``.bin``
    checkpoint has no header to read: its bytes count as 16-bit parameters, which
    over-reserves an fp32 file rather than under-reserve a 16-bit one."""
    folder = Path(model_dir).expanduser()
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        total += sum(math.prod(tensor["shape"]) for name, tensor in header.items() if name != "__metadata__")
    return total or sum(file.stat().st_size for file in folder.glob("*.bin")) // 2


def worker_memory_bytes(parameters: int, on_gpu: bool) -> int:
    """Host memory one worker training a model of ``parameters`` may reach: its runtime and
    weights, plus, on a CPU, one pass's activations (a GPU's are on the device)."""
    if on_gpu:
        return WORKER_RUNTIME_BYTES + GPU_HOST_WEIGHT_BYTES * parameters
    return WORKER_RUNTIME_BYTES + CPU_WEIGHT_BYTES * parameters + ACTIVATION_BUDGET
