"""The driver only schedules: it imports none of the training stack, and the worker
functions it sends to the cluster travel by name."""

from __future__ import annotations

import pickle
import subprocess
import sys

from cbpo_orch.workers import entrypoints
from cbpo_orch.workers.entrypoints import Entrypoint

TRAINING_STACK = ("torch", "transformers", "peft", "sklearn", "sentence_transformers")


def test_the_driver_process_imports_no_training_stack():
    probe = (
        "import sys, cbpo_orch.cli.main, cbpo_orch.cli.job_commands, cbpo_orch.orchestrator.driver\n"
        f"print(','.join(m for m in {TRAINING_STACK!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", f"the driver imports {done.stdout.strip()}"


def test_an_entry_pickles_as_its_name_and_calls_the_function_it_names():
    entry = Entrypoint("os.path:join")
    assert len(pickle.dumps(entry)) < 200 and pickle.loads(pickle.dumps(entry)) == entry
    assert entry("a", "b") == "a/b"


def test_every_entry_names_a_function_that_exists():
    import importlib

    entries = [value for value in vars(entrypoints).values() if isinstance(value, Entrypoint)]
    assert len(entries) == 6
    for entry in entries:
        module, _, name = entry.target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), entry.target
