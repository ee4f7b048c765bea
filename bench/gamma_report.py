"""γ distributions before and after calibrating the Elkan–Noto classifier (METHOD.md §4).

For every test user of a data set (split ``dev``) and each profile cap, γ is estimated as
a C-BPO job does it: positives are the embeddings of the user's ``cap`` most recent
profile pairs, auxiliary items as many other users' items (strategy ``random``, seed 0).
"before" is the old estimator (logistic regression with C = 1, at least 10 items a side),
"after" the default one (C chosen by nested cross-validation, see cbpo_orch.method.prior).

    python bench/gamma_report.py                       # every data set found, caps 12 and all
    python bench/gamma_report.py --cache /tmp/cbpo     # reuse embedded histories

Prints a table and writes bench/results/gamma-distributions.json: per data set and cap,
mean, quartiles, share at the γ cap (0.9), share on the fallback, and wall and CPU seconds per user.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cbpo_orch.data.history import HistoryIndex
from cbpo_orch.data.tasks import load_task
from cbpo_orch.home import SAMPLE_DATA
from cbpo_orch.method.prior import PriorConfig, estimate_gamma
from cbpo_orch.workers.context import build_history, cached_history, history_datasets

HERE = Path(__file__).parent
SHARED_DATA = HERE.parent.parent / "shared" / "data"
SPLIT = "dev"
ESTIMATORS = {"before": PriorConfig(C=1.0, min_items=10), "after": PriorConfig()}
SHARED_SETS = (("huffpost-headline", "lamp4"), ("numpy-commit-subject", "commit-subject"), ("amazon-musical-review", "longlamp3"))

# summary key -> table column
STATS = {"mean": "mean", "q25": "q25", "median": "median", "q75": "q75", "at_cap": "at 0.9",
         "on_fallback": "fallbk", "cpu_seconds_per_user": "cpu s"}


def data_sets(shared: Path) -> list[tuple[str, Path, str]]:
    """(name, folder, task) of the shipped sample and of the shared data sets present."""
    found = [("sample-huffpost-headline", SAMPLE_DATA, "lamp4")]
    for name, task in SHARED_SETS:
        if (shared / name).is_dir():
            found.append((name, shared / name, task))
    return found


def user_rows(history: HistoryIndex) -> dict[str, list[int]]:
    """Each user's rows of the history index, in the index's (recency) order."""
    rows: dict[str, list[int]] = defaultdict(list)
    for row, example in enumerate(history.examples):
        rows[example.user_id].append(row)
    return rows


def summary(gammas: list[float], fallbacks: list[bool], seconds: list[float], cpu: list[float], gamma_max: float) -> dict:
    g = np.asarray(gammas)
    q25, median, q75 = np.quantile(g, [0.25, 0.5, 0.75])
    return {
        "mean": round(float(g.mean()), 3),
        "q25": round(float(q25), 3),
        "median": round(float(median), 3),
        "q75": round(float(q75), 3),
        "at_cap": round(float(np.mean(g >= gamma_max)), 3),
        "on_fallback": round(float(np.mean(fallbacks)), 3),
        "seconds_per_user": round(float(np.mean(seconds)), 3),
        "cpu_seconds_per_user": round(float(np.mean(cpu)), 3),
    }


def report(history: HistoryIndex, user_ids: list[str], cap: int | None) -> dict:
    """γ of every user in ``user_ids`` by each estimator, with positives capped at ``cap``."""
    rows = user_rows(history)
    profiles = [rows[user][-cap:] if cap else rows[user] for user in user_ids]
    result = {"cap": cap, "users": len(user_ids), "profile_items_mean": round(float(np.mean([len(p) for p in profiles])), 2)}
    for name, config in ESTIMATORS.items():
        gammas, fallbacks, seconds, cpu = [], [], [], []
        for user, own in zip(user_ids, profiles):
            aux = history.index.select(user, len(own), "random", seed=0)
            started, started_cpu = time.perf_counter(), time.process_time()
            estimate = estimate_gamma(history.embeddings[own], history.embeddings[aux], config)
            seconds.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
            gammas.append(estimate.gamma)
            fallbacks.append(estimate.reason is not None)
        result[name] = summary(gammas, fallbacks, seconds, cpu, config.gamma_max)
        result[name]["gammas"] = [round(g, 4) for g in gammas]
    return result



def header() -> str:
    columns = " ".join(f"{label:>6}" for label in STATS.values())
    width = len(columns)
    return f"{'':26} {'':>4} {'':>5} {'':>6} | {'before (C = 1)':^{width}} | {'after (C by CV)':^{width}}\n" + (
        f"{'data':26} {'cap':>4} {'users':>5} {'items':>6} | {columns} | {columns}"
    )


def row(result: dict) -> str:
    values = " | ".join(" ".join(f"{result[name][s]:>6.3f}" for s in STATS) for name in ESTIMATORS)
    return f"{result['data']:26} {result['cap'] or 'all':>4} {result['users']:>5} {result['profile_items_mean']:>6.1f} | {values}"


def caps(text: str) -> list[int | None]:
    return [int(cap) or None for cap in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared-data", type=Path, default=SHARED_DATA, help="folder holding the shared data sets")
    parser.add_argument("--caps", type=caps, default=[12, None], help="comma-separated profile caps, 0 = all (default 12,0)")
    parser.add_argument("--users", type=int, default=None, help="at most N test users per data set (default all)")
    parser.add_argument("--cache", type=Path, default=None, help="folder to keep embedded histories in and reuse")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gamma-distributions.json")
    args = parser.parse_args(argv)

    print(header(), flush=True)
    results = []
    for name, folder, task in data_sets(args.shared_data):
        datasets = history_datasets(folder, SPLIT, load_task(task))
        history = cached_history(args.cache, datasets) if args.cache else build_history(datasets)
        user_ids = list(datasets[0].users)[: args.users]
        for cap in args.caps:
            results.append({"data": name, "task": task, **report(history, user_ids, cap)})
            print(row(results[-1]), flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    estimators = {name: asdict(config) for name, config in ESTIMATORS.items()}
    document = {"split": SPLIT, "aux": "random, seed 0, as many as positives", "estimators": estimators, "results": results}
    args.out.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
