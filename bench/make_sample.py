"""Make a small LaMP-format sample of a data folder: the first N users of each split.

Each kept user keeps all their queries (with golds) and their CAP most recent profile
items, in file order. Used to build ``cbpo_orch/samples/huffpost-headline``:

    PYTHONPATH=. python bench/make_sample.py ../shared/data/huffpost-headline \\
        cbpo_orch/samples/huffpost-headline --users 6 --cap 40
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cbpo_orch.data.dataset import load_split
from cbpo_orch.data.tasks import load_task


def sample_split(source: Path, out: Path, split: str, task: str, n_users: int, cap: int) -> None:
    """Write ``{split}_questions.json`` and ``{split}_outputs.json`` of the sample to ``out``."""
    dataset = load_split(source, split, load_task(task))
    kept = {
        user.id: {item.id for item in user.recent(cap)}
        for user in list(dataset.users.values())[:n_users]
    }
    questions = json.loads((source / f"{split}_questions.json").read_text(encoding="utf-8"))
    outputs = json.loads((source / f"{split}_outputs.json").read_text(encoding="utf-8"))
    sampled = [
        {**question, "profile": _capped(question["profile"], kept[question.get("user_id", question["id"])])}
        for question in questions
        if question.get("user_id", question["id"]) in kept
    ]
    ids = {question["id"] for question in sampled}
    golds = [gold for gold in outputs["golds"] if gold["id"] in ids]
    _write(out / f"{split}_questions.json", sampled)
    _write(out / f"{split}_outputs.json", {"task": outputs["task"], "golds": golds})


def _capped(profile: list[dict[str, Any]], keep: set[str]) -> list[dict[str, Any]]:
    """The profile items whose ids are kept, in file order, each id once."""
    seen: set[str] = set()
    items = []
    for item in profile:
        if item["id"] in keep and item["id"] not in seen:
            seen.add(item["id"])
            items.append(item)
    return items


def _write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="LaMP-format data folder to sample from")
    parser.add_argument("out", type=Path, help="folder to write the sample to")
    parser.add_argument("--users", type=int, default=6, help="users kept per split (the first ones)")
    parser.add_argument("--cap", type=int, default=40, help="most recent profile items kept per user")
    parser.add_argument("--task", default="lamp4", help="task to validate the data with")
    parser.add_argument("--splits", nargs="+", default=["train", "dev"], help="splits to sample")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split in args.splits:
        sample_split(args.source, args.out, split, args.task, args.users, args.cap)


if __name__ == "__main__":
    main()
