"""Exporting a job's adapters in the layout vLLM and Ray Serve LLM load.

``OUT/<user_id>/adapter_config.json + adapter_model.safetensors`` per user (vLLM's
``--lora-modules NAME=OUT/<user_id>``, Ray Serve LLM's ``dynamic_lora_loading_path``),
``OUT/base/`` the merged starting model when the job used a task adapter (serve that as
the base model: the adapters were trained on top of it), and ``OUT/manifest.json``.
Every adapter is checked against what those engines accept before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cbpo_orch.serving.catalog import Catalog, NotServable, UserAdapterEntry
from cbpo_orch.storage.artifacts import directory_sha256
from cbpo_orch.training.model_dirs import check_adapter_dir
from cbpo_orch.training.multi_lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The LoRA ranks vLLM serves (its ``max_lora_rank`` choices); Ray Serve LLM runs on vLLM."""

VLLM_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a Llama-family model that vLLM takes LoRA on (it packs q/k/v and
gate/up itself); embeddings and the LM head are not served as LoRA targets."""

BASE_FOLDER = "base"
MANIFEST = "manifest.json"


def servability_problems(config: dict) -> list[str]:
    """Why vLLM / Ray Serve LLM would refuse a peft adapter with this ``adapter_config.json``
    (empty when it can be served)."""
    problems = []
    rank = config.get("r")
    if rank not in VLLM_LORA_RANKS:
        problems.append(f"rank {rank} is not one vLLM serves ({', '.join(map(str, VLLM_LORA_RANKS))})")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} (fully trained modules) cannot be served as LoRA")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets:
        problems.append(f"target_modules must be a list of layer names, not {targets!r}")
    elif unsupported := sorted(set(targets) - set(VLLM_TARGET_MODULES)):
        problems.append(f"target modules {unsupported} are not among the layers vLLM adapts ({', '.join(VLLM_TARGET_MODULES)})")
    if config.get("use_dora"):
        problems.append("DoRA adapters are not served")
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config['bias']!r}: only adapters without bias terms are served")
    return problems


def checked_adapter(space, catalog: Catalog, entry: UserAdapterEntry) -> dict:
    """The user's registered adapter config, after checking its files are intact and servable."""
    folder = check_adapter_dir(entry.adapter_path)
    if not space.artifacts.verify(folder, entry.sha256):
        raise NotServable(f"the adapter of user {entry.user_id!r} at {folder} does not match its recorded sha256 (changed on disk since the job wrote it)")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise NotServable(f"the adapter of user {entry.user_id!r} at {folder} has no {ADAPTER_WEIGHTS}")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    problems = servability_problems(config)
    if problems:
        raise NotServable(f"the {catalog.method} adapter of user {entry.user_id!r} cannot be served by vLLM or Ray Serve LLM: {'; '.join(problems)}")
    return config


def export_job(space, catalog: Catalog, staging: Path) -> dict:
    """Write the catalog's servable adapters, the merged starting model (with a task adapter)
    and the manifest into the empty folder ``staging``; returns the manifest. Every adapter
    is checked before the first file is written (``NotServable`` names the first that fails)."""
    if not catalog.servable:
        raise NotServable(f"job {catalog.job_id} has no user whose {catalog.method} run succeeded: nothing to export")
    configs = {user: checked_adapter(space, catalog, catalog.users[user]) for user in catalog.servable}
    users = []
    for user, config in configs.items():
        source, target = Path(catalog.users[user].adapter_path), staging / user
        target.mkdir()
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(source / name, target / name)
        users.append({"user_id": user, "path": user, "rank": config["r"], "alpha": config.get("lora_alpha"), "target_modules": sorted(config["target_modules"]), "sha256": directory_sha256(target)})
    if catalog.task_adapter is not None:
        _write_merged_base(catalog, staging / BASE_FOLDER)
    manifest = {
        "job_id": catalog.job_id,
        "method": catalog.method,
        "base_model": {
            "name": catalog.base_name,
            "source": catalog.model_path,
            "path": BASE_FOLDER if catalog.task_adapter is not None else catalog.model_path,
            "task_adapter_merged": catalog.task_adapter,
        },
        "users": users,
        "not_exported": {u: f"run {e.state}" + (f": {e.error}" if e.error else "") for u, e in catalog.users.items() if not e.adapter_path},
        "max_lora_rank": max(entry["rank"] for entry in users),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _write_merged_base(catalog: Catalog, out: Path) -> None:
    """The starting model (task adapter merged, as for training), saved in the source model's dtype."""
    from transformers import AutoConfig

    from cbpo_orch.training.task_adapter import starting_model

    loaded = starting_model(catalog.model_path, catalog.task_adapter, "cpu")
    source_dtype = AutoConfig.from_pretrained(catalog.model_path).dtype
    loaded.model.to(source_dtype or loaded.model.dtype).save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
