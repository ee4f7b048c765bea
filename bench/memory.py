"""Peak memory of one user's personalization, whole and phase by phase, on a real user.

The user is the one whose items are longest (prompt and target characters per item, since
a batch's width decides its memory) among the first 200 of the split, as ``train-user`` would run it (C-BPO, 1 epoch, batch 8,
the task's budgets): the model and the history index loaded, then ``personalize_user``.
Every measurement runs in a fresh interpreter (this script with ``--child``), one at a time,
so that a peak is that run's own. Within it each phase's peak is read and the peak reset
when the phase begins and ends (nested phases are their own):

- ``reference``: π_ref's log-probs of the user's pairs (``ReferenceLogps.fill``);
- ``train``: the training steps, nested phases left out;
- ``held_out``: the held-out score of selection (``held_out_logp``);
- ``generate``: the answers to the user's queries (``generate``);
- ``load``: the model and the history index (cached in the home folder: run once before
  measuring, or the embedder's first pass is counted here), before anything of the user's;
- ``other``: the rest of the user's run (aux items, γ, scores, the adapter's files).

On a CPU a peak is resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``), the
whole process's; on CUDA it is the device memory torch allocated. ``user`` is the largest
of them: the run's peak.

    .venv/bin/python bench/memory.py                                    # lamp4 and longlamp3, CPU
    .venv/bin/python bench/memory.py --shape qwen2-0.5b --device cuda   # random weights, Qwen2-0.5B's shape
    PYTHONPATH=/tmp/before .venv/bin/python bench/memory.py --label before   # another tree's code

Writes ``bench/results/memory-<device>-<model>.json``: ``{label: {task: {"user", "items",
"phases_gib": {phase: GiB}, "user_gib", "seconds"}}}``, adding to what is there (other labels,
and other tasks under the same label) when it ends, and prints a table of every label.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
DATA = {"lamp4": SHARED / "data" / "huffpost-headline", "longlamp3": SHARED / "data" / "amazon-musical-review"}
PHASES = ("load", "reference", "train", "held_out", "generate", "other")
FIRST_USERS = 200


class PeakRecorder:
    """Peak memory per named phase: ``phase(name)`` blocks may nest, and the memory a block
    reaches outside its nested blocks is its own."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: dict[str, int] = {}
        self.stack = ["load"]
        self._reset()

    def _read(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def _close(self) -> None:
        name = self.stack[-1]
        self.peaks[name] = max(self.peaks.get(name, 0), self._read())
        self._reset()

    @contextmanager
    def phase(self, name: str):
        self._close()
        self.stack.append(name)
        try:
            yield
        finally:
            self._close()
            self.stack.pop()

    def wrap(self, owner, attribute: str, name: str) -> None:
        """``owner.attribute`` (a function or method) counted as phase ``name`` from now on."""
        inner = getattr(owner, attribute)

        def counted(*args, **kwargs):
            with self.phase(name):
                return inner(*args, **kwargs)

        setattr(owner, attribute, counted)


def heaviest_user(dataset) -> str:
    """The user with the most prompt and target characters per item among the split's first users."""

    def per_item(user: str) -> float:
        examples = dataset.examples(user)
        return sum(len(e.x) + len(e.y) for e in examples) / len(examples)

    return max(list(dataset.users)[:FIRST_USERS], key=per_item)


def load_context(args, task, device: torch.device):
    """The worker's context for the task: the model (or the shape's random weights with the
    default model's tokenizer) and the history index cached in the home folder."""
    from cbpo_orch.home import default_model_dir, home_dir
    from cbpo_orch.training.models import LoadedModel, load_model, load_tokenizer, training_dtype
    from cbpo_orch.workers.context import cached_history, history_datasets
    from cbpo_orch.workers.personalize import UserContext  # where the code before issue 28 also has it

    datasets = history_datasets(DATA[task.name], "dev", task)
    history = cached_history(home_dir(None) / "cache", datasets)
    model_dir = args.model or default_model_dir(home_dir(None))
    if args.shape:
        from throughput import SHAPES
        from transformers import AutoModelForCausalLM, Qwen2Config

        torch.manual_seed(0)
        config = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=4096, tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(config, dtype=training_dtype(device)).to(device).eval()
        loaded = LoadedModel(model.requires_grad_(False), load_tokenizer(model_dir), device, f"{args.shape}-random-weights")
    else:
        loaded = load_model(model_dir, str(device))
    return UserContext(task, datasets[0], history, loaded)


def child(args) -> dict:
    """One user's run, phase by phase (in this fresh interpreter)."""
    from cbpo_orch.data.tasks import load_task
    from cbpo_orch.method.config import TrainConfig
    from cbpo_orch.training.reference_logps import ReferenceLogps
    from cbpo_orch.workers import personalize

    device = torch.device(args.device)
    recorder = PeakRecorder(device)
    task = load_task(args.task)
    context = load_context(args, task, device)
    user = args.user or heaviest_user(context.dataset)
    recorder.wrap(ReferenceLogps, "fill", "reference")
    recorder.wrap(personalize, "held_out_logp", "held_out")
    recorder.wrap(personalize, "generate", "generate")
    recorder.wrap(personalize, "train_and_hold", "train")
    config = replace(TrainConfig(method="cbpo", epochs=1), batch_size=args.batch_size, max_profile=args.max_profile)
    started = time.perf_counter()
    with recorder.phase("other"):
        outcome = personalize.personalize_user(context, user, config)
    seconds = time.perf_counter() - started
    phases = {name: round(peak / 2**30, 3) for name, peak in recorder.peaks.items() if name in PHASES}
    items = {key: outcome.metrics[key] for key in ("n_pos", "n_aux")}
    return {"user": user, "items": items, "max_profile": args.max_profile, "phases_gib": phases, "user_gib": max(phases.values()), "seconds": round(seconds, 1)}


def measure(args, task: str) -> dict:
    """``child`` for ``task`` in a fresh interpreter."""
    command = [sys.executable, __file__, "--child", "--task", task, "--device", args.device, "--batch-size", str(args.batch_size)]
    for flag, value in (("--model", args.model), ("--shape", args.shape), ("--user", args.user), ("--max-profile", args.max_profile)):
        if value:
            command += [flag, str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{task}: the measuring process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    lines = [f"{'label':<10} {'task':<10} {'user':<16} " + " ".join(f"{p:>9}" for p in (*PHASES, "user")) + "   (GiB)"]
    for label, tasks in results.items():
        for task, run in tasks.items():
            peaks = [run["phases_gib"].get(p) for p in PHASES] + [run["user_gib"]]
            lines.append(f"{label:<10} {task:<10} {run['user']:<16} " + " ".join(f"{'—' if v is None else f'{v:.2f}':>9}" for v in peaks))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="lamp4,longlamp3")
    parser.add_argument("--model", help="a model folder (default: the home folder's SmolLM2-135M-Instruct)")
    parser.add_argument("--shape", help="random weights of a bench/throughput.py shape, e.g. qwen2-0.5b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--user", help="this user instead of the one with the longest items among the first 200")
    parser.add_argument("--max-profile", type=int, help="the user's newest N history items (a batch's width, which decides its peak, stays the items'; fewer steps)")
    parser.add_argument("--label", default="after", help="the key the results go under (before / after …)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    model = args.shape or (Path(args.model).name if args.model else "SmolLM2-135M-Instruct")
    out = HERE / "results" / f"memory-{torch.device(args.device).type}-{model}.json"
    measured = {task: measure(args, task) for task in args.tasks.split(",")}
    results = json.loads(out.read_text()) if out.exists() else {}  # as it is now: another run may have written it meanwhile
    results.setdefault(args.label, {}).update(measured)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"→ {out}")


if __name__ == "__main__":
    main()
