"""AdamW per user over stacked adapter tensors (dim 0 = slot), vectorised over slots.

Each slot is optimised exactly as one user's adapter is by the single-user trainer:
``clip_grad_norm_`` over that user's tensors, then ``torch.optim.AdamW`` (decoupled weight
decay) with the learning rate of ``get_linear_schedule_with_warmup`` for that user's total
steps. So every slot keeps its own step count, moments and schedule, its gradient norm is
taken over its own slices of all tensors (never one global norm), and a slot with no rows
in a step is not moved at all: no decay, no moment update, no step counted.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CLIP_EPS = 1e-6
"""``clip_grad_norm_`` scales by max_norm / (norm + 1e-6)."""


def linear_warmup_decay(step: Tensor, warmup: Tensor, total: Tensor) -> Tensor:
    """The factor of ``get_linear_schedule_with_warmup`` at ``step`` (steps taken so far),
    per slot, in float64: step / warmup while warming up, then linearly down to 0 at ``total``."""
    step, warmup, total = step.double(), warmup.double(), total.double()
    rising = step / warmup.clamp_min(1)
    falling = ((total - step) / (total - warmup).clamp_min(1)).clamp_min(0)
    return torch.where(step < warmup, rising, falling)


def slot_grad_norms(grads: list[Tensor]) -> Tensor:
    """The L2 norm of each slot's gradient over its slices of all ``grads`` ([N, ...] each): [N]."""
    per_tensor = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])
    return torch.linalg.vector_norm(per_tensor, dim=0)


def clip_coefficients(norms: Tensor, max_norm: float) -> Tensor:
    """The factor ``clip_grad_norm_`` scales a gradient of norm ``norms`` by: min(1, max/(norm+ε))."""
    return (max_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def slots_present(slots: Tensor, n_slots: int) -> Tensor:
    """Which of ``n_slots`` slots have at least one row in a batch routed by ``slots``: bool [N]."""
    return torch.bincount(slots, minlength=n_slots) > 0


def _per_slot(values: Tensor, like: Tensor) -> Tensor:
    """[N] values shaped to broadcast over an [N, ...] tensor, on its device (floats in its dtype)."""
    values = values.to(like.device, like.dtype) if values.is_floating_point() else values.to(like.device)
    return values.reshape(-1, *[1] * (like.dim() - 1))


class SlotAdamW:
    """AdamW with gradient-norm clipping and a linear warm-up/decay schedule, per slot.

    ``params`` are stacked tensors whose dim 0 is the slot (``MultiLora.parameters()``).
    Call :meth:`reset_slot` when a user takes a slot, with that user's total steps and
    warm-up steps; then per step: backward, :meth:`step` with the slots that had rows,
    :meth:`zero_grad`.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        n_slots: int,
        lr: float,
        max_grad_norm: float,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        if any(p.shape[0] != n_slots for p in params):
            raise ValueError(f"every parameter must be stacked over {n_slots} slots in dim 0")
        self.params, self.n_slots = params, n_slots
        self.lr, self.max_grad_norm, self.weight_decay = lr, max_grad_norm, weight_decay
        self.beta1, self.beta2 = betas
        self.eps = eps
        device = params[0].device
        self.steps = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.warmup_steps = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.total_steps = torch.zeros(n_slots, dtype=torch.long, device=device)
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    def reset_slot(self, slot: int, total_steps: int, warmup_steps: int) -> None:
        """A new user in ``slot``: zero moments and step count, and that user's schedule."""
        for moments in (self.exp_avg, self.exp_avg_sq):
            for m in moments:
                m[slot] = 0
        self.steps[slot] = 0
        self.total_steps[slot] = total_steps
        self.warmup_steps[slot] = warmup_steps

    def learning_rates(self) -> Tensor:
        """Each slot's learning rate for its next step (float64 [N])."""
        return self.lr * linear_warmup_decay(self.steps, self.warmup_steps, self.total_steps)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: Tensor) -> Tensor:
        """One optimiser step of every slot in ``active`` (bool [N]); the others are left
        bit-identical. Returns each slot's gradient norm before clipping, [N]."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        norms = slot_grad_norms(grads)
        clip = clip_coefficients(norms, self.max_grad_norm)
        lr = self.learning_rates()
        t = (self.steps + 1).double()
        decay = 1 - lr * self.weight_decay
        step_size = lr / (1 - self.beta1**t)
        bias_correction2_sqrt = (1 - self.beta2**t).sqrt()
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            keep = ~_per_slot(active, p)
            g = g * _per_slot(clip, g)
            new_m = m.lerp(g, 1 - self.beta1)
            new_v = (v * self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (new_v.sqrt() / _per_slot(bias_correction2_sqrt, p)).add_(self.eps)
            new_p = p * _per_slot(decay, p) - _per_slot(step_size, p) * new_m / denom
            m.copy_(torch.where(keep, m, new_m))
            v.copy_(torch.where(keep, v, new_v))
            p.copy_(torch.where(keep, p, new_p))
        self.steps += active.to(self.steps)
        return norms
