"""How many pairs go through π_ref in a job: one pass per job against one memo per worker.

Every pending run of a method that reads π_ref trains on its user's positives and aux items
(``workers/user_items.py``, as the worker draws them). With a memo per worker, each worker
computes the distinct pairs of the runs it is dealt; the job's pass computes the distinct
pairs of all runs once. The fan-out sends each run to whichever worker is free first, so
here each run goes to a worker drawn at random (seeded). A count, not a timing: it is the
same on every machine.

    PYTHONPATH=. python bench/reference_pairs.py --data ../shared/data/numpy-commit-body \\
        --task ../shared/data/numpy-commit-body/task.json --methods kto,bco,cbpo

Prints a table and writes bench/results/reference-pairs-DATA.json.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from cbpo_orch.data.tasks import load_task
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.workers.context import cached_history, history_datasets
from cbpo_orch.workers.user_items import trained_pairs, user_items

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--methods", default="cbpo")
    parser.add_argument("--workers", default="1,2,4,8,16")
    parser.add_argument("--cache", default=str(HERE / ".home" / "cache"), help="where embedded histories are cached")
    args = parser.parse_args()

    datasets = history_datasets(args.data, args.split, load_task(args.task))
    history = cached_history(Path(args.cache), datasets)
    dataset = datasets[0]
    planned = [user_items(dataset, history, user, TrainConfig(method=m)) for m in args.methods.split(",") for user in dataset.users]
    requested = sum(len(p.positives) + len(p.auxiliary) for p in planned)
    job_pass = len(trained_pairs(planned))
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        dealt = random.Random(0).choices(range(workers), k=len(planned))
        memos = sum(len(trained_pairs([p for p, w in zip(planned, dealt) if w == k])) for k in range(workers))
        rows.append({"workers": workers, "per_worker_memos": memos, "job_pass": job_pass, "ratio": round(memos / job_pass, 3)})
    print(f"{len(dataset.users)} users × {args.methods}: {requested} pairs requested, {job_pass} distinct")
    print("| workers | pairs through π_ref, a memo per worker | one pass per job | ratio |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['per_worker_memos']} | {row['job_pass']} | {row['ratio']:.2f}× |")
    out = HERE / "results" / f"reference-pairs-{Path(args.data).name}.json"
    out.write_text(json.dumps({"data": args.data, "methods": args.methods, "users": len(dataset.users), "requested": requested, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
