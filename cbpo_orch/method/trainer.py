"""Training one adapter: the recipe (METHOD.md §2, §3, §7).

Read top to bottom: attach a LoRA adapter → encode the pairs → reference log-probs once
per sample (adapter disabled = π_ref) → epochs of mixed batches (every batch holds
positive and auxiliary items) → the method's loss → AdamW with linear warm-up/decay →
with a ``validate`` score, keep the best epoch, the starting model included (``selection.py``).

The inner step carries no single-user assumption: each sample has a user index and
every piece of per-user state (γ, reference point) is a tensor over users, so training
many users' adapters in one pass is a change of scheduling, not a rewrite.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import get_linear_schedule_with_warmup

from cbpo_orch.method import objectives
from cbpo_orch.method.config import LoraSettings, TrainConfig
from cbpo_orch.method.encoding import EncodedPair, collate, completion_logps, encode_pair
from cbpo_orch.method.reference import kto_reference, make_reference
from cbpo_orch.method.selection import best_epoch
from cbpo_orch.method.tasks import Budgets

StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class Sample:
    """One training item: its encoded pair, whose it is, and which side it is on."""

    pair: EncodedPair
    positive: bool
    user: int = 0


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    reference_state: dict | None = None
    validation_scores: list[float] = field(default_factory=list)
    selected_epoch: int | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def attached_adapter(model, lora: LoraSettings, seed: int):
    """A fresh LoRA adapter on ``model`` for the duration of the block; the base model
    comes back untouched afterwards, so one loaded model serves user after user."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    try:
        yield peft_model
    finally:
        peft_model.unload()


def encode_samples(tokenizer, pairs: list[tuple[str, str]], positive: bool, budgets: Budgets, user: int = 0) -> list[Sample]:
    return [Sample(encode_pair(tokenizer, x, y, budgets), positive, user) for x, y in pairs]


def mismatched_pairs(tokenizer, pairs: list[tuple[str, str]], budgets: Budgets) -> list[EncodedPair]:
    """KTO's (x, y′) pairs: each prompt with the next item's completion (cyclic)."""
    n = len(pairs)
    return [encode_pair(tokenizer, pairs[i][0], pairs[(i + 1) % n][1], budgets) for i in range(n)]


@torch.no_grad()
def sequence_logps(model, pairs: list[EncodedPair], pad_id: int, batch_size: int, device) -> torch.Tensor:
    """Summed completion log-probs of ``pairs`` under ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    out = [
        completion_logps(model, collate(pairs[i : i + batch_size], pad_id).to(device))[0].float()
        for i in range(0, len(pairs), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, device=device)


def held_out_logp(model, pairs: list[EncodedPair], pad_id: int, batch_size: int, device) -> float:
    """Mean log-probability per completion token of ``pairs`` under ``model``: the
    selection score (higher is better), one forward pass over the held-out items."""
    n_tokens = sum(len(p.input_ids) - p.prompt_len for p in pairs)
    return float(sequence_logps(model, pairs, pad_id, batch_size, device).sum()) / n_tokens


def mixed_batches(positive: list[int], aux: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches, each holding both positive and aux items when aux exist.

    Each batch takes positives in proportion to their share (at least one of each side);
    both sides are drawn from reshuffled streams, so any aux:pos ratio works.
    """
    total = len(positive) + len(aux)
    n_batches = math.ceil(total / batch_size)
    if not aux:
        order = rng.sample(positive, len(positive))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    k_pos = min(max(round(batch_size * len(positive) / total), 1), batch_size - 1)
    pos_stream, aux_stream = _stream(positive, rng), _stream(aux, rng)
    return [
        [next(pos_stream) for _ in range(k_pos)] + [next(aux_stream) for _ in range(batch_size - k_pos)]
        for _ in range(n_batches)
    ]


def _stream(items: list[int], rng: random.Random) -> Iterator[int]:
    while True:
        yield from rng.sample(items, len(items))


class _BestEpoch:
    """The adapter weights and reference-point state of the best-scoring epoch so far."""

    def __init__(self, trainable: list[torch.Tensor], reference, validate: Callable[[], float]):
        self.trainable, self.reference, self.validate = trainable, reference, validate
        self.scores: list[float] = []
        self.best: tuple[list[torch.Tensor], dict] | None = None

    def score(self) -> None:
        """Score the adapter as it is now; keep a copy when it is the best so far."""
        self.scores.append(float(self.validate()))
        if best_epoch(self.scores) == len(self.scores) - 1:
            self.best = ([p.detach().clone() for p in self.trainable], self.reference.state_dict())

    @torch.no_grad()
    def restore(self) -> int:
        """Put the best epoch's weights and reference state back; returns that epoch."""
        weights, state = self.best
        for param, saved in zip(self.trainable, weights):
            param.copy_(saved)
        self.reference.load_state_dict(state)
        return best_epoch(self.scores)


class MethodLoss:
    """The method's loss for one batch, with its per-user state (γ, reference point)."""

    def __init__(self, config: TrainConfig, gammas: torch.Tensor):
        self.config = config
        self.method = config.method
        self.gammas = gammas
        self.n_users = len(gammas)
        kind = "joint" if self.method == "bco" else config.reference
        self.reference = make_reference(kind, self.n_users, config.ema_decay)

    def __call__(self, logp, n_tokens, ref_logp, positive, user, kl_logratio=None) -> torch.Tensor:
        method, n = self.method, self.n_users
        if method in ("sft", "sft-aux"):
            include = positive if method == "sft" else torch.ones_like(positive)
            return objectives.sft_loss(logp, n_tokens, include, user, n).sum()
        rewards = self.config.beta * (logp - ref_logp)
        if method == "kto":
            delta = kto_reference(kl_logratio, user, n, self.config.beta)
            return objectives.kto_loss(
                rewards, positive, user, delta, n, self.config.kto_lambda_d, self.config.kto_lambda_u
            ).sum()
        self.reference.update(rewards.detach(), positive, user)
        delta = self.reference.delta()
        if method == "bco":
            return objectives.bco_loss(rewards, positive, user, delta, n).sum()
        variant = {"cbpo": "nonneg", "cbpo-raw": "raw", "cbpo-nnpu": "nnpu"}[method]
        return objectives.cbpo_loss(rewards, positive, user, delta, self.gammas, n, variant).sum()


def train_adapter(
    peft_model,
    tokenizer,
    samples: list[Sample],
    gammas: torch.Tensor,
    config: TrainConfig,
    device: torch.device,
    kl_pairs: list[EncodedPair] | None = None,
    on_step: StepCallback | None = None,
    validate: Callable[[], float] | None = None,
) -> TrainResult:
    """Train the attached adapter of ``peft_model`` on ``samples`` with ``config.method``.

    With ``validate`` (a score of the model as it is, higher is better) the starting
    model and every epoch are scored, and the adapter ends at the best of them."""
    seed_everything(config.seed)
    rng = random.Random(config.seed)
    pad_id = tokenizer.pad_token_id
    started = time.perf_counter()

    pairs = [s.pair for s in samples]
    with peft_model.disable_adapter():
        ref_logps = sequence_logps(peft_model, pairs, pad_id, config.eval_batch_size, device)
        ref_kl = sequence_logps(peft_model, kl_pairs, pad_id, config.eval_batch_size, device) if kl_pairs else None
    positive_flags = torch.tensor([s.positive for s in samples], device=device)
    users = torch.tensor([s.user for s in samples], device=device)

    positive_idx = [i for i, s in enumerate(samples) if s.positive]
    aux_idx = [i for i, s in enumerate(samples) if not s.positive]
    epochs = config.resolved_epochs
    plan = [mixed_batches(positive_idx, aux_idx, config.batch_size, rng) for _ in range(epochs)]
    total_steps = sum(len(batches) for batches in plan)

    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)
    loss_fn = MethodLoss(config, gammas)
    result = TrainResult()
    selection = _BestEpoch(trainable, loss_fn.reference, validate) if validate is not None else None
    if selection is not None:
        selection.score()

    peft_model.train()
    for batches in plan:
        epoch_losses = []
        for idx in batches:
            index = torch.tensor(idx, device=device)
            batch = collate([pairs[i] for i in idx], pad_id).to(device)
            logp, n_tokens = completion_logps(peft_model, batch)
            kl_logratio = None
            if config.method == "kto":
                kl_logratio = sequence_logps(peft_model, [kl_pairs[i] for i in idx], pad_id, len(idx), device) - ref_kl[index]
            loss = loss_fn(logp, n_tokens, ref_logps[index], positive_flags[index], users[index], kl_logratio)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            result.steps += 1
            result.losses.append(loss.item())
            epoch_losses.append(loss.item())
            if on_step is not None:
                on_step(result.steps, total_steps, loss.item())
        result.epoch_losses.append(float(np.mean(epoch_losses)))
        if selection is not None:
            selection.score()
            peft_model.train()
    if selection is not None:
        result.selected_epoch = selection.restore()
        result.validation_scores = selection.scores
    peft_model.eval()
    loss_fn.reference.eval()
    result.reference_state = loss_fn.reference.state_dict()
    result.seconds = time.perf_counter() - started
    return result


def adapter_files(peft_model, trainer_state: dict | None = None) -> dict[str, bytes]:
    """The attached adapter in stock peft format (``adapter_config.json`` +
    ``adapter_model.safetensors``), plus ``trainer_state.json`` when given (the
    reference-point state and the loss curve, so a checkpoint can be resumed)."""
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        if trainer_state is not None:
            (Path(tmp) / "trainer_state.json").write_text(json.dumps(trainer_state))
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
