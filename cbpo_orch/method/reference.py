"""Reference points δ of the implicit-reward losses (METHOD.md §2, §7), per user.

``EmaReference`` is C-BPO's δ (two independent EMAs), ``JointMeanReference`` is
BCO's (running mean of every reward seen), and ``kto_reference`` is KTO's per-batch
KL estimate. The running references are stateful, like an ``nn.Module``: they have a
``training`` flag, ``update`` does nothing in eval mode (δ must not move in
evaluation, §7), and their state goes into checkpoints as a JSON-serialisable dict
(§7). All state is kept on the CPU in float64; ``delta()`` returns a CPU float64
tensor [U] that the losses move to the rewards' device and dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cbpo_orch.method.objectives import per_user_mean, per_user_sum

REFERENCE_KINDS = ("ema", "joint")


def _batch_stats(values: Tensor, user: Tensor, mask: Tensor, n_users: int) -> tuple[Tensor, Tensor]:
    """Per-user (sum, count) of the masked, detached ``values``, on the CPU in float64."""
    values = values.detach().to("cpu", torch.float64)
    user, mask = user.cpu(), mask.cpu()
    return (
        per_user_sum(values, user, mask, n_users),
        per_user_sum(torch.ones_like(values), user, mask, n_users),
    )


class _RunningReference:
    """Train/eval switch and checkpoint plumbing shared by the running references.

    Subclasses name their float64 [U] state tensors in ``_STATE`` and implement
    ``_accumulate`` and ``delta``; flags are stored as 0.0/1.0 so the whole state is
    one kind of tensor.
    """

    kind: str
    _STATE: tuple[str, ...]

    def __init__(self, n_users: int) -> None:
        if n_users < 1:
            raise ValueError(f"n_users must be >= 1, got {n_users}")
        self.n_users = n_users
        self.training = True
        for name in self._STATE:
            setattr(self, name, torch.zeros(n_users, dtype=torch.float64))

    def train(self, mode: bool = True) -> _RunningReference:
        """Set training mode (``update`` moves δ) or, with ``mode=False``, eval mode."""
        self.training = mode
        return self

    def eval(self) -> _RunningReference:
        """Set eval mode: ``update`` becomes a no-op, δ is frozen."""
        return self.train(False)

    def update(self, rewards: Tensor, positive: Tensor, user: Tensor) -> None:
        """Fold one batch of rewards [N] (detached) into the state of the users present.

        ``positive`` [N] marks H_tar samples, ``user`` [N] holds user indices. No-op in
        eval mode.
        """
        if self.training:
            self._accumulate(rewards, positive.bool(), user)

    def _accumulate(self, rewards: Tensor, positive: Tensor, user: Tensor) -> None:
        raise NotImplementedError

    def delta(self) -> Tensor:
        """δ per user: float64 CPU tensor [U]."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """JSON-serialisable state (python floats and lists); the round trip is exact."""
        state = {"kind": self.kind, "n_users": self.n_users}
        state.update({name: getattr(self, name).tolist() for name in self._STATE})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a state produced by ``state_dict`` of the same kind and size."""
        if state["kind"] != self.kind or state["n_users"] != self.n_users:
            raise ValueError(
                f"state is for kind={state['kind']!r}, n_users={state['n_users']}; "
                f"this reference is kind={self.kind!r}, n_users={self.n_users}"
            )
        for name in self._STATE:
            setattr(self, name, torch.tensor(state[name], dtype=torch.float64))

    def user_state(self, u: int) -> dict:
        """User ``u``'s state alone, as the ``state_dict`` of a one-user reference."""
        single = self.state_dict()
        single.update({"n_users": 1, **{name: [single[name][u]] for name in self._STATE}})
        return single

    def load_user_state(self, u: int, state: dict) -> None:
        """Set user ``u``'s state from a one-user ``state_dict`` (``user_state``'s output)."""
        if state["kind"] != self.kind or state["n_users"] != 1:
            raise ValueError(f"state is for kind={state['kind']!r}, n_users={state['n_users']}; expected {self.kind!r}, 1")
        for name in self._STATE:
            getattr(self, name)[u] = float(state[name][0])


class EmaReference(_RunningReference):
    """C-BPO's δ = (m₊ + m_U)/2 from two independent EMAs per user (METHOD.md §2).

    m₊ tracks the mean reward of the user's H_tar samples in each batch, m_U that of
    its H_aux samples: m ← α·m + (1−α)·batch_mean, with α = ``decay``. The first batch
    holding a user's positives (resp. aux) initialises that EMA to the batch mean
    instead (no bias toward 0). Because each EMA averages batch means, δ does not
    depend on the aux:target ratio ρ.
    """

    kind = "ema"
    _STATE = ("m_pos", "m_aux", "init_pos", "init_aux")

    def __init__(self, n_users: int, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        super().__init__(n_users)
        self.decay = decay

    def _accumulate(self, rewards: Tensor, positive: Tensor, user: Tensor) -> None:
        for mask, mean_name, init_name in (
            (positive, "m_pos", "init_pos"),
            (~positive, "m_aux", "init_aux"),
        ):
            total, count = _batch_stats(rewards, user, mask, self.n_users)
            batch_mean = total / count.clamp_min(1.0)
            old, init = getattr(self, mean_name), getattr(self, init_name).bool()
            blended = torch.where(init, self.decay * old + (1.0 - self.decay) * batch_mean, batch_mean)
            present = count > 0
            setattr(self, mean_name, torch.where(present, blended, old))
            setattr(self, init_name, (init | present).to(torch.float64))

    def delta(self) -> Tensor:
        """(m₊ + m_U)/2 where both EMAs are initialised, the initialised one if only one is, else 0."""
        n_init = self.init_pos + self.init_aux
        total = self.m_pos * self.init_pos + self.m_aux * self.init_aux
        return total / n_init.clamp_min(1.0)

    def state_dict(self) -> dict:
        """JSON-serialisable state, including ``decay``; the round trip is exact."""
        return {**super().state_dict(), "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state produced by ``state_dict``, including ``decay``."""
        super().load_state_dict(state)
        self.decay = float(state["decay"])


class JointMeanReference(_RunningReference):
    """BCO's δ: running mean of every reward seen per user, H_tar and H_aux jointly (METHOD.md §2).

    Unlike ``EmaReference`` it drifts toward the aux mean when |H_aux| > |H_tar|.
    A user with no reward seen yet has δ = 0.
    """

    kind = "joint"
    _STATE = ("total", "count")

    def _accumulate(self, rewards: Tensor, positive: Tensor, user: Tensor) -> None:
        total, count = _batch_stats(rewards, user, torch.ones_like(positive), self.n_users)
        self.total = self.total + total
        self.count = self.count + count

    def delta(self) -> Tensor:
        """Running mean of all rewards seen per user; 0 where none were seen."""
        return self.total / self.count.clamp_min(1.0)


def make_reference(kind: str, n_users: int, decay: float = 0.9) -> EmaReference | JointMeanReference:
    """Build the running reference point named ``kind`` ("ema" for C-BPO, "joint" for BCO)."""
    if kind == "ema":
        return EmaReference(n_users, decay)
    if kind == "joint":
        return JointMeanReference(n_users)
    raise ValueError(f"unknown reference kind {kind!r}; expected one of {REFERENCE_KINDS}")


def kto_reference(kl_logratio: Tensor, user: Tensor, n_users: int, beta: float) -> Tensor:
    """KTO's δ per user (METHOD.md §3): β · max(0, mean KL estimate), detached, [U].

    ``kl_logratio`` [N] holds log π_θ(y′|x) − log π_ref(y′|x) (summed over completion
    tokens) for mismatched pairs (x, y′) of the batch, ``user`` [N] their users. A user
    with no mismatched pair gets 0.
    """
    kl = kl_logratio.detach()
    mean = per_user_mean(kl, user, torch.ones_like(kl, dtype=torch.bool), n_users)
    return beta * mean.clamp_min(0.0)
