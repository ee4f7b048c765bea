"""Cross-user batched generation against one request at a time, on one base model.

This is what a ``cbpo-orch serve`` replica does inside (``cbpo_orch/serving/generator.py``),
without Ray or HTTP: the adapters of ``--users`` users sit in the slots of one multi-user
LoRA layer over one base model, and each request is a row routed to its user's slot. Every
level answers the same ``--requests`` requests, cycling over the users, in batches of 1
(one request at a time), 8 and 32 rows, and reports rows/s and generated tokens/s. First it
checks that 8 rows generated together give the same greedy tokens as each row alone.

The adapters are synthetic (peft's initial A, a random B: speed does not depend on their
values). With ``--shape`` the model has random weights built from a config (labelled so)
and a stand-in tokenizer that only names token ids; ``--model PATH`` loads a real model and
its tokenizer. It needs torch, transformers and peft only, so it is part of
``make gpu-check``:

    PYTHONPATH=. python bench/batched_generation.py --shape qwen2-0.5b --device cuda
    PYTHONPATH=. python bench/batched_generation.py --shape tiny --device cpu    # a smoke run

Writes ``bench/results/generation-<device>-<model>.json``:
``{"device", "model", "users", "max_tokens", "levels": {"1": {"rows_per_s", "tokens_per_s"}, …}, "ratio", "check"}``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from bench.throughput import SHAPES, build_model
from cbpo_orch.method.config import LoraSettings
from cbpo_orch.serving.generator import BatchedGenerator, Row, UserAdapter
from cbpo_orch.training.models import LoadedModel, load_tokenizer, resolve_device
from cbpo_orch.training.multi_lora import attached_multi_lora

HERE = Path(__file__).resolve().parent
LEVELS = (1, 8, 32)
LORA = LoraSettings()


class TokenIds:
    """A stand-in tokenizer for random weights: it pads with 0, ends at 1 and spells ids."""

    pad_token_id = 0
    eos_token_id = 1

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


@torch.no_grad()
def fill_synthetic_slots(multi, seed: int = 0) -> None:
    """Every slot of ``multi`` a synthetic user: peft's initial A (the slot's seed), a random B."""
    generator = torch.Generator().manual_seed(seed)
    for slot in range(multi.n_slots):
        multi.init_slot(slot, seed=slot)
        for layer in multi.layers.values():
            layer.lora_B[slot].copy_(torch.randn(layer.lora_B.shape[1:], generator=generator).to(layer.lora_B) * 0.02)


def synthetic_adapters(model, users: int, seed: int = 0) -> list[UserAdapter]:
    """``users`` adapters of the serving layout, read out of :func:`fill_synthetic_slots`."""
    with attached_multi_lora(model, LORA, users) as multi:
        fill_synthetic_slots(multi, seed)
        return [UserAdapter(f"user-{slot:02d}", multi.slot_state(slot)) for slot in range(users)]


def requests(adapters: list[UserAdapter], n: int, prompt_tokens: int, vocab: int, max_tokens: int, seed: int = 0) -> list[Row]:
    rng = random.Random(seed)
    return [Row([rng.randrange(2, vocab) for _ in range(prompt_tokens)], max_tokens, adapters[i % len(adapters)]) for i in range(n)]


def check(engine: BatchedGenerator, rows: list[Row]) -> dict:
    """Rows generated together against each alone: how many give the same tokens."""
    together = engine.generate(rows)
    alone = [engine.generate([row])[0] for row in rows]
    same = sum(a.text == b.text for a, b in zip(together, alone))
    return {"rows": len(rows), "identical": same, "passed": same == len(rows)}


def level(engine: BatchedGenerator, rows: list[Row], batch: int, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    tokens = 0
    for first in range(0, len(rows), batch):
        tokens += sum(c.completion_tokens for c in engine.generate(rows[first : first + batch]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"rows_per_s": round(len(rows) / seconds, 3), "tokens_per_s": round(tokens / seconds, 1), "seconds": round(seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b", help="random weights of this shape (unless --model)")
    parser.add_argument("--model", type=Path, default=None, help="a local model folder instead of --shape")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)

    model, name = build_model(args, device)
    tokenizer = load_tokenizer(args.model) if args.model else TokenIds()
    loaded = LoadedModel(model=model, tokenizer=tokenizer, device=device, path=str(args.model or name))
    adapters = synthetic_adapters(model, args.users)
    engine = BatchedGenerator(loaded, LORA, max(LEVELS))
    vocab = model.config.vocab_size
    rows = requests(adapters, args.requests, args.prompt_tokens, vocab, args.max_tokens)
    checked = check(engine, rows[:8])
    engine.generate(rows[:1])  # warm-up
    levels = {str(batch): level(engine, rows, batch, device) for batch in LEVELS}
    ratio = round(levels[str(max(LEVELS))]["rows_per_s"] / levels["1"]["rows_per_s"], 3)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "model": name, "users": args.users,
              "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens, "requests": args.requests, "levels": levels,
              "ratio": ratio, "check": checked}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"generation-{device.type}-{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{name} on {report['device']}: {args.users} users, {args.requests} requests of {args.max_tokens} tokens")
    print(f"check: {checked['identical']}/{checked['rows']} rows generated together equal each alone")
    print("| rows per batch | rows/s | tokens/s |\n|---|---|---|")
    for batch, measured in levels.items():
        print(f"| {batch} | {measured['rows_per_s']} | {measured['tokens_per_s']} |")
    print(f"batched ({max(LEVELS)}) / one at a time: {ratio}×   wrote {path}")
    return 0 if checked["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
