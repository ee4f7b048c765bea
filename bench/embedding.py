"""The embedding stage: one process (as the driver embedded before) vs shards on Ray workers.

One run, the same texts, the same machine: every profile pair of a data set's users (the texts
the history index embeds, ``--limit`` of them) is embedded first in this process on one torch
thread (one core, as the issue measured the driver), then at torch's default threads, then by
``scheduler.map_shards`` over a local Ray of ``--cpus`` CPUs, exactly
as the driver's stage 1 does it (each shard task loads the embedder, so the time counts the
loads; Ray's own start is left out). The vectors must agree; the table gives texts/s and the
ratios of the shards to each one-process run.

    python bench/embedding.py --data ../shared/data/numpy-commit-subject --task commit-subject

Writes ``bench/results/embedding-cpu-<data>.json``:
``{"texts", "cpus", "one_thread": {"seconds", "texts_per_s"}, "single": {...}, "sharded": {..., "shards"},
"ratio", "ratio_vs_one_thread", "max_abs_diff"}`` (``ratio``: against ``single``, the default threads).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from cbpo_orch.data.embedding import embed, embedding_cost, load_embedder, pair_text
from cbpo_orch.data.tasks import load_task
from cbpo_orch.orchestrator import driver, scheduler
from cbpo_orch.workers.context import history_datasets
from cbpo_orch.workers.embedding import embed_shard

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--limit", type=int, default=4000, help="texts to embed (the first of the history's)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="the local Ray's CPUs")
    args = parser.parse_args()

    datasets = history_datasets(args.data, args.split, load_task(args.task))
    texts = [pair_text(e.x, e.y) for d in datasets for e in d.profile_examples()][: args.limit]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    embed(load_embedder(), texts)
    one_thread_s = time.perf_counter() - started
    torch.set_num_threads(threads)
    started = time.perf_counter()
    alone = embed(load_embedder(), texts)
    single_s = time.perf_counter() - started

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": scheduler.WORKER_ENV})
    try:
        ray.get([ray.remote(lambda: None).options(num_cpus=1).remote() for _ in range(args.cpus)])  # workers up
        shards, _ = scheduler.shard_plan(len(texts), driver.EMBED_MIN_SHARD)
        started = time.perf_counter()
        sharded = np.concatenate(scheduler.map_shards(embed_shard, texts, None, min_shard=driver.EMBED_MIN_SHARD, cost=embedding_cost))
        sharded_s = time.perf_counter() - started
    finally:
        ray.shutdown()

    result = {
        "data": str(args.data), "texts": len(texts), "cpus": args.cpus, "torch_threads": torch.get_num_threads(),
        "one_thread": {"seconds": round(one_thread_s, 2), "texts_per_s": round(len(texts) / one_thread_s, 1)},
        "single": {"seconds": round(single_s, 2), "texts_per_s": round(len(texts) / single_s, 1)},
        "sharded": {"seconds": round(sharded_s, 2), "texts_per_s": round(len(texts) / sharded_s, 1), "shards": shards},
        "ratio": round(single_s / sharded_s, 2),
        "ratio_vs_one_thread": round(one_thread_s / sharded_s, 2),
        "max_abs_diff": float(np.abs(alone - sharded).max()),
    }
    print("| path | texts | seconds | texts/s |\n|---|---|---|---|")
    print(f"| one process (1 torch thread) | {len(texts)} | {one_thread_s:.1f} | {result['one_thread']['texts_per_s']} |")
    print(f"| one process ({result['torch_threads']} torch threads) | {len(texts)} | {single_s:.1f} | {result['single']['texts_per_s']} |")
    print(f"| {shards} shards on Ray ({args.cpus} CPUs) | {len(texts)} | {sharded_s:.1f} | {result['sharded']['texts_per_s']} |")
    print(f"ratio {result['ratio']}× ({result['ratio_vs_one_thread']}× against one thread), largest difference between the vectors {result['max_abs_diff']:.1e}")
    out = HERE / "results" / f"embedding-cpu-{args.data.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
