"""The training options shared by ``train-user`` and ``submit``, declared once.

``with_training_options`` appends these options to a typer command's signature and
hands the command one :class:`TrainConfig` built from them (``train=``), so every
command that trains accepts exactly the same flags with the same help.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Annotated, Optional

import typer

from cbpo_orch.method.config import ConfigError, LoraSettings, TrainConfig

_DEFAULT = TrainConfig()
_PANEL = "Training options"


def _option(help_text: str, flag: str | None = None):
    names = [flag] if flag else []
    return typer.Option(*names, help=help_text, rich_help_panel=_PANEL)


_OPTIONS: list[tuple[str, object, object]] = [
    ("epochs", Annotated[Optional[int], _option("Epochs (default: sft 2, preference methods 3).")], None),
    ("lr", Annotated[Optional[float], _option("AdamW learning rate (default: the method's, tuned per method family).")], None),
    ("beta", Annotated[Optional[float], _option("Reward scale β in r = β·(log π − log π_ref) (default: the method's).")], None),
    ("batch_size", Annotated[int, _option("Items per step (each batch holds own and aux items).")], _DEFAULT.batch_size),
    ("aux_ratio", Annotated[float, _option("Auxiliary items per own item (ρ).")], _DEFAULT.aux_ratio),
    ("aux_strategy", Annotated[str, _option("Auxiliary selection: random | nearest | farthest.")], _DEFAULT.aux_strategy),
    ("aux_resample", Annotated[bool, _option("Draw the auxiliary items afresh for every epoch (ours; off: the paper's one draw for all epochs).")], _DEFAULT.aux_resample),
    ("gamma", Annotated[str, _option("C-BPO correction γ: 'auto' (estimated per user) or a number in [0, 1).")], "auto"),
    ("gamma_estimator", Annotated[str, _option("γ estimator: elkan-noto | paper.")], _DEFAULT.gamma_estimator),
    ("gamma_max", Annotated[float, _option("Upper clip of γ.")], _DEFAULT.gamma_max),
    ("reference", Annotated[str, _option("C-BPO reference point: ema (decoupled EMAs) | joint (BCO's running mean).")], _DEFAULT.reference),
    ("ema_decay", Annotated[float, _option("EMA decay α of the reference point.")], _DEFAULT.ema_decay),
    ("lora_r", Annotated[int, _option("LoRA rank of the user adapter.")], _DEFAULT.lora.r),
    ("lora_alpha", Annotated[int, _option("LoRA α of the user adapter.")], _DEFAULT.lora.alpha),
    ("lora_dropout", Annotated[float, _option("LoRA dropout.")], _DEFAULT.lora.dropout),
    ("lora_targets", Annotated[str, _option("Comma-separated module names the LoRA adapts.")], ",".join(_DEFAULT.lora.target_modules)),
    ("weight_decay", Annotated[float, _option("AdamW weight decay.")], _DEFAULT.weight_decay),
    ("max_grad_norm", Annotated[float, _option("Gradient-norm clip.")], _DEFAULT.max_grad_norm),
    ("warmup_ratio", Annotated[float, _option("Share of steps spent in linear warm-up.")], _DEFAULT.warmup_ratio),
    ("max_prompt_tokens", Annotated[Optional[int], _option("Prompt budget in tokens (default: the task's); a query over it is an error at submit, never cut.")], None),
    ("max_new_tokens", Annotated[Optional[int], _option("Completion budget: generation length, and the cut of training targets (default: the task's).")], None),
    ("max_profile", Annotated[Optional[int], _option("Use only each user's N most recent history items.")], None),
    ("selection", Annotated[bool, _option("Do no harm (ours, off by default): hold out each user's most recent items, keep the best epoch by their log-likelihood or the starting model. Off: the spec's epochs, the paper's protocol.")], _DEFAULT.selection),
    ("selection_min_items", Annotated[int, _option("Users with fewer history items train on all of them, without selection.")], _DEFAULT.selection_min_items),
    ("eval_items", Annotated[int, _option("Also score each user on its K newest history items (at most half of them), never trained on: a per-user mean over more than the split's 1–2 queries.", "--eval-items")], _DEFAULT.eval_items),
    ("retrieve", Annotated[int, _option("Put each user's K most similar earlier history items before every prompt of a trained arm, in training, evaluation and serving alike; rag's K (0: none for a trained arm, the task's default for rag).", "--retrieve")], _DEFAULT.retrieve),
    ("retriever", Annotated[str, _option("How --retrieve and rag rank a user's items: embedding (the job's embedder) | bm25 (the bm25s package, over the candidates alone).")], _DEFAULT.retriever),
    ("seed", Annotated[int, _option("Random seed (training is deterministic given it).")], _DEFAULT.seed),
]


def parse_gamma(text: str) -> float | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"gamma must be 'auto' or a number in [0, 1), got {text!r}") from None


def build_config(method: str, values: dict) -> TrainConfig:
    lora = LoraSettings(
        r=values.pop("lora_r"),
        alpha=values.pop("lora_alpha"),
        dropout=values.pop("lora_dropout"),
        target_modules=tuple(t.strip() for t in values.pop("lora_targets").split(",") if t.strip()),
    )
    values["gamma"] = parse_gamma(values["gamma"])
    return TrainConfig(method=method, lora=lora, **values)


def with_training_options(command):
    """Add the training options to ``command``; it receives them as ``options=dict``."""
    signature = inspect.signature(command)
    hints = typing.get_type_hints(command, include_extras=True)
    own = [p.replace(annotation=hints[p.name]) for p in signature.parameters.values() if p.name != "options"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation) for name, annotation, default in _OPTIONS]

    @functools.wraps(command)
    def wrapper(**kwargs):
        options = {name: kwargs.pop(name) for name, _, _ in _OPTIONS}
        return command(**kwargs, options=options)

    wrapper.__signature__ = signature.replace(parameters=own + extra)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
    return wrapper
