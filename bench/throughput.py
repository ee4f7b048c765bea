"""Throughput of one job's users: one at a time vs packed into one pass, phase by phase.

One run, the same users, the same machine. The single path trains and answers every user
alone (a one-slot pack, as a worker sent one user at a time does); the multi path sends all
of them as one pack, which trains as many at once as the device's memory holds
(``pack_slots``; a slot whose user ends takes the next) and answers their queries in shared
batches, each row by its own user's adapter (as ``workers/personalize.py`` does). Users are
synthetic: random token ids shaped like a short task (``--seq`` tokens per item, the last
32–64 of them the completion) with 8–40 own items each, one aux item per own item (another
user's own item, as a job draws aux from everyone else's history), and
``--queries`` prompts each answered with ``--new-tokens`` greedy tokens; only speed is
measured here, quality is ``bench/quality.py``'s job. With ``--shape`` the model has random
weights built from a config (labelled so); ``--model PATH`` loads a real one.

π_ref's log-probs come first, once for both paths, as a job's π_ref pass computes them
before the fan-out: every distinct pair of every user in one pass (``reference`` among the
shared phases; ``reference_pairs``: how many pairs the users ask for and how many went
through the model). Each path then starts from those values, as every worker of a job does.
Seconds per phase of each path: ``training`` (the steps), ``generation`` (the queries),
``export`` (each adapter as stock peft files), and ``reference`` (what its memo still had to
compute: nothing). Measured once, since packing does not change them: ``index`` (a FAISS
index over every user's items, 384-d random unit vectors, and each user's aux pulled from
it), ``gamma`` (γ estimated per user on those vectors) and ``registry`` (each user's adapter
folder and metrics written to a SQLite registry, as the driver does). The last three need
FAISS, scikit-learn and SQLAlchemy; where one is missing (the lent GPU machines) its phase
is left out and said so. users/hour is end to end over every phase measured.

``--pass-rows 1,8,32,64`` then times one forward/backward of a one-slot adapter over that
many rows of ``--seq`` tokens each (tokens/s per row count, ``pass_tokens_per_s`` in the
JSON): what ``users_per_pass`` rests on, a pass of many users' rows against one user's.

``--check`` first trains 4 of the users together and alone on this device and dtype (LoRA
dropout 0, so that both see the same computation) and prints how far apart they end (the
GPU form of tests/test_trainer_packing.py; the tolerance is stated in the output). The
check and both paths need torch, transformers and peft only, so they run on a GPU machine
without the rest of the stack:

    PYTHONPATH=. python bench/throughput.py --shape qwen2-0.5b --check      # make gpu-check
    PYTHONPATH=. python bench/throughput.py --shape tiny --users 8           # a CPU smoke run

Writes ``bench/results/throughput-<device>-<model>.json``: ``{"device", "model", "users",
"single": {"users_per_hour", "train_tokens_per_s", "phase_seconds", …}, "multi": {…},
"shared_phase_seconds", "ratio", "check"}``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from cbpo_orch.method.config import LoraSettings, TrainConfig
from cbpo_orch.method.methods import method_spec
from cbpo_orch.training.encoding import EncodedPair, collate
from cbpo_orch.training.logprobs import completion_logps
from cbpo_orch.training.generation import greedy_ids
from cbpo_orch.training.models import load_model, resolve_device, training_dtype
from cbpo_orch.training.multi_lora import attached_multi_lora
from cbpo_orch.training.pack_memory import pack_slots
from cbpo_orch.training.reference_logps import ReferenceLogps
from cbpo_orch.training.trainer import Sample, TrainResult, UserTraining, adapter_files, slot_groups, train_and_hold

HERE = Path(__file__).resolve().parent
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
}
CHECK_TOLERANCE = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 5e-2)}
"""(relative loss difference, weight difference relative to the tensor's largest weight)
allowed between packed and alone. Packing changes only the order of sums inside the
matmuls (other batch shapes); AdamW divides by √v, which turns that noise in near-zero
gradient entries into whole update steps, so weights drift more than losses. bf16 rounds
the base's activations (eps 7.8e-3)."""
EMBEDDING_DIM = 384


class PadOnly:
    """All ``train_adapters`` needs of a tokenizer: the pad id."""

    pad_token_id = 0


def build_model(args, device: torch.device):
    if args.model:
        loaded = load_model(args.model, str(device))
        return loaded.model, Path(args.model).name
    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=4096, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=training_dtype(device)).to(device).eval()
    return model, f"{args.shape}-random-weights"


def synthetic_users(n: int, seq: int, vocab: int, seed: int = 0) -> list[UserTraining]:
    """``n`` users of 8–40 own items each; a user's aux items, one per own item, are other
    users' own items, as a job draws them from everyone else's history (π_ref's memo then
    computes each item once, as in a worker)."""
    rng = random.Random(seed)

    def item() -> EncodedPair:
        completion = rng.randint(32, 64)
        return EncodedPair(tuple(rng.randrange(1, vocab) for _ in range(seq)), seq - completion)

    owned = [[item() for _ in range(rng.randint(8, 40))] for _ in range(n)]
    users = []
    for u, own in enumerate(owned):
        others = [pair for v, theirs in enumerate(owned) if v != u for pair in theirs]
        aux = [rng.choice(others) if others else item() for _ in own]
        users.append(UserTraining([Sample(pair, True) for pair in own] + [Sample(pair, False) for pair in aux], gamma=0.3, seed=u))
    return users


def synthetic_prompts(users: list[UserTraining], queries: int) -> list[list[list[int]]]:
    """Each user's query prompts: the prompt parts of its first own items."""
    return [[list(s.pair.input_ids[: s.pair.prompt_len]) for s in user.samples[:queries]] for user in users]


def trained_tokens(users: list[UserTraining], epochs: int) -> int:
    return epochs * sum(len(s.pair.input_ids) for u in users for s in u.samples)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def clock(device: torch.device) -> float:
    """Seconds now, once the device has done what was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Pack:
    """What one pack gave: per-user results, final weights and adapter files, and seconds."""

    results: list[TrainResult] = field(default_factory=list)
    weights: list[dict] = field(default_factory=list)
    files: list[dict[str, bytes]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("reference", "training", "generation", "export"), 0.0))

    def add(self, other: "Pack") -> None:
        self.results += other.results
        self.weights += other.weights
        self.files += other.files
        for phase, value in other.seconds.items():
            self.seconds[phase] += value


def run_pack(
    model, users: list[UserTraining], prompts: list[list[list[int]]], config: TrainConfig, device, n_slots: int, new_tokens: int,
    reference: ReferenceLogps,
) -> Pack:
    """The worker's path for one pack: train ``users`` through ``n_slots`` slots (a slot
    whose user ends takes the next), then, ``n_slots`` users at a time, load their adapters,
    answer their ``prompts`` in shared batches and export each adapter. π_ref's log-probs
    come from ``reference`` (the job's pass; it computes what it lacks)."""
    pack = Pack()
    with attached_multi_lora(model, config.lora, n_slots) as multi:
        started = clock(device)
        pack.results, pack.weights = train_and_hold(multi, PadOnly(), users, config, device, reference=reference)
        pack.seconds["reference"] = sum(r.reference_seconds for r in pack.results)
        pack.seconds["training"] = clock(device) - started - pack.seconds["reference"]
        for group in slot_groups(multi, pack.weights):
            started = clock(device)
            encoded = [ids for u in group for ids in prompts[u]]
            slots = [slot for slot, u in enumerate(group) for _ in prompts[u]]
            greedy_ids(model, encoded, new_tokens, PadOnly.pad_token_id, None, config.eval_batch_size, device, slots, multi)
            pack.seconds["generation"] += clock(device) - started
            started = clock(device)
            pack.files += [adapter_files(multi, slot) for slot in range(len(group))]
            pack.seconds["export"] += clock(device) - started
    return pack


def run_alone(model, users, prompts, config, device, new_tokens, reference: ReferenceLogps) -> Pack:
    """Every user as its own one-user pack, one after another, in one worker (one memo)."""
    total = Pack()
    for user, own in zip(users, prompts):
        total.add(run_pack(model, [user], [own], config, device, 1, new_tokens, reference))
    return total


def reference_pass(model, users: list[UserTraining], config: TrainConfig, device) -> tuple[ReferenceLogps, dict]:
    """The job's π_ref pass: every pair the users train on (KTO's mismatched pairs too),
    each distinct one computed once in batches of ``config.eval_batch_size``; with the
    pairs requested and computed. Nothing for a method that never reads π_ref."""
    memo = ReferenceLogps()
    pairs = [s.pair for user in users for s in user.samples] + [pair for user in users for pair in user.kl_pairs or []]
    if not method_spec(config.method).uses_reference:
        return memo, {"requested": 0, "computed": 0}
    memo.fill(model, pairs, PadOnly.pad_token_id, config.eval_batch_size, device)
    return memo, {"requested": len(pairs), "computed": memo.computed}


def pass_rates(model, lora: LoraSettings, rows: list[int], seq: int, device, repeats: int = 2) -> dict[str, float]:
    """Train tokens/s of one forward/backward of a one-slot adapter over ``rows`` rows of
    ``seq`` random tokens (the last 64 the completion), after one untimed pass, per row count."""
    rng = random.Random(0)
    rates = {}
    with attached_multi_lora(model, lora, 1) as multi:
        multi.init_slot(0, seed=0)
        model.train()
        for n in rows:
            pairs = [EncodedPair(tuple(rng.randrange(1, model.config.vocab_size) for _ in range(seq)), seq - 64) for _ in range(n)]
            batch = collate(pairs, PadOnly.pad_token_id).to(device)
            for repeat in range(repeats + 1):
                if repeat == 1:
                    started = clock(device)
                with multi.routed(torch.zeros(n, dtype=torch.long, device=device)):
                    completion_logps(model, batch)[0].sum().backward()
            rates[str(n)] = round(repeats * n * seq / (clock(device) - started))
            print(f"one pass of {n:3d} rows × {seq} tokens: {rates[str(n)]:>8d} train tokens/s", flush=True)
        model.eval()
    return rates


def check(model, users: list[UserTraining], config: TrainConfig, device) -> dict:
    dtype = next(model.parameters()).dtype
    loss_tol, weight_tol = CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE[torch.bfloat16])
    no_queries = [[] for _ in users]
    together = run_pack(model, users, no_queries, config, device, len(users), 0, ReferenceLogps())
    alone = run_alone(model, users, no_queries, config, device, 0, ReferenceLogps())
    loss_diff = max(
        abs(a - b) / max(abs(b), 1e-6) for t, s in zip(together.results, alone.results) for a, b in zip(t.losses, s.losses)
    )
    weight_diff = max(
        float((p[k].float() - s[k].float()).abs().max() / s[k].float().abs().max().clamp_min(1e-12))
        for p, s in zip(together.weights, alone.weights)
        for k in s
    )
    passed = loss_diff <= loss_tol and weight_diff <= weight_tol
    print(f"check ({dtype}, {len(users)} users, together vs alone): max loss rel diff {loss_diff:.2e} (≤ {loss_tol:g}), "
          f"max weight diff {weight_diff:.2e} of the largest weight (≤ {weight_tol:g}): {'PASS' if passed else 'FAIL'}", flush=True)
    return {"dtype": str(dtype), "loss_rel_diff": loss_diff, "weight_rel_diff": weight_diff, "tolerance": [loss_tol, weight_tol], "passed": passed}


def index_and_gamma_seconds(users: list[UserTraining], seed: int = 0) -> dict[str, float]:
    """``index``: a FAISS index over every user's own items (random unit vectors) and each
    user's aux pulled from it; ``gamma``: γ estimated per user on its own and aux vectors.
    Empty where FAISS or scikit-learn is not installed."""
    try:
        from cbpo_orch.data.records import Example
        from cbpo_orch.data.history import HistoryIndex
        from cbpo_orch.method.prior import estimate_gamma
    except ImportError as missing:
        print(f"index and gamma phases left out: {missing}")
        return {}
    rng = np.random.default_rng(seed)
    owners = [(f"u{u}", sum(s.positive for s in user.samples)) for u, user in enumerate(users)]
    examples = [Example("x", "y", f"{i}", user_id) for user_id, n in owners for i in range(n)]
    vectors = rng.standard_normal((len(examples), EMBEDDING_DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    started = time.perf_counter()
    history = HistoryIndex.from_examples(examples, vectors)
    first, pulled = 0, []
    for user_id, n in owners:
        own = list(range(first, first + n))
        pulled.append((own, history.auxiliary(user_id, own, n, "random", seed)))
        first += n
    index = time.perf_counter() - started
    started = time.perf_counter()
    for own, aux in pulled:
        estimate_gamma(history.embeddings[own], history.embeddings[aux])
    return {"index": index, "gamma": time.perf_counter() - started}


def registry_seconds(files: list[dict[str, bytes]]) -> dict[str, float]:
    """``registry``: each user's adapter folder written and its run recorded in a fresh SQLite
    registry, as the driver does. Empty where SQLAlchemy is not installed."""
    try:
        from cbpo_orch.storage.artifacts import ArtifactStore
        from cbpo_orch.storage.registry import Registry
    except ImportError as missing:
        print(f"registry phase left out: {missing}")
        return {}
    with tempfile.TemporaryDirectory() as home, Registry(f"sqlite:///{home}/registry.db") as registry:
        store = ArtifactStore(Path(home) / "artifacts")
        job = registry.create_job("throughput", ["cbpo"], [f"u{u}" for u in range(len(files))], {})
        runs = registry.runs(job)
        started = time.perf_counter()
        for run, own in zip(runs, files):
            registry.mark_running(run.run_id)
            info = store.write_dir(f"adapters/{job}/{run.user_id}/cbpo/attempt-1", own)
            registry.record_success(run.run_id, {"rouge1": 0.0, "rougeL": 0.0, "n_pos": 0, "n_aux": 0, "seconds": 0.0}, info.as_dict())
        return {"registry": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a local model folder")
    source.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b", help="random weights of this shape")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256, help="tokens per item")
    parser.add_argument("--queries", type=int, default=2, help="queries answered per user")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per query")
    parser.add_argument("--method", default="cbpo")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--check", action="store_true", help="first check packed = alone on this device")
    parser.add_argument("--pass-rows", default="", help="after both paths, time one forward/backward at these row counts, e.g. 1,8,32,64")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON report")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    model, name = build_model(args, device)
    config = TrainConfig(method=args.method, epochs=args.epochs)
    users = synthetic_users(args.users, args.seq, model.config.vocab_size)
    prompts = synthetic_prompts(users, args.queries)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "model": name, "users": args.users,
              "seq": args.seq, "method": args.method, "epochs": args.epochs, "queries": args.queries, "new_tokens": args.new_tokens}
    if args.check:
        report["check"] = check(model, users[:4], replace(config, lora=LoraSettings(dropout=0.0)), device)

    n_slots = pack_slots(model, config.lora, users, config.batch_size, device)
    report["slots"] = n_slots
    tokens = trained_tokens(users, args.epochs)
    started = clock(device)
    job_pass, report["reference_pairs"] = reference_pass(model, users, config, device)
    reference_seconds = clock(device) - started
    packs = {}
    for mode, run in (("single", lambda memo: run_alone(model, users, prompts, config, device, args.new_tokens, memo)),
                      ("multi", lambda memo: run_pack(model, users, prompts, config, device, n_slots, args.new_tokens, memo))):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        memo = ReferenceLogps(job_pass.values)
        packs[mode] = run(memo)
        report[mode] = {"phase_seconds": {k: round(v, 2) for k, v in packs[mode].seconds.items()},
                        "reference_pairs_computed": memo.computed,
                        "train_tokens_per_s": round(tokens / (packs[mode].seconds["reference"] + packs[mode].seconds["training"])),
                        "peak_memory_gb": round(peak_memory_gb(device), 2)}
    shared = {"reference": reference_seconds, **index_and_gamma_seconds(users), **registry_seconds(packs["multi"].files)}
    report["shared_phase_seconds"] = {k: round(v, 2) for k, v in shared.items()}
    for mode in packs:
        seconds = sum(packs[mode].seconds.values()) + sum(shared.values())
        report[mode].update(seconds=round(seconds, 2), users_per_hour=round(3600 * len(users) / seconds, 1))
    report["ratio"] = round(report["multi"]["users_per_hour"] / report["single"]["users_per_hour"], 3)
    if args.pass_rows:  # after the paths: its passes of many rows would be every path's peak memory
        report["pass_tokens_per_s"] = pass_rates(model, config.lora, [int(n) for n in args.pass_rows.split(",")], args.seq, device)

    phases = list(packs["single"].seconds)
    print(f"{'path':8s} {'users/h':>10s} {'train tok/s':>12s} {'seconds':>9s} {'peak GB':>8s}  " + " ".join(f"{p:>10s}" for p in phases))
    for mode in ("single", "multi"):
        r = report[mode]
        print(f"{mode:8s} {r['users_per_hour']:>10.1f} {r['train_tokens_per_s']:>12d} {r['seconds']:>9.2f} {r['peak_memory_gb']:>8.2f}  "
              + " ".join(f"{r['phase_seconds'][p]:>10.2f}" for p in phases))
    pairs = report["reference_pairs"]
    print(f"π_ref, the job's pass: {pairs['computed']} distinct pairs of the {pairs['requested']} the users train on; "
          f"the paths' memos then computed {report['single']['reference_pairs_computed']} and {report['multi']['reference_pairs_computed']}")
    print("both paths: " + (", ".join(f"{k} {v:.2f} s" for k, v in report["shared_phase_seconds"].items()) or "no shared phase measured"))
    print(f"multi / single: {report['ratio']:.2f}×  ({report['device']}, {name}, {args.users} users in {n_slots} slots, {args.method}, "
          f"{args.epochs} epoch, {args.queries} queries × {args.new_tokens} tokens)")
    out = args.out / f"throughput-{report['device'].replace(' ', '-').lower()}-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0 if report.get("check", {}).get("passed", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
