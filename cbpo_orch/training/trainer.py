"""Training adapters: the recipe (METHOD.md §2, §3, §7), for one user or many at once.

Read top to bottom: fresh LoRA slots on the frozen base (``multi_lora.py``) → reference
log-probs once per sample (LoRA disabled = π_ref) → each user's epochs of mixed batches
(every batch holds positive and auxiliary items) → every step packs the next batch of
each user still training into one forward/backward (on a CPU, one per user: ``users_per_pass``),
each row routed to its user's slot → the method's per-user losses, summed (a row's
gradient reaches only its own slot) → AdamW
per user (``multi_optim.py``: own step count, schedule and clipping) → with a
``validate`` score, each user keeps its best epoch, the starting model included
(``selection.py``).

One user is the same loop with one slot, so the single-user and multi-user paths share
every line, and packing never changes a user's result (tests/test_trainer_packing.py).
"""

from __future__ import annotations

import heapq
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from cbpo_orch.data.tasks import Budgets
from cbpo_orch.method import methods, objectives
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.method.methods import method_spec
from cbpo_orch.method.reference import kto_reference, make_reference
from cbpo_orch.method.selection import best_epoch
from cbpo_orch.training.encoding import EncodedPair, collate, encode_pair
from cbpo_orch.training.logprobs import completion_logps, sequence_logps
from cbpo_orch.training.micro_batch import checkpointing_pays, micro_batch_rows
from cbpo_orch.training.multi_lora import MultiLora
from cbpo_orch.training.multi_optim import SlotAdamW, slots_present
from cbpo_orch.training.numerics import NumericalError, check_finite_losses
from cbpo_orch.training.reference_logps import ReferenceLogps

StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class Sample:
    """One training item: its encoded pair and which side it is on."""

    pair: EncodedPair
    positive: bool


@dataclass
class UserTraining:
    """One user's work for :func:`train_adapters`: samples, γ, the seed of its adapter's
    init and batch order, KTO's mismatched pairs, and an optional selection score (called
    with the model routed to the user's slot; higher is better)."""

    samples: list[Sample]
    gamma: float = 0.0
    seed: int = 0
    kl_pairs: list[EncodedPair] | None = None
    validate: Callable[[], float] | None = None


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    reference_seconds: float = 0.0
    reference_state: dict | None = None
    validation_scores: list[float] = field(default_factory=list)
    selected_epoch: int | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encode_samples(tokenizer, pairs: list[tuple[str, str]], positive: bool, budgets: Budgets) -> list[Sample]:
    return [Sample(encode_pair(tokenizer, x, y, budgets), positive) for x, y in pairs]


def mismatched_pairs(tokenizer, pairs: list[tuple[str, str]], budgets: Budgets) -> list[EncodedPair]:
    """KTO's (x, y′) pairs of ``pairs`` (``methods.mismatched_pairs``), encoded."""
    return [encode_pair(tokenizer, x, y, budgets) for x, y in methods.mismatched_pairs(pairs)]


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


def epoch_parts(aux: list[int], n: int) -> list[list[int]]:
    """``aux`` in ``n`` consecutive parts of near-equal size, the larger first (fewer where
    fewer items; one empty part for none): with ``aux_resample``, epoch e trains on part e."""
    n = max(1, min(n, len(aux)))
    size, larger = divmod(len(aux), n)
    bounds = [k * size + min(k, larger) for k in range(n + 1)]
    return [aux[bounds[k] : bounds[k + 1]] for k in range(n)]


def _stream(items: list[int], rng: random.Random) -> Iterator[int]:
    while True:
        yield from rng.sample(items, len(items))


class _BestEpoch:
    """One slot's adapter weights and reference-point state at its best-scoring epoch so far."""

    def __init__(self, multi: MultiLora, slot: int, reference, validate: Callable[[], float]):
        self.multi, self.slot, self.reference, self.validate = multi, slot, reference, validate
        self.scores: list[float] = []
        self.best: tuple[list[torch.Tensor], dict] | None = None

    def score(self) -> None:
        """Score the slot's adapter as it is now; keep a copy when it is the best so far."""
        with self.multi.only(self.slot):
            self.scores.append(float(self.validate()))
        if best_epoch(self.scores) == len(self.scores) - 1:
            self.best = ([p[self.slot].detach().clone() for p in self.multi.parameters()], self.reference.user_state(self.slot))

    @torch.no_grad()
    def restore(self) -> int:
        """Put the best epoch's weights and reference state back; returns that epoch."""
        weights, state = self.best
        for param, saved in zip(self.multi.parameters(), weights):
            param[self.slot].copy_(saved)
        self.reference.load_user_state(self.slot, state)
        return best_epoch(self.scores)


class MethodLoss:
    """The method's per-user losses [U] for one batch, by the objective its ``MethodSpec``
    names, with the per-user state (γ, reference point)."""

    def __init__(self, config: TrainConfig, gammas: torch.Tensor):
        self.config = config
        self.method = method_spec(config.method)
        self.gammas = gammas
        self.n_users = len(gammas)
        self.reference = make_reference(self.method.reference or config.reference, self.n_users, config.ema_decay)

    def __call__(self, logp, n_tokens, ref_logp, positive, user, kl_logratio=None) -> torch.Tensor:
        if self.method.objective == "sft":
            include = torch.ones_like(positive) if self.method.uses_aux else positive
            return objectives.sft_loss(logp, n_tokens, include, user, self.n_users)
        rewards = self.config.resolved_beta * (logp - ref_logp)
        return getattr(self, f"_{self.method.objective}")(rewards, positive, user, kl_logratio)

    def _kto(self, rewards, positive, user, kl_logratio) -> torch.Tensor:
        delta = kto_reference(kl_logratio, user, self.n_users, self.config.resolved_beta)
        return objectives.kto_loss(rewards, positive, user, delta, self.n_users, self.config.kto_lambda_d, self.config.kto_lambda_u)

    def _bco(self, rewards, positive, user, kl_logratio) -> torch.Tensor:
        self.reference.update(rewards.detach(), positive, user)
        return objectives.bco_loss(rewards, positive, user, self.reference.delta(), self.n_users)

    def _cbpo(self, rewards, positive, user, kl_logratio) -> torch.Tensor:
        self.reference.update(rewards.detach(), positive, user)
        return objectives.cbpo_loss(rewards, positive, user, self.reference.delta(), self.gammas, self.n_users, self.method.cbpo_variant)


@dataclass
class _Plan:
    """One user's steps: (batch of sample indices, whether it ends an epoch), in order."""

    steps: list[tuple[list[int], bool]]

    @classmethod
    def of(cls, user: UserTraining, config: TrainConfig) -> "_Plan":
        rng = random.Random(user.seed)
        positive = [i for i, s in enumerate(user.samples) if s.positive]
        aux = [i for i, s in enumerate(user.samples) if not s.positive]
        parts = epoch_parts(aux, config.resolved_epochs if config.aux_resample else 1)
        steps = []
        for epoch in range(config.resolved_epochs):
            batches = mixed_batches(positive, parts[epoch % len(parts)], config.batch_size, rng)
            steps += [(batch, k == len(batches) - 1) for k, batch in enumerate(batches)]
        return cls(steps)


def slot_schedule(lengths: list[int], n_slots: int) -> list[tuple[int, int]]:
    """(slot, first step) of each user, in order, when ``n_slots`` slots train users of
    ``lengths`` steps: the first users take the slots at step 0, and each slot, when its user
    ends, takes the next waiting user at the next step (the lowest slot first on a tie)."""
    if any(length < 1 for length in lengths):
        raise ValueError("every user needs at least one training step")
    free = [(0, slot) for slot in range(min(n_slots, len(lengths)))]
    schedule = []
    for length in lengths:
        start, slot = heapq.heappop(free)
        schedule.append((slot, start))
        heapq.heappush(free, (start + length, slot))
    return schedule


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def backward_by_rows(
    logps_of: Callable[[slice], tuple[torch.Tensor, torch.Tensor]],
    n_rows: int,
    micro_rows: int,
    losses_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    device,
) -> torch.Tensor:
    """Backpropagate ``losses_of(logp, n_tokens).sum()`` for a batch of ``n_rows`` rows whose
    log-probs ``logps_of(rows)`` gives, ``micro_rows`` rows through the model at a time;
    returns the losses, detached.

    A loss reads batch-wide quantities (C-BPO's δ and bracket move with the batch's means, SFT
    divides by the batch's tokens), so a micro-batch's loss is no share of the batch's. The
    rows' log-probs come first, with no graph; the losses and their gradient with respect to
    each row's log-prob are then taken once, on the whole batch (δ updated once, the bracket's
    sign taken once); each micro-batch then runs again with a graph and backpropagates its
    rows' log-probs times those gradients, which by the chain rule add up to the whole batch's
    gradient. A micro-batch's second run replays its first's random state: dropout draws the
    same masks. With ``micro_rows ≥ n_rows`` it is one plain forward/backward."""
    if micro_rows >= n_rows:
        logp, n_tokens = logps_of(slice(0, n_rows))
        losses = losses_of(logp, n_tokens)
        losses.sum().backward()
        return losses.detach()
    starts = range(0, n_rows, micro_rows)
    states, parts = [], []
    with torch.no_grad():
        for start in starts:
            states.append(_rng_state(device))
            parts.append(logps_of(slice(start, start + micro_rows)))
    logp = torch.cat([part for part, _ in parts]).requires_grad_()
    losses = losses_of(logp, torch.cat([n for _, n in parts]))
    losses.sum().backward()
    for start, state in zip(starts, states):
        _set_rng_state(device, state)
        part, _ = logps_of(slice(start, start + micro_rows))
        part.backward(logp.grad[start : start + micro_rows])
    return losses.detach()


DoneCallback = Callable[[int, int, TrainResult], None]


def users_per_pass(device: torch.device | str, n_slots: int) -> int:
    """Users whose rows share one forward/backward on ``device``: every slot on a CUDA device
    (one user's batch leaves it mostly idle), one elsewhere. A CPU runs a pass of 64 rows at
    0.55× the tokens/s of a pass of 8 (commit-lm-17m, 256 tokens a row, 2 cores: 974 vs 1,781,
    ``bench/throughput.py --pass-rows 8,64``), so there each user's rows go alone and the pack
    shares only the optimizer step."""
    return n_slots if torch.device(device).type == "cuda" else 1


def train_adapters(
    multi: MultiLora,
    tokenizer,
    users: list[UserTraining],
    config: TrainConfig,
    device: torch.device,
    on_step: StepCallback | None = None,
    on_done: DoneCallback | None = None,
    reference: ReferenceLogps | None = None,
    per_pass: int | None = None,
    micro_rows: int | None = None,
) -> list[TrainResult]:
    """Train ``users`` with ``config.method`` in the slots of ``multi``, every user in a slot
    in the same steps; each user starts from a fresh adapter (its seed). A step's rows go
    through the model ``per_pass`` users at a time (``users_per_pass`` of the device by
    default), their gradients meeting in one optimizer step; a user's result does not depend
    on it. A pass whose activations would pass the activation budget is checkpointed
    (``checkpointing_pays``), and its rows go through the model ``micro_rows`` at a time (by
    default as many as ``micro_batch_rows`` finds within the budget), with the whole pass's
    losses and gradients (``backward_by_rows``); either costs one more forward per step.

    With more users than slots, a slot whose user ends takes the next one (``slot_schedule``);
    ``on_done(user, slot, result)`` is then called while the slot still holds the ended
    user's adapter (export it there), and is required. A user with ``validate`` is scored at
    its start and after every epoch, and its slot ends at the best of them. π_ref's
    log-probs come from ``reference`` (a fresh one by default): a pair shared by several
    users, or seen by an earlier call with the same memo, goes through the model once.
    Results come back in the order of ``users``."""
    pack = _PackTrainer(multi, tokenizer, users, config, device, reference, per_pass, micro_rows, on_done)
    for t in range(pack.total_steps):
        for u in pack.starting[t]:
            pack.begin(u, t)
        mean_loss, ended = pack.step(t)
        if on_step is not None:
            on_step(t + 1, pack.total_steps, mean_loss)
        for u in ended:
            pack.end(u)
    multi.model.eval()
    pack.loss_fn.reference.eval()
    return pack.results


@dataclass
class _Active:
    """A user while it holds a slot: its slot, its first step, π_ref's log-probs of its
    samples (and of KTO's mismatched pairs), its epoch selection and this epoch's losses."""

    slot: int
    first_step: int
    ref_logps: torch.Tensor | None
    ref_kl: torch.Tensor | None
    selection: _BestEpoch | None
    epoch_losses: list[float] = field(default_factory=list)


class _PackTrainer:
    """The state of one :func:`train_adapters` call: users' plans and slots, the optimizer,
    the loss and its reference points; :meth:`begin` puts a user in its slot, :meth:`step`
    trains every active user one step, :meth:`end` hands an ended user's adapter over."""

    def __init__(self, multi: MultiLora, tokenizer, users: list[UserTraining], config: TrainConfig, device, reference: ReferenceLogps | None,
                 per_pass: int | None, micro_rows: int | None, on_done: DoneCallback | None):
        if len(users) > multi.n_slots and on_done is None:
            raise ValueError(f"{len(users)} users for {multi.n_slots} adapter slots need an on_done that takes each ended adapter")
        self.per_pass = users_per_pass(device, multi.n_slots) if per_pass is None else per_pass
        if self.per_pass < 1 or (micro_rows is not None and micro_rows < 1):
            raise ValueError("per_pass and micro_rows must be ≥ 1")
        seed_everything(config.seed)
        self.multi, self.users, self.config, self.device = multi, users, config, device
        self.micro_rows, self.on_done = micro_rows, on_done
        self.reference = ReferenceLogps() if reference is None else reference
        self.started = time.perf_counter()
        self.pad_id = tokenizer.pad_token_id
        self.plans = [_Plan.of(user, config) for user in users]
        self.schedule = slot_schedule([len(plan.steps) for plan in self.plans], multi.n_slots)
        self.starting: dict[int, list[int]] = defaultdict(list)
        for u, (_, start) in enumerate(self.schedule):
            self.starting[start].append(u)
        self.total_steps = max(start + len(plan.steps) for (_, start), plan in zip(self.schedule, self.plans))
        self.optimizer = SlotAdamW(multi.parameters(), multi.n_slots, config.resolved_lr, config.max_grad_norm, config.weight_decay)
        self.gammas = torch.zeros(multi.n_slots, dtype=torch.float32, device=device)
        self.loss_fn = MethodLoss(config, self.gammas)
        self.fresh_reference = self.loss_fn.reference.user_state(0)
        self.results = [TrainResult() for _ in users]
        self.active: dict[int, int] = {}  # slot → user
        self.state: dict[int, _Active] = {}  # user → its state while active

    def begin(self, u: int, t: int) -> None:
        slot, user, steps = self.schedule[u][0], self.users[u], len(self.plans[u].steps)
        self.multi.reset_slot(slot, user.seed)
        self.optimizer.reset_slot(slot, steps, math.ceil(self.config.warmup_ratio * steps))
        self.loss_fn.reference.load_user_state(slot, self.fresh_reference)
        self.gammas[slot] = user.gamma
        reference_started = time.perf_counter()
        ref_logps, ref_kl = _reference_logps(self.reference, self.multi, user, self.pad_id, self.config, self.device)
        if ref_logps is not None:
            self.results[u].reference_seconds = time.perf_counter() - reference_started
        selection = None if user.validate is None else _BestEpoch(self.multi, slot, self.loss_fn.reference, user.validate)
        self.active[slot] = u
        self.state[u] = _Active(slot, t, ref_logps, ref_kl, selection)
        if selection is not None:
            selection.score()

    def step(self, t: int) -> tuple[float, list[int]]:
        """Step ``t`` of every active user: (the mean of their losses, the users it ended)."""
        self.multi.model.train()
        slots = sorted(self.active)
        batches = {slot: self.plans[self.active[slot]].steps[t - self.state[self.active[slot]].first_step] for slot in slots}
        self.optimizer.zero_grad()
        values = sum(self._forward_backward(slots[i : i + self.per_pass], batches) for i in range(0, len(slots), self.per_pass)).tolist()
        check_finite_losses(values, slots, t, self.total_steps, self.config.method)  # before any weight moves
        self.optimizer.step(slots_present(torch.tensor(slots, device=self.device), self.multi.n_slots))
        ended = []
        for slot in slots:
            u, (_, ends_epoch) = self.active[slot], batches[slot]
            result, state = self.results[u], self.state[u]
            result.steps += 1
            result.losses.append(values[slot])
            state.epoch_losses.append(values[slot])
            if ends_epoch:
                result.epoch_losses.append(float(np.mean(state.epoch_losses)))
                state.epoch_losses = []
                if state.selection is not None:
                    state.selection.score()
            if result.steps == len(self.plans[u].steps):
                ended.append(u)
        return float(np.mean([values[slot] for slot in slots])), ended

    def end(self, u: int) -> None:
        state, result = self.state.pop(u), self.results[u]
        if state.selection is not None:
            result.selected_epoch = state.selection.restore()
            result.validation_scores = state.selection.scores
        if not all(bool(torch.isfinite(p[state.slot]).all()) for p in self.multi.parameters()):
            raise NumericalError(f"the {self.config.method} adapter's weights are not finite after training (slot {state.slot} of the pack)")
        result.reference_state = self.loss_fn.reference.user_state(state.slot)
        result.seconds = time.perf_counter() - self.started
        del self.active[state.slot]
        if self.on_done is not None:
            self.on_done(u, state.slot, result)

    def _forward_backward(self, group: list[int], batches: dict[int, tuple[list[int], bool]]) -> torch.Tensor:
        """One forward/backward over the rows (``batches``) of the users in the slots of
        ``group``: their gradients added to the slots' ``.grad``; the losses [n_slots],
        detached (0 outside ``group``), on the device (read once per step, after every pass)."""
        multi, model, device, pad_id = self.multi, self.multi.model, self.device, self.pad_id
        states = {slot: self.state[self.active[slot]] for slot in group}
        rows = [(slot, i) for slot in group for i in batches[slot][0]]
        samples = {slot: self.users[self.active[slot]].samples for slot in group}
        slots = torch.tensor([slot for slot, _ in rows], device=device)
        index = {slot: torch.tensor(batches[slot][0], device=device) for slot in group}
        pairs = [samples[slot][i].pair for slot, i in rows]
        width = max(len(p.input_ids) for p in pairs)
        checkpointed = checkpointing_pays(model, len(rows), width, device)
        micro = micro_batch_rows(model, len(rows), width, device, checkpointed) if self.micro_rows is None else self.micro_rows
        positive = torch.tensor([samples[slot][i].positive for slot, i in rows], device=device)
        ref = torch.cat([states[slot].ref_logps[index[slot]] for slot in group]) if self.loss_fn.method.uses_reference else None
        kl_logratio = None
        if self.loss_fn.method.mismatched:
            kl_batch = [self.users[self.active[slot]].kl_pairs[i] for slot, i in rows]
            kl_ref = torch.cat([states[slot].ref_kl[index[slot]] for slot in group])
            kl_logps = []
            for start in range(0, len(rows), micro):
                with multi.routed(slots[start : start + micro]):
                    kl_logps.append(sequence_logps(model, kl_batch[start : start + micro], pad_id, micro, device))
            kl_logratio = torch.cat(kl_logps) - kl_ref

        def logps_of(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
            with multi.routed(slots[part]):
                return completion_logps(model, collate(pairs[part], pad_id).to(device))

        losses_of = lambda logp, n_tokens: self.loss_fn(logp, n_tokens, ref, positive, slots, kl_logratio)  # noqa: E731
        with multi.checkpointed(checkpointed):
            return backward_by_rows(logps_of, len(rows), micro, losses_of, device)


def _reference_logps(reference: ReferenceLogps, multi: MultiLora, user: UserTraining, pad_id: int, config: TrainConfig, device):
    """π_ref's summed log-probs of the user's samples (and KTO's mismatched pairs), with the
    adapters off; none for a method that never compares with π_ref (SFT)."""
    if not method_spec(config.method).uses_reference:
        return None, None
    n, kl_pairs = len(user.samples), user.kl_pairs or []
    logps = reference(multi, [s.pair for s in user.samples] + kl_pairs, pad_id, config.eval_batch_size, device)
    if torch.device(device).type == "cuda":  # its seconds are the pass's, not its launch's
        torch.cuda.synchronize(device)
    return logps[:n], (logps[n:] if kl_pairs else None)


def train_and_hold(
    multi: MultiLora,
    tokenizer,
    users: list[UserTraining],
    config: TrainConfig,
    device: torch.device,
    on_step: StepCallback | None = None,
    reference: ReferenceLogps | None = None,
) -> tuple[list[TrainResult], list[dict[str, torch.Tensor]]]:
    """:func:`train_adapters` with each user's final adapter held as ``slot_state`` gives it,
    so that a pack of more users than slots keeps every one: results and adapters, in the
    order of ``users``."""
    held: dict[int, dict[str, torch.Tensor]] = {}
    results = train_adapters(
        multi, tokenizer, users, config, device, on_step, on_done=lambda u, slot, _: held.setdefault(u, multi.slot_state(slot)), reference=reference
    )
    return results, [held[u] for u in range(len(users))]


def slot_groups(multi: MultiLora, adapters: list[dict[str, torch.Tensor]]) -> Iterator[list[int]]:
    """The indices of ``adapters``, ``multi.n_slots`` at a time; before each group is
    yielded its adapters are loaded into slots 0, 1, … in order."""
    for first in range(0, len(adapters), multi.n_slots):
        group = list(range(first, min(first + multi.n_slots, len(adapters))))
        for slot, u in enumerate(group):
            multi.load_slot(slot, adapters[u])
        yield group


def adapter_files(multi: MultiLora, slot: int, trainer_state: dict | None = None) -> dict[str, bytes]:
    """Slot ``slot``'s adapter in stock peft format (``adapter_config.json`` +
    ``adapter_model.safetensors``), plus ``trainer_state.json`` when given (the
    reference-point state and the loss curve, so a checkpoint can be resumed)."""
    files = multi.export_slot(slot)
    if trainer_state is not None:
        files["trainer_state.json"] = json.dumps(trainer_state).encode()
    return files
