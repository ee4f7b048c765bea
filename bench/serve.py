"""Serving throughput: requests/s and p50/p95 latency of ``cbpo-orch serve``'s application,
for 1, 8 and 32 concurrent clients over 20 users, with and without cross-user batching.

The 20 users' adapters are synthetic (r=8 on q/v, peft's initial A and a random B; speed
does not depend on their values), registered as a job in a registry of the bench's own,
and served from it exactly as ``cbpo-orch serve --job`` serves a trained job: one local
Ray, one replica, the real HTTP endpoint. Each client sends, one after the other, the
query inputs of the shipped HuffPost sample, each to a random one of the 20 users,
greedy, ``--max-tokens`` tokens. "off" is ``--max-batch-size 1`` (one request at a time);
"on" is ``--max-batch-size 32``. A cold adapter (not in the replica's LRU) is timed
against the same request once warm.

    PYTHONPATH=. python bench/serve.py                 # SmolLM2-135M-Instruct from the home folder
    PYTHONPATH=. python bench/serve.py --model PATH --requests 32

Writes ``bench/results/serve-<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.batched_generation import LORA, fill_synthetic_slots
from cbpo_orch.data.dataset import load_split
from cbpo_orch.data.tasks import load_task
from cbpo_orch.home import SAMPLE_DATA, default_model_dir, home_dir
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.orchestrator.spec import JobSpec, Resources
from cbpo_orch.orchestrator.workspace import Workspace
from cbpo_orch.training.models import load_model
from cbpo_orch.training.multi_lora import attached_multi_lora

HERE = Path(__file__).resolve().parent
CLIENTS = (1, 8, 32)
USERS = 20


def synthetic_job(space: Workspace, model: Path, users: int, seed: int = 0) -> str:
    """A succeeded cbpo job of ``users`` synthetic users, one registered adapter each."""
    ids = [f"user-{i:02d}" for i in range(users)]
    spec = JobSpec(task="lamp4", data=str(SAMPLE_DATA), split="dev", model=str(model), methods=("cbpo",), users=tuple(ids), train=TrainConfig(method="cbpo", lora=LORA))
    job = space.registry.create_job("lamp4", ["cbpo"], ids, spec.to_config(Resources()))
    with attached_multi_lora(load_model(model, "cpu").model, LORA, users) as multi:
        fill_synthetic_slots(multi, seed)
        runs = {run.user_id: run.run_id for run in space.registry.runs(job)}
        for slot, user in enumerate(ids):
            info = space.artifacts.write_dir(f"adapters/{job}/{user}/cbpo/attempt-1", multi.export_slot(slot))
            space.registry.mark_running(runs[user])
            space.registry.record_success(runs[user], {"rouge1": 0.0, "rougeL": 0.0, "n_pos": 1, "n_aux": 1, "seconds": 0.0}, info.as_dict())
    return job


def _post(url: str, body: dict) -> float:
    """Seconds one completion took."""
    request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        json.loads(response.read())
    return time.perf_counter() - started


def load_level(url: str, users: list[str], prompts: list[str], clients: int, requests: int, max_tokens: int, seed: int) -> dict:
    """``requests`` completions from ``clients`` concurrent clients: requests/s, p50, p95."""
    rng = random.Random(seed)
    asks = [{"model": rng.choice(users), "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens} for i in range(requests)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(lambda body: _post(url, body), asks))
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": requests,
        "seconds": round(wall, 2),
        "requests_per_s": round(requests / wall, 3),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
    }


def cold_vs_warm(url: str, users: list[str], prompt: str, max_tokens: int) -> dict:
    """Latency of each user's first request (its adapter read from disk into the LRU) and
    of the same request again (warm), one request at a time."""
    cold, warm = [], []
    for user in users:
        body = {"model": user, "prompt": prompt, "max_tokens": max_tokens}
        cold.append(_post(url, body))
        warm.append(_post(url, body))
    return {"users": len(users), "cold_mean_s": round(statistics.mean(cold), 3), "warm_mean_s": round(statistics.mean(warm), 3), "cold_extra_s": round(statistics.mean(c - w for c, w in zip(cold, warm)), 3)}


def _redeploy(catalog, options) -> None:
    """The job's application again, laid out by ``options``, on the same Ray and endpoint."""
    from ray import serve

    from cbpo_orch.serving import app as serving

    serve.delete(serving.app_name(catalog))
    serve.run(serving.build_app(catalog, None, options), name=serving.app_name(catalog), route_prefix="/")


def main() -> None:
    from ray import serve

    from cbpo_orch.serving import app as serving
    from cbpo_orch.serving.catalog import load_catalog

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_dir(home_dir()))
    parser.add_argument("--requests", type=int, default=64, help="Requests per level (at least the level's clients).")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cpus", type=float, default=float(os.cpu_count() or 1), help="CPUs (torch threads) of the one replica.")
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    if not args.model.is_dir():
        raise SystemExit(f"no model at {args.model}: run `cbpo-orch setup-model` (or `make model`), or give --model")

    dataset = load_split(SAMPLE_DATA, "dev", load_task("lamp4"))
    prompts = [q.input for user in dataset.users for q in dataset.user(user).queries]
    with tempfile.TemporaryDirectory(prefix="cbpo-serve-bench-") as tmp:
        space = Workspace.open(Path(tmp))
        job = synthetic_job(space, args.model, USERS)
        catalog = load_catalog(space, job, "cbpo")
        users, url = catalog.servable, f"http://127.0.0.1:{args.port}"
        runs = {}
        for name, batch in (("off", 1), ("on", 32)):
            options = serving.ServeOptions(max_adapters_per_replica=USERS, max_batch_size=batch, batch_wait_s=0.02, cpus_per_replica=args.cpus)
            if name == "off":
                serving.start(catalog, None, options, "127.0.0.1", args.port, None)
            else:
                _redeploy(catalog, options)
            _post(url, {"model": users[0], "prompt": prompts[0], "max_tokens": 2})  # warm-up
            levels = []
            for clients in CLIENTS:
                levels.append(load_level(url, users, prompts, clients, max(args.requests, clients), args.max_tokens, seed=clients))
                print(f"batching {name:>3} · {clients:>2} clients: {levels[-1]}", flush=True)
            stats = serve.get_deployment_handle(serving.AdapterServer.name, app_name=serving.app_name(catalog)).stats.remote().result()
            runs[name] = {"max_batch_size": batch, "levels": levels, "batches": stats}
        _redeploy(catalog, serving.ServeOptions(max_adapters_per_replica=4, max_batch_size=32, cpus_per_replica=args.cpus))
        runs["cold_adapter"] = cold_vs_warm(url, users[:4], prompts[0], args.max_tokens)
        print(f"cold adapter: {runs['cold_adapter']}", flush=True)
        serving.stop(catalog)

    ratio = {c: round(on["requests_per_s"] / off["requests_per_s"], 2) for c, on, off in zip(CLIENTS, runs["on"]["levels"], runs["off"]["levels"])}
    result = {
        "model": args.model.name,
        "device": "cpu",
        "cpus": args.cpus,
        "users": USERS,
        "max_tokens": args.max_tokens,
        "adapters": "synthetic: r=8 q/v, peft's initial A, random B (speed does not depend on the values)",
        **runs,
        "speedup_on_vs_off": ratio,
    }
    print(f"\n{'clients':>7} | {'off req/s':>9} {'p50':>6} {'p95':>6} | {'on req/s':>8} {'p50':>6} {'p95':>6} | on/off")
    for off, on in zip(runs["off"]["levels"], runs["on"]["levels"]):
        print(f"{off['clients']:>7} | {off['requests_per_s']:>9} {off['p50_s']:>6} {off['p95_s']:>6} | {on['requests_per_s']:>8} {on['p50_s']:>6} {on['p95_s']:>6} | {ratio[off['clients']]}")
    print(f"cold adapter: +{runs['cold_adapter']['cold_extra_s']} s over warm ({runs['cold_adapter']['warm_mean_s']} s)")
    out = HERE / "results" / f"serve-{args.model.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
