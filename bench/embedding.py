"""The embedding stage: one process (as the driver embedded before) vs shards on Ray workers.

One run, the same texts, the same machine: every profile pair of a data set's users (the texts
the history index embeds, ``--limit`` of them) is embedded first by one fresh Python process
on one torch thread (one core, as the issue measured the driver), then by one at torch's
default threads, then by ``scheduler.map_shards`` over a local Ray of ``--cpus`` CPUs, exactly
as the driver's stage 1 does it (``EMBED_ROUNDS`` shards per CPU; a worker process imports and
loads the embedder for its first shard, so the time counts that; Ray's own start is left out).
A one-process stage is timed whole (import, load, encode: what a shard also pays) and its
encoding alone. The vectors must agree; the table gives texts/s and the ratios.

    python bench/embedding.py --data ../shared/data/numpy-commit-subject --task commit-subject

Writes ``bench/results/embedding-cpu-<data>.json``:
``{"texts", "cpus", "one_thread": {"seconds", "encode_seconds", "texts_per_s"}, "single": {...},
"sharded": {"seconds", "texts_per_s", "shards"}, "ratio", "ratio_vs_one_thread",
"ratio_vs_one_thread_encoding", "max_abs_diff"}`` (``ratio``: against ``single``, the default
threads; every ratio is of whole-stage seconds except the last, against encoding alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cbpo_orch.data.embedding import embedding_cost, pair_text
from cbpo_orch.data.tasks import load_task
from cbpo_orch.orchestrator import cluster, driver, scheduler
from cbpo_orch.workers.context import history_datasets
from cbpo_orch.workers.embedding import embed_shard

HERE = Path(__file__).resolve().parent

ONE_PROCESS = """
import json, sys, time
import numpy as np, torch
from cbpo_orch.data.embedding import embed, load_embedder
torch.set_num_threads(int(sys.argv[2]))
texts = json.loads(open(sys.argv[1] + "/texts.json").read())
embedder = load_embedder()
encoding = time.perf_counter()
np.save(sys.argv[1] + "/vectors.npy", embed(embedder, texts))
print(json.dumps({"encode_seconds": time.perf_counter() - encoding}))
"""
"""The driver's old stage in a fresh interpreter: import, load the embedder, encode."""


def one_process_stage(folder: Path, threads: int) -> dict:
    """Seconds of :data:`ONE_PROCESS` on ``folder``'s texts at ``threads`` torch threads, whole
    (from the process's start) and encoding alone; the vectors land in ``folder``."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", ONE_PROCESS, str(folder), str(threads)], capture_output=True, text=True, check=True,
                          env={**os.environ, **cluster.WORKER_ENV})  # as a shard runs: no tokenizer threads
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "encode_seconds": json.loads(done.stdout.strip().splitlines()[-1])["encode_seconds"], "threads": threads}


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

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "texts.json").write_text(json.dumps(texts))
        one_thread = one_process_stage(Path(tmp), 1)
        single = one_process_stage(Path(tmp), torch.get_num_threads())
        alone = np.load(Path(tmp) / "vectors.npy")

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": cluster.WORKER_ENV})
    try:
        ray.get([ray.remote(lambda: None).options(num_cpus=1).remote() for _ in range(args.cpus)])  # workers up
        shards, _ = scheduler.shard_plan(len(texts), driver.EMBED_MIN_SHARD, rounds=driver.EMBED_ROUNDS)
        started = time.perf_counter()
        sharded = np.concatenate(scheduler.map_shards(embed_shard, texts, None, min_shard=driver.EMBED_MIN_SHARD, rounds=driver.EMBED_ROUNDS, cost=embedding_cost))
        sharded_s = time.perf_counter() - started
    finally:
        ray.shutdown()

    def row(stage: dict) -> dict:
        return {"seconds": round(stage["seconds"], 2), "encode_seconds": round(stage["encode_seconds"], 2),
                "texts_per_s": round(len(texts) / stage["seconds"], 1)}

    result = {
        "data": str(args.data), "texts": len(texts), "cpus": args.cpus, "torch_threads": single["threads"],
        "one_thread": row(one_thread), "single": row(single),
        "sharded": {"seconds": round(sharded_s, 2), "texts_per_s": round(len(texts) / sharded_s, 1), "shards": shards},
        "ratio": round(single["seconds"] / sharded_s, 2),
        "ratio_vs_one_thread": round(one_thread["seconds"] / sharded_s, 2),
        "ratio_vs_one_thread_encoding": round(one_thread["encode_seconds"] / sharded_s, 2),
        "max_abs_diff": float(np.abs(alone - sharded).max()),
    }
    print("| path | texts | seconds (whole stage) | of them encoding | texts/s |\n|---|---|---|---|---|")
    for name, stage in (("one process (1 torch thread)", one_thread), (f"one process ({single['threads']} torch threads)", single)):
        print(f"| {name} | {len(texts)} | {stage['seconds']:.1f} | {stage['encode_seconds']:.1f} | {len(texts) / stage['seconds']:.1f} |")
    print(f"| {shards} shards on Ray ({args.cpus} CPUs) | {len(texts)} | {sharded_s:.1f} | | {result['sharded']['texts_per_s']} |")
    print(f"ratio {result['ratio']}× the {single['threads']}-thread process, {result['ratio_vs_one_thread']}× the one-thread "
          f"process ({result['ratio_vs_one_thread_encoding']}× its encoding alone); largest difference between the vectors {result['max_abs_diff']:.1e}")
    out = HERE / "results" / f"embedding-cpu-{args.data.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
