"""Training objectives of every method (METHOD.md §3), on multi-user batches.

A batch holds N samples that may belong to U users. Every loss takes per-sample
tensors ``rewards`` (float [N], the implicit reward r_θ of METHOD.md §2),
``positive`` (bool [N]: True for the target user's own pairs H_tar, False for
auxiliary pairs H_aux) and ``user`` (long [N], values in 0..U-1), plus per-user
tensors of shape [U] (δ, γ), and returns a per-user loss of shape [U]; the
trainer reduces it. A user with no sample in a part of the batch gets 0 for that
part's expectation, so the sampler must put both H_tar and H_aux of every user in
each batch (METHOD.md §7).

Which method descends which loss is the method's data (``methods.MethodSpec.objective``
and, for C-BPO, its ``cbpo_variant``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

CBPO_VARIANTS = ("nonneg", "raw", "nnpu")

PerUser = Tensor | Sequence[float] | float
"""A per-user quantity (δ, γ): a [U] tensor or list, or one value shared by all users."""


def per_user_sum(values: Tensor, user: Tensor, mask: Tensor, n_users: int) -> Tensor:
    """Sum of ``values`` over the samples selected by ``mask``, per user: [N] -> [U].

    Unselected samples contribute exactly 0 (also when their value is not finite).
    """
    selected = torch.where(mask, values, torch.zeros_like(values))
    return values.new_zeros(n_users).index_add(0, user, selected)


def per_user_mean(values: Tensor, user: Tensor, mask: Tensor, n_users: int) -> Tensor:
    """Mean of ``values`` over the samples selected by ``mask``, per user: [N] -> [U].

    A user with no selected sample gets 0.
    """
    counts = per_user_sum(torch.ones_like(values), user, mask, n_users)
    return per_user_sum(values, user, mask, n_users) / counts.clamp_min(1.0)


def positive_loss(rewards: Tensor, delta: Tensor) -> Tensor:
    """ℓ₊(r) = −log σ(r − δ), elementwise (METHOD.md §3): how much a sample is not preferred."""
    return -F.logsigmoid(rewards - delta)


def negative_loss(rewards: Tensor, delta: Tensor) -> Tensor:
    """ℓ₋(r) = −log σ(−(r − δ)), elementwise (METHOD.md §3): how much a sample is not rejected."""
    return -F.logsigmoid(delta - rewards)


def _per_sample(per_user: PerUser, rewards: Tensor, user: Tensor) -> Tensor:
    """Gather a per-user quantity onto the N samples, in the rewards' dtype and device."""
    value = torch.as_tensor(per_user, dtype=rewards.dtype, device=rewards.device)
    return value[user] if value.dim() else value.expand_as(rewards)


def sft_loss(
    logp_sum: Tensor, n_tokens: Tensor, include: Tensor, user: Tensor, n_users: int
) -> Tensor:
    """Token-mean negative log-likelihood per user (METHOD.md §3, SFT / OPPU).

    ``logp_sum`` [N] is log π_θ(y|x) summed over completion tokens and ``n_tokens``
    [N] the number of those tokens; per user, the loss is Σ −logp_sum / Σ n_tokens
    over the samples in ``include`` (H_tar for "sft", H_tar and H_aux for "sft-aux").
    A user with no included sample gets 0.
    """
    nll = per_user_sum(-logp_sum, user, include, n_users)
    tokens = per_user_sum(n_tokens.to(logp_sum), user, include, n_users)
    return nll / tokens.clamp_min(1.0)


def kto_loss(
    rewards: Tensor,
    positive: Tensor,
    user: Tensor,
    delta: PerUser,
    n_users: int,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> Tensor:
    """KTO loss per user (METHOD.md §3).

    Per sample λ_D(1 − σ(r − δ)) on H_tar and λ_U(1 − σ(δ − r)) on H_aux, averaged
    over all of the user's samples together (as TRL's KTO trainer does). ``delta``
    [U] is KTO's KL reference point (``reference.kto_reference``).
    """
    d = _per_sample(delta, rewards, user)
    per_sample = torch.where(
        positive,
        lambda_d * (1.0 - torch.sigmoid(rewards - d)),
        lambda_u * (1.0 - torch.sigmoid(d - rewards)),
    )
    return per_user_mean(per_sample, user, torch.ones_like(positive), n_users)


def _target_and_aux_terms(
    rewards: Tensor, positive: Tensor, user: Tensor, delta: PerUser, n_users: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-user E_tar[ℓ₊], E_tar[ℓ₋] and E_aux[ℓ₋], each [U], with one δ per user."""
    d = _per_sample(delta, rewards, user)
    pos_l, neg_l = positive_loss(rewards, d), negative_loss(rewards, d)
    return (
        per_user_mean(pos_l, user, positive, n_users),
        per_user_mean(neg_l, user, positive, n_users),
        per_user_mean(neg_l, user, ~positive, n_users),
    )


def bco_loss(
    rewards: Tensor, positive: Tensor, user: Tensor, delta: PerUser, n_users: int
) -> Tensor:
    """BCO loss per user: E_tar[ℓ₊] + E_aux[ℓ₋] (METHOD.md §3)."""
    tar_pos, _, aux_neg = _target_and_aux_terms(rewards, positive, user, delta, n_users)
    return tar_pos + aux_neg


def cbpo_loss(
    rewards: Tensor,
    positive: Tensor,
    user: Tensor,
    delta: PerUser,
    gamma: PerUser,
    n_users: int,
    variant: str = "nonneg",
) -> Tensor:
    """C-BPO loss per user (METHOD.md §3), with bracket B = E_aux[ℓ₋] − γ·E_tar[ℓ₋].

    - "raw" (unbiased PU risk): E_tar[ℓ₊] + B / (1 − γ).
    - "nonneg" (the default, the paper's final form): E_tar[ℓ₊] + max(0, B) / (1 − γ);
      no gradient flows through B while it is negative.
    - "nnpu" (ours; Kiryo et al. 2017, Algorithm 1 with their β = 0 and step factor 1):
      where B ≥ 0 it equals "nonneg"; where B < 0 the value to descend is −B / (1 − γ)
      alone — gradient ascent on the negative-class risk, with the positive term
      dropped for that step. For those users the returned value is that surrogate
      (≥ 0), not the risk itself.

    ``gamma`` [U] is the correction coefficient, in [0, 1); with γ = 0 every variant
    equals ``bco_loss`` with the same δ exactly.
    """
    if variant not in CBPO_VARIANTS:
        raise ValueError(f"unknown C-BPO variant {variant!r}; expected one of {CBPO_VARIANTS}")
    g = torch.as_tensor(gamma, dtype=rewards.dtype, device=rewards.device).expand(n_users)
    tar_pos, tar_neg, aux_neg = _target_and_aux_terms(rewards, positive, user, delta, n_users)
    bracket = aux_neg - g * tar_neg
    scale = 1.0 / (1.0 - g)
    if variant == "raw":
        return tar_pos + scale * bracket
    nonneg = tar_pos + scale * bracket.clamp_min(0.0)
    if variant == "nonneg":
        return nonneg
    return torch.where(bracket >= 0, nonneg, -scale * bracket)
