"""Training throughput: users one at a time vs packed into one pass (``train_adapters``).

One run, the same users, the same machine: every user is trained alone (one LoRA slot),
then all of them together (one slot each, every step one forward/backward over all the
users still training). Users are synthetic: random token ids shaped like a short task
(``--seq`` tokens per item, the last 32–64 of them the completion) with 8–40 own items
each, one aux item per own item; only speed is measured here, quality is
``bench/quality.py``'s job. With ``--shape`` the model has random weights built from a
config (labelled so); ``--model PATH`` loads a real one.

``--check`` first trains 4 of the users together and alone on this device and dtype (LoRA
dropout 0, so that both see the same computation) and prints how far apart they end (the GPU form of tests/test_trainer_packing.py; the
tolerance is stated in the output). Needs torch, transformers and peft only, so it runs
on a GPU machine without the rest of the stack:

    PYTHONPATH=. python bench/throughput.py --shape qwen2-0.5b --check      # make gpu-check
    PYTHONPATH=. python bench/throughput.py --shape tiny --users 8           # a CPU smoke run

Writes ``bench/results/throughput-<device>-<model>.json``:
``{"device", "model", "users", "single": {...}, "multi": {...}, "ratio", "check"}``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from cbpo_orch.method.config import LoraSettings, TrainConfig
from cbpo_orch.training.encoding import EncodedPair
from cbpo_orch.training.models import load_model, resolve_device, training_dtype
from cbpo_orch.training.multi_lora import attached_multi_lora
from cbpo_orch.training.trainer import Sample, UserTraining, train_adapters

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
    rng = random.Random(seed)

    def item() -> EncodedPair:
        completion = rng.randint(32, 64)
        return EncodedPair(tuple(rng.randrange(1, vocab) for _ in range(seq)), seq - completion)

    users = []
    for u in range(n):
        own = rng.randint(8, 40)
        samples = [Sample(item(), True) for _ in range(own)] + [Sample(item(), False) for _ in range(own)]
        users.append(UserTraining(samples, gamma=0.3, seed=u))
    return users


def trained_tokens(users: list[UserTraining], epochs: int) -> int:
    return epochs * sum(len(s.pair.input_ids) for u in users for s in u.samples)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(device: torch.device, run) -> tuple[float, list]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    results = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, results


def train(model, users: list[UserTraining], config: TrainConfig, device, slots: int) -> tuple[list, list[dict]]:
    """Train ``users`` in groups of ``slots`` (1 = one at a time); results and final weights."""
    results, weights = [], []
    for start in range(0, len(users), slots):
        group = users[start : start + slots]
        with attached_multi_lora(model, config.lora, len(group)) as multi:
            results += train_adapters(multi, PadOnly(), group, config, device)
            weights += [multi.slot_state(slot) for slot in range(len(group))]
    return results, weights


def check(model, users: list[UserTraining], config: TrainConfig, device) -> dict:
    dtype = next(model.parameters()).dtype
    loss_tol, weight_tol = CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE[torch.bfloat16])
    together, packed = train(model, users, config, device, slots=len(users))
    alone, single = train(model, users, config, device, slots=1)
    loss_diff = max(
        abs(a - b) / max(abs(b), 1e-6) for t, s in zip(together, alone) for a, b in zip(t.losses, s.losses)
    )
    weight_diff = max(
        float((p[k].float() - s[k].float()).abs().max() / s[k].float().abs().max().clamp_min(1e-12)) for p, s in zip(packed, single) for k in s
    )
    passed = loss_diff <= loss_tol and weight_diff <= weight_tol
    print(f"check ({dtype}, {len(users)} users, together vs alone): max loss rel diff {loss_diff:.2e} (≤ {loss_tol:g}), "
          f"max weight diff {weight_diff:.2e} of the largest weight (≤ {weight_tol:g}): {'PASS' if passed else 'FAIL'}", flush=True)
    return {"dtype": str(dtype), "loss_rel_diff": loss_diff, "weight_rel_diff": weight_diff, "tolerance": [loss_tol, weight_tol], "passed": passed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="a local model folder")
    source.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b", help="random weights of this shape")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256, help="tokens per item")
    parser.add_argument("--method", default="cbpo")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--check", action="store_true", help="first check packed = alone on this device")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON report")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    model, name = build_model(args, device)
    config = TrainConfig(method=args.method, epochs=args.epochs)
    users = synthetic_users(args.users, args.seq, model.config.vocab_size)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "model": name, "users": args.users,
              "seq": args.seq, "method": args.method, "epochs": args.epochs}
    if args.check:
        report["check"] = check(model, users[:4], replace(config, lora=LoraSettings(dropout=0.0)), device)

    tokens = trained_tokens(users, args.epochs)
    for mode, slots in (("single", 1), ("multi", len(users))):
        seconds, _ = timed(device, lambda: train(model, users, config, device, slots))
        report[mode] = {"seconds": round(seconds, 2), "users_per_hour": round(3600 * len(users) / seconds, 1),
                        "train_tokens_per_s": round(tokens / seconds), "peak_memory_gb": round(peak_memory_gb(device), 2)}
    report["ratio"] = round(report["multi"]["users_per_hour"] / report["single"]["users_per_hour"], 3)

    print(f"{'path':8s} {'users/h':>10s} {'train tok/s':>12s} {'seconds':>9s} {'peak GB':>8s}")
    for mode in ("single", "multi"):
        r = report[mode]
        print(f"{mode:8s} {r['users_per_hour']:>10.1f} {r['train_tokens_per_s']:>12d} {r['seconds']:>9.2f} {r['peak_memory_gb']:>8.2f}")
    print(f"multi / single: {report['ratio']:.2f}×  ({report['device']}, {name}, {args.users} users, {args.method}, {args.epochs} epoch)")
    out = args.out / f"throughput-{report['device'].replace(' ', '-').lower()}-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0 if report.get("check", {}).get("passed", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
