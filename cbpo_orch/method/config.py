"""Training configuration for one user's adapter; defaults follow METHOD.md §2–§6."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from cbpo_orch.method.methods import method_spec


class ConfigError(ValueError):
    """A configuration value out of its range."""


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise ``ConfigError`` with the message of the first check that fails."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter (peft). User adapters: r=8, α=8 on q/v (OPPU's public settings)."""

    r: int = 8
    alpha: int = 8
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


TASK_ADAPTER_LORA = LoraSettings(r=16, alpha=16, dropout=0.05, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides how one user's adapter is trained and evaluated.

    ``epochs``, ``lr`` and ``beta`` of None take the method's recipe (``methods.py``: epochs
    SFT 2, preference methods 3 as in the paper; lr and β ours, since the paper's lr 1e-4 for
    Mistral-7B leaves the adapters of small models inert, tuned per method family on validation
    users, docs/benchmarks.md);
    ``gamma=None`` estimates γ per user (METHOD.md §4); ``max_profile`` caps the
    user's history to its most recent items; ``max_prompt_tokens`` and
    ``max_new_tokens`` of None take the task's budgets. ``selection`` (ours, off by default:
    the paper's protocol, the spec's epochs per method family) holds out a user's most recent
    items, scores the starting model and every epoch on them by log-likelihood, and keeps the
    best (see ``selection.py``); users with fewer than ``selection_min_items`` items train
    without it. It is off because that score is SFT's own objective: SFT raises it every epoch
    while a preference method lowers it on purpose, so it kept C-BPO's early epochs
    (docs/benchmarks.md). ``eval_items`` sets aside each user's newest items (at most half), scored
    like queries and never trained on (``data/evaluation_items.py``). ``retrieve``: the user's
    items retrieved by ``retriever`` into each prompt of a trained arm, in training and
    evaluation alike, and RAG's k (0: a trained arm none, RAG the task's default;
    ``data/retrieval.py``). ``aux_resample`` (ours; off: the paper's one draw) gives every
    epoch aux items of its own: ``aux_ratio`` × positives per epoch, drawn at once, epoch e
    training on the e-th part (γ is estimated on the first).
    """

    method: str = "cbpo"
    epochs: int | None = None
    lr: float | None = None
    beta: float | None = None
    batch_size: int = 8
    aux_ratio: float = 1.0
    aux_strategy: str = "random"
    aux_resample: bool = False
    gamma: float | None = None
    gamma_estimator: str = "elkan-noto"
    gamma_max: float = 0.9
    fallback_gamma: float = 0.5
    reference: str = "ema"
    ema_decay: float = 0.9
    kto_lambda_d: float = 1.0
    kto_lambda_u: float = 1.0
    lora: LoraSettings = field(default_factory=LoraSettings)
    weight_decay: float = 0.01
    max_grad_norm: float = 0.3
    warmup_ratio: float = 0.1
    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None
    max_profile: int | None = None
    selection: bool = False
    selection_min_items: int = 6
    eval_items: int = 0
    retrieve: int = 0
    retriever: str = "embedding"
    eval_batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        method_spec(self.method)
        require([
            (self.epochs is None or self.epochs >= 1, "epochs must be ≥ 1"),
            (self.lr is None or (math.isfinite(self.lr) and self.lr > 0), "lr must be a finite number > 0"),
            (self.beta is None or (math.isfinite(self.beta) and self.beta > 0), "beta must be a finite number > 0"),
            (self.batch_size >= 2, "batch-size must be ≥ 2 (a batch holds positive and aux items)"),
            (math.isfinite(self.aux_ratio) and self.aux_ratio > 0, "aux-ratio must be a finite number > 0"),
            (self.aux_strategy in ("random", "nearest", "farthest"), "aux-strategy must be random, nearest or farthest"),
            (self.gamma is None or 0 <= self.gamma < 1, "gamma must be in [0, 1) or auto"),
            (self.gamma_estimator in ("elkan-noto", "paper"), "gamma-estimator must be elkan-noto or paper"),
            (0 <= self.gamma_max < 1, "gamma-max must be in [0, 1)"),
            (self.reference in ("ema", "joint"), "reference must be ema or joint"),
            (0 <= self.ema_decay < 1, "ema-decay must be in [0, 1)"),
            (self.max_prompt_tokens is None or self.max_prompt_tokens >= 8, "max-prompt-tokens must be ≥ 8"),
            (self.max_new_tokens is None or self.max_new_tokens >= 1, "max-new-tokens must be ≥ 1"),
            (self.max_profile is None or self.max_profile >= 2, "max-profile must be ≥ 2"),
            (self.selection_min_items >= 3, "selection-min-items must be ≥ 3 (two held out, one to train on)"),
            (self.eval_items >= 0, "eval-items must be ≥ 0"),
            (self.retrieve >= 0, "retrieve must be ≥ 0"),
            (self.retriever in ("embedding", "bm25"), "retriever must be embedding or bm25"),
            (self.lora.r >= 1, "lora-r must be ≥ 1"),
            (0 <= self.seed < 2**32, "seed must be in [0, 2^32)"),
        ])

    @property
    def resolved_epochs(self) -> int:
        return self.epochs if self.epochs is not None else method_spec(self.method).default_epochs

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else method_spec(self.method).default_lr

    @property
    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else method_spec(self.method).default_beta

    def with_method(self, method: str) -> "TrainConfig":
        return replace(self, method=method)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["lora"]["target_modules"] = list(self.lora.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("lora"), dict):
            lora = dict(values["lora"])
            lora["target_modules"] = tuple(lora.get("target_modules", LoraSettings.target_modules))
            values["lora"] = LoraSettings(**lora)
        return cls(**values)


TASK_ADAPTER_CONFIG = TrainConfig(method="sft", epochs=3, lr=1e-4, lora=TASK_ADAPTER_LORA)
"""The task adapter's training (METHOD.md §6): SFT of a r=16 LoRA on the non-test users."""

TASK_ADAPTER_FIELDS = (
    "method", "epochs", "lr", "batch_size", "lora", "weight_decay", "max_grad_norm", "warmup_ratio",
    "max_prompt_tokens", "max_new_tokens", "max_profile", "seed",
)
"""The fields of a config that SFT of the task adapter reads: with the task, data and model, its
identity (a field that only concerns user adapters, such as ``eval_items``, leaves it alone)."""
