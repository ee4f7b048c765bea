"""γ estimated (METHOD.md §4) from its inputs: one shard of the job's γ pass, run as a Ray task
per shard by the driver, and what a worker falls back on for a run the pass did not cover."""

from __future__ import annotations

from threadpoolctl import threadpool_limits

from cbpo_orch.data.history import HistoryIndex
from cbpo_orch.method.prior import PriorConfig, estimate_gamma
from cbpo_orch.workers.user_items import GammaInputs

Gamma = tuple[float, str | None]
"""γ and, when the fallback was used, why."""


def estimated_gamma(history: HistoryIndex, inputs: GammaInputs) -> Gamma:
    """γ of the rows and settings in ``inputs`` (see ``user_items.gamma_inputs``)."""
    prior = PriorConfig(estimator=inputs.estimator, gamma_max=inputs.gamma_max, fallback_gamma=inputs.fallback_gamma, seed=inputs.seed)
    estimate = estimate_gamma(history.embeddings[list(inputs.own_rows)], history.embeddings[list(inputs.aux_rows)], prior)
    return estimate.gamma, estimate.reason


def gamma_shard(inputs: list[GammaInputs], history: HistoryIndex, threads: int) -> dict[GammaInputs, Gamma]:
    """Every input's γ, on ``threads`` CPU threads."""
    with threadpool_limits(max(1, threads)):
        return {key: estimated_gamma(history, key) for key in inputs}
