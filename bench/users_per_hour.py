"""Users/hour on a CPU of two code trees, interleaved in one run so that a shared, noisy
machine slows both alike: the ratio of each round's pair is the figure, not the times.

Each measurement is a fresh interpreter (this script with ``--child``) on one tree (its
folder first on ``PYTHONPATH``): it loads the model and the history index once, as a worker
does, then personalizes the task's first ``--users`` users of the split one after another
(C-BPO, 1 epoch, batch 8, no selection: the same work whatever a tree's defaults; each user's
``--max-profile`` newest items), timing only the users
(``personalize_user``) and reading the process's peak resident memory (``VmHWM``). Rounds
alternate which tree goes first (A B, B A, …).

    git worktree add /tmp/before 03c67c4~1    # the code before issue 28's memory work
    .venv/bin/python bench/users_per_hour.py --trees before=/tmp/before,after=.

Writes ``bench/results/users-per-hour-cpu-<model>.json``: each round's users/hour and peak
per tree, and the median ratio of the last tree's users/hour to the first's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(args) -> dict:
    """The first users of the split, personalized one after another in this interpreter."""
    import torch
    from memory import load_context

    from cbpo_orch.data.tasks import load_task
    from cbpo_orch.method.config import TrainConfig
    from cbpo_orch.workers import personalize

    torch.set_num_threads(1)
    context = load_context(args, load_task(args.task), torch.device("cpu"))
    config = replace(TrainConfig(method="cbpo", epochs=1), max_profile=args.max_profile, selection=False)  # the same work in both trees
    seconds = []
    for user in list(context.dataset.users)[: args.users]:
        started = time.perf_counter()
        personalize.personalize_user(context, user, config)
        seconds.append(time.perf_counter() - started)
    status = Path("/proc/self/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
    return {"seconds": [round(s, 2) for s in seconds], "users_per_hour": round(3600 * len(seconds) / sum(seconds), 2), "peak_gib": round(peak / 2**30, 3)}


def measure(args, tree: str) -> dict:
    """``child`` on the code of ``tree``, in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    command = [sys.executable, __file__, "--child", "--task", args.task, "--users", str(args.users), "--max-profile", str(args.max_profile)]
    if args.model:
        command += ["--model", args.model]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: the measuring process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default="before=/tmp/before,after=.", help="LABEL=FOLDER,LABEL=FOLDER: the two code trees, the base first")
    parser.add_argument("--task", default="lamp4")
    parser.add_argument("--users", type=int, default=3, help="the split's first N users, each measurement")
    parser.add_argument("--max-profile", type=int, default=32, help="each user's newest N history items")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", help="a model folder (default: the home folder's SmolLM2-135M-Instruct)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.shape = None
        print(json.dumps(child(args)))
        return
    trees = dict(pair.split("=", 1) for pair in args.trees.split(","))
    labels = list(trees)
    rounds = []
    for number in range(args.rounds):
        order = labels if number % 2 == 0 else labels[::-1]
        runs = {}
        for label in order:
            runs[label] = measure(args, trees[label])
            print(f"round {number + 1}, {label}: {runs[label]['users_per_hour']} users/hour, peak {runs[label]['peak_gib']} GiB", flush=True)
        rounds.append({"order": order, **runs, "ratio": round(runs[labels[1]]["users_per_hour"] / runs[labels[0]]["users_per_hour"], 3)})
    ratio = statistics.median(r["ratio"] for r in rounds)
    model = Path(args.model).name if args.model else "SmolLM2-135M-Instruct"
    out = HERE / "results" / f"users-per-hour-cpu-{model}.json"
    setup = {"task": args.task, "users": args.users, "max_profile": args.max_profile, "method": "cbpo", "epochs": 1, "batch_size": 8, "selection": False}
    out.write_text(json.dumps({"setup": setup, "trees": labels, "rounds": rounds, f"median_ratio_{labels[1]}_over_{labels[0]}": ratio}, indent=2) + "\n")
    print(f"{labels[1]} / {labels[0]} users/hour: median {ratio} over {len(rounds)} rounds ({', '.join(str(r['ratio']) for r in rounds)}) → {out}")


if __name__ == "__main__":
    main()
