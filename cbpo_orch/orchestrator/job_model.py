"""What a recorded job was built from, for the commands that read a job rather than run it
(serve, export, generate, update) and for the driver: the identity and folder of its task
adapter, and its starting model with one user's adapter on top. Serving imports this, never the
driver or the scheduler."""

from __future__ import annotations

import hashlib
import json

from cbpo_orch.method.config import TASK_ADAPTER_FIELDS
from cbpo_orch.orchestrator.spec import JobSpec
from cbpo_orch.orchestrator.workspace import Workspace


def task_adapter_key(spec: JobSpec) -> str:
    config = {name: value for name, value in spec.task_adapter_config().to_dict().items() if name in TASK_ADAPTER_FIELDS}
    identity = {"task": spec.task, "data": spec.data, "model": spec.model, "config": config, "version": 2}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def job_task_adapter(space: Workspace, spec: JobSpec) -> str | None:
    """The folder of the task adapter the job's users started from, or None without one."""
    if spec.task_adapter == "auto":
        return space.registry.task_adapter(task_adapter_key(spec))["path"]
    return spec.task_adapter if spec.needs_task_adapter else None


def loaded_for_job(space: Workspace, spec: JobSpec, adapter_path: str, device: str = "auto"):
    """The job's starting model and the user adapter at ``adapter_path`` on top, ready to generate."""
    from peft import PeftModel

    from cbpo_orch.training.task_adapter import starting_model

    loaded = starting_model(spec.model, job_task_adapter(space, spec), device)
    return loaded, PeftModel.from_pretrained(loaded.model, adapter_path).eval()
