"""Workers sized by memory: each asks Ray for its peak host memory (``worker_memory.py``), and
the scheduler starts no more of them than the cluster's memory holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from cbpo_orch.method.config import TrainConfig
from cbpo_orch.orchestrator import scheduler
from cbpo_orch.orchestrator.packing import Work
from cbpo_orch.training.worker_memory import (
    ACTIVATION_BUDGET,
    CPU_WEIGHT_BYTES,
    GPU_HOST_WEIGHT_BYTES,
    WORKER_RUNTIME_BYTES,
    parameter_count,
    worker_memory_bytes,
)

GIB = 2**30


def test_parameters_are_read_from_the_safetensors_headers(tmp_path, tiny_model_dir):
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16)}, tmp_path / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({"c": torch.zeros(2, 2, 2, dtype=torch.float16)}, tmp_path / "model-00002-of-00002.safetensors")
    assert parameter_count(tmp_path) == 12 + 5 + 8
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert parameter_count(tiny_model_dir) == sum(p.numel() for p in model.parameters())


def test_a_bin_checkpoint_counts_as_16_bit(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    assert parameter_count(tmp_path) == 500


def test_a_cpu_worker_reserves_its_weights_and_one_pass_of_activations_a_gpu_worker_its_weights():
    smollm2 = 134_515_008
    cpu, gpu = worker_memory_bytes(smollm2, on_gpu=False), worker_memory_bytes(smollm2, on_gpu=True)
    assert cpu == WORKER_RUNTIME_BYTES + CPU_WEIGHT_BYTES * smollm2 + ACTIVATION_BUDGET
    assert gpu == WORKER_RUNTIME_BYTES + GPU_HOST_WEIGHT_BYTES * smollm2
    assert 2.5 * GIB < cpu < 3 * GIB and gpu < cpu
    assert worker_memory_bytes(10 * smollm2, on_gpu=False) > cpu


class _Placed(Exception):
    """Raised by the first call sent to a fake actor: every actor of the pool exists by then."""


def _fake_cluster(monkeypatch, nodes: list[dict]) -> list[dict]:
    """Ray's node list, object store and actor class replaced: returns the options each actor was created with."""
    created = []

    class FakeActor:
        personalize = SimpleNamespace(remote=lambda *args: (_ for _ in ()).throw(_Placed()))

    class FakeWorker:
        @staticmethod
        def options(**options):
            created.append(options)
            return SimpleNamespace(remote=lambda *args: FakeActor())

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": node} for node in nodes])
    monkeypatch.setattr(ray, "put", lambda value: value)
    monkeypatch.setattr(scheduler, "PersonalizeWorker", FakeWorker)
    return created


def _fan_out(model: str, slots: int) -> None:
    work = [Work(k, f"user-{k}", TrainConfig(method="cbpo")) for k in range(6)]
    with pytest.raises(_Placed):
        setup = scheduler.WorkerSetup("lamp4", "data", "dev", model, None, None, {}, {}, None)
        scheduler.fan_out(work, setup, slots, lambda unit: True, lambda unit, result: [])


def test_each_worker_asks_ray_for_its_memory_and_no_more_start_than_memory_holds(monkeypatch, tiny_model_dir):
    need = worker_memory_bytes(parameter_count(tiny_model_dir), on_gpu=False)
    created = _fake_cluster(monkeypatch, [{"CPU": 16, "memory": 3 * need + need // 2}])
    _fan_out(str(tiny_model_dir), slots=5)
    assert [options["memory"] for options in created] == [need] * 3  # 16 CPUs, memory for 3
    assert created[0]["num_cpus"] == 1 and created[0]["num_gpus"] == 0


def test_a_worker_larger_than_every_node_asks_for_a_whole_node(monkeypatch, tiny_model_dir):
    created = _fake_cluster(monkeypatch, [{"CPU": 4, "memory": GIB // 2}, {"CPU": 4, "memory": GIB}])
    _fan_out(str(tiny_model_dir), slots=8)
    assert [options["memory"] for options in created] == [GIB]


FRAGMENTING = """
import sys
from pathlib import Path
import torch
from cbpo_orch.training.models import return_large_frees_to_the_system
if sys.argv[1] == "on":
    assert return_large_frees_to_the_system()
def resident():
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
torch.ones(2**22).sum()  # a freed 16 MiB tensor: glibc's default threshold rises to it
kept, before = [], resident()
for i in range(40):  # like a layer: a temporary, then its output (kept), then the temporary freed
    temporary = torch.ones(2**19 + 1024 * i)
    kept.append(torch.ones(2**19 + 1024 * i + 512))
    del temporary
print(resident() - before - sum(t.numel() * 4 for t in kept))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
@pytest.mark.parametrize("setting", ["on", "off"])
def test_freed_large_tensors_leave_no_resident_memory(setting):
    """40 freed 2 MiB temporaries, each between two kept tensors (a pass's layers): with large
    frees given back, only the kept tensors stay resident; with glibc's default, the freed
    ones' holes too (80 MiB), never filled since every later tensor is wider."""
    freed = int(subprocess.run([sys.executable, "-c", FRAGMENTING, setting], capture_output=True, text=True, check=True).stdout)
    if setting == "on":
        assert freed < 16 * 2**20
    else:
        assert freed > 48 * 2**20


WORKER = """
import json
import sys
from dataclasses import replace
from pathlib import Path
from cbpo_orch.data.tasks import load_task
from cbpo_orch.home import SAMPLE_DATA
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.training.models import load_model
from cbpo_orch.workers.context import build_history, history_datasets
from cbpo_orch.workers.personalize import personalize_user
from cbpo_orch.workers.user_context import UserContext

def resident():
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024

task = load_task("lamp4")
datasets = history_datasets(SAMPLE_DATA, "dev", task)
context = UserContext(task=task, dataset=datasets[0], history=build_history(datasets), loaded=load_model(sys.argv[1], "cpu"))
config = TrainConfig(method="cbpo", max_profile=8, max_prompt_tokens=96, max_new_tokens=8, batch_size=4, epochs=1, selection=False)
users, after = list(context.dataset.users)[:3], []
for round in range(2):
    for user in users:
        personalize_user(context, user, replace(config, seed=round))
        after.append(resident())
print(json.dumps(after))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_workers_memory_does_not_grow_with_the_users_it_has_run(tiny_model_dir):
    """A long-lived worker (a ``PersonalizeWorker``: one loaded context, user after user), in a
    fresh interpreter whose resident memory is the worker's alone: 6 C-BPO runs (3 of the
    sample's users, then again with another seed); after the last 3, resident memory is within
    16 MiB of its most after the first 2 (the first runs import and warm up what every later
    run reuses). Nothing a finished user leaves behind may add up."""
    after = json.loads(subprocess.run([sys.executable, "-c", WORKER, str(tiny_model_dir)], capture_output=True, text=True, check=True).stdout)
    assert max(after[3:]) <= max(after[:2]) + 16 * 2**20, [round(value / 2**20) for value in after]
