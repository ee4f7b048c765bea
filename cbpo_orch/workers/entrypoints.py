"""The worker functions the driver sends to the cluster, named rather than imported.

The driver only schedules: it never imports the training stack (torch, transformers,
peft, scikit-learn, sentence-transformers), which costs seconds and hundreds of MB in a
process that waits on Ray. An :class:`Entrypoint` pickles as its name; the worker process that
runs it imports the function on the first call.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Entrypoint:
    """``module:function``, callable like the function it names."""

    target: str

    def __call__(self, *args, **kwargs):
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)


PERSONALIZE_USERS = Entrypoint("cbpo_orch.workers.personalize:personalize_users")
EMBED_SHARD = Entrypoint("cbpo_orch.workers.embedding:embed_shard")
BUILD_TASK_ADAPTER = Entrypoint("cbpo_orch.workers.task_adapter:build_task_adapter")
REFERENCE_SHARD = Entrypoint("cbpo_orch.workers.reference_pass:reference_shard")
GAMMA_SHARD = Entrypoint("cbpo_orch.workers.gamma_pass:gamma_shard")
PROMPT_SHARD = Entrypoint("cbpo_orch.workers.prompt_pass:prompt_shard")
