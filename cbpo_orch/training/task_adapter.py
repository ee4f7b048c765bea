"""The task adapter (TAM): a LoRA trained by SFT on the task's non-test users, merged into
the base so that every user adapter starts from general task knowledge (METHOD.md §1, §6).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from peft import PeftModel

from cbpo_orch.data.dataset import Dataset
from cbpo_orch.method.config import TASK_ADAPTER_CONFIG, TrainConfig
from cbpo_orch.training.encoding import within_budget
from cbpo_orch.training.models import LoadedModel, load_model
from cbpo_orch.training.multi_lora import attached_multi_lora
from cbpo_orch.training.trainer import StepCallback, TrainResult, UserTraining, adapter_files, encode_samples, train_adapters


def train_task_adapter(
    loaded: LoadedModel,
    dataset: Dataset,
    config: TrainConfig = TASK_ADAPTER_CONFIG,
    on_step: StepCallback | None = None,
) -> tuple[dict[str, bytes], TrainResult]:
    """SFT a task LoRA on every profile pair of ``dataset``; returns its files and the run."""
    pairs = [(e.x, e.y) for e in dataset.profile_examples(config.max_profile)]
    budgets = dataset.task.budgets(config.max_prompt_tokens, config.max_new_tokens)
    pairs = within_budget(loaded.tokenizer, pairs, budgets.prompt_tokens)
    work = UserTraining(samples=encode_samples(loaded.tokenizer, pairs, True, budgets), seed=config.seed)
    with attached_multi_lora(loaded.model, config.lora, n_slots=1) as multi:
        [result] = train_adapters(multi, loaded.tokenizer, [work], replace(config, method="sft"), loaded.device, on_step)
        files = adapter_files(multi, 0)
    return files, result


def merge_task_adapter(loaded: LoadedModel, folder: str | Path) -> LoadedModel:
    """Merge a saved task adapter into ``loaded``'s weights: the result is π_ref's base."""
    merged = PeftModel.from_pretrained(loaded.model, str(folder)).merge_and_unload()
    merged.requires_grad_(False)
    merged.eval()
    return LoadedModel(model=merged, tokenizer=loaded.tokenizer, device=loaded.device, path=loaded.path)


def starting_model(model_path: str | Path, task_adapter: str | Path | None, device: str = "auto") -> LoadedModel:
    """What every user adapter of a job trains on: the base model, with the job's task
    adapter merged when it has one."""
    loaded = load_model(model_path, device)
    return loaded if task_adapter is None else merge_task_adapter(loaded, task_adapter)
