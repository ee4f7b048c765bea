"""Decoding on validation users: ROUGE and the share of outputs that run to the token budget
under each repetition guard, with the starting model (no training: generation only).

The users are the quality benchmark's validation users (``quality.draw_validation``: drawn at
random, never the largest, never reported), each answered on its queries and its --eval-items
newest items, as a job's evaluation does. Every setting keeps the task's line rule.

    python bench/decoding.py --task lamp4 --data ../shared/data/huffpost-headline \\
        --model ~/.cbpo-orch/models/SmolLM2-135M-Instruct --validation 8 --guards 0,2,3,4

Prints a table and writes bench/results/decoding-TASK-MODEL.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import torch

from cbpo_orch.data.dataset import load_split
from cbpo_orch.data.evaluation_items import split_evaluation
from cbpo_orch.data.tasks import load_task
from cbpo_orch.training.evaluation import paired_bootstrap_ci, rouge
from cbpo_orch.training.generation import generate
from cbpo_orch.training.task_adapter import starting_model

HERE = Path(__file__).parent
_SPEC = importlib.util.spec_from_file_location("quality", HERE / "quality.py")
quality = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(quality)


def asked(dataset, task, user_id: str, eval_items: int) -> list[tuple[str, str]]:
    """(prompt, gold) of what a job answers the user on: its queries with golds, then its newest items."""
    _, evaluation = split_evaluation(dataset.examples(user_id), eval_items)
    return [(task.prompt(q), q.gold) for q in dataset.user(user_id).queries if q.gold is not None] + [(e.x, e.y) for e in evaluation]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--task-adapter", type=Path, default=None, help="a task adapter folder to start from")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--validation", type=int, default=8)
    parser.add_argument("--min-items", type=int, default=0)
    parser.add_argument("--eval-items", type=int, default=8)
    parser.add_argument("--guards", default="0,2,3,4", help="no_repeat_ngram values to compare (0: off)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    task = load_task(args.task)
    dataset = load_split(args.data, args.split, task)
    sizes = {u: len(user.profile) for u, user in dataset.users.items()}
    users, _ = quality.draw_validation(sizes, args.validation, args.min_items)
    loaded = starting_model(args.model, args.task_adapter, "cpu")
    budgets = task.budgets()
    rows: dict[int, dict] = {}
    for guard in (int(g) for g in args.guards.split(",")):
        decoding = dataclasses.replace(task.decoding, no_repeat_ngram=guard)
        started, per_user, at_budget, n = time.perf_counter(), {}, 0, 0
        for user in users:
            pairs = asked(dataset, task, user, args.eval_items)
            with torch.inference_mode():
                out = generate(loaded.model, loaded.tokenizer, [p for p, _ in pairs], budgets, args.batch_size, loaded.device, decoding=decoding)
            per_user[user] = rouge([o.text for o in out], [g for _, g in pairs])["rouge1"]
            at_budget += sum(o.finish_reason == "length" for o in out)
            n += len(out)
        rows[guard] = {"rouge1": sum(per_user.values()) / len(per_user), "at_budget": at_budget / n, "items": n,
                       "seconds": round(time.perf_counter() - started, 1), "per_user": per_user}
    reference = rows[min(rows)]
    print(f"{len(users)} validation users, {reference['items']} items; {task.name}, {args.model.name}, task adapter: {args.task_adapter or 'none'}")
    print(f"{'no_repeat_ngram':>15} | ROUGE-1 | Δ vs {min(rows)} [95% CI] | at budget | s")
    for guard, row in rows.items():
        mean, lo, hi = paired_bootstrap_ci(list(row["per_user"].values()), list(reference["per_user"].values()))
        row["ci_vs_first"] = [lo, hi]
        print(f"{guard:>15} | {row['rouge1']:.4f} | {mean:+.4f} [{lo:+.4f}, {hi:+.4f}] | {row['at_budget']:.0%} | {row['seconds']}")
    out = HERE / "results" / f"decoding-{task.name}-{args.model.name}.json"
    out.write_text(json.dumps({"task": task.name, "model": str(args.model), "task_adapter": str(args.task_adapter) if args.task_adapter else None,
                               "users": users, "eval_items": args.eval_items, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
