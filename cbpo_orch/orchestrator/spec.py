"""What a job is: its task, data, model, users, methods and training config.

A :class:`JobSpec` is validated in full before anything is written (unknown task or
method, missing paths, unknown user ids all fail here: :func:`plan_job`), then stored as the
job's config in the registry, so ``resume`` runs exactly the job that was submitted.
"""

from __future__ import annotations

import math
import socket
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cbpo_orch.data.dataset import DataError, Dataset, load_split
from cbpo_orch.data.sources import open_source, task_data
from cbpo_orch.data.tasks import Task, load_task
from cbpo_orch.method.config import TASK_ADAPTER_CONFIG, ConfigError, TrainConfig
from cbpo_orch.method.methods import method_spec
from cbpo_orch.training.model_dirs import ModelError, check_adapter_dir, check_model_dir

TASK_ADAPTER_MODES = ("none", "auto")
REACH_TIMEOUT_S = 10.0


class UnreachableCluster(ConnectionError):
    """Nothing answers at the Ray cluster address a job was given."""


GPU_PACK = 32
"""Users sent at once to a worker that owns a GPU, when ``--users-per-step`` is not given."""


@dataclass(frozen=True)
class Resources:
    """How the fan-out is scheduled; not part of what the job computes."""

    address: str | None = None
    cpus_per_user: float = 1.0
    gpus_per_user: float = 0.0
    workers: int | None = None
    max_retries: int = 2
    users_per_step: int | None = None

    def __post_init__(self) -> None:
        if self.cpus_per_user <= 0 or self.gpus_per_user < 0:
            raise ConfigError("cpus-per-user must be > 0 and gpus-per-user ≥ 0")
        if self.workers is not None and self.workers < 1:
            raise ConfigError("workers must be ≥ 1")
        if self.max_retries < 0:
            raise ConfigError("max-retries must be ≥ 0")
        if self.users_per_step is not None and self.users_per_step < 1:
            raise ConfigError("users-per-step must be ≥ 1")

    @property
    def pack_size(self) -> int:
        """Users a worker is sent at once: ``users_per_step``, or by default one on a CPU
        (packing buys nothing there) and ``GPU_PACK`` for a worker that owns a whole GPU
        (it trains as many of them at once as its memory holds). Workers that share a GPU
        are sent one user each: their free memory is not theirs to size against."""
        if self.users_per_step is not None:
            return self.users_per_step
        return GPU_PACK if self.gpus_per_user >= 1 else 1


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    task: str
    data: str
    split: str
    model: str
    methods: tuple[str, ...]
    users: tuple[str, ...]
    train: TrainConfig = field(default_factory=TrainConfig)
    task_adapter: str = "none"
    task_adapter_lr: float = 1e-4
    task_adapter_epochs: int = 3
    embedder: str | None = None

    def config_for(self, method: str) -> TrainConfig:
        return self.train.with_method(method)

    @property
    def needs_task_adapter(self) -> bool:
        return self.task_adapter != "none"

    def task_adapter_config(self) -> TrainConfig:
        """The task adapter's training config: TAM defaults (METHOD.md §6) with the job's
        lr, epochs, profile cap, length budget and seed."""
        train = self.train
        return replace(TASK_ADAPTER_CONFIG, lr=self.task_adapter_lr, epochs=self.task_adapter_epochs, max_profile=train.max_profile,
                       max_prompt_tokens=train.max_prompt_tokens, max_new_tokens=train.max_new_tokens, seed=train.seed)

    def to_config(self, resources: Resources) -> dict:
        data = asdict(self)
        data["methods"] = list(self.methods)
        data["users"] = list(self.users)
        data["train"] = self.train.to_dict()
        data["resources"] = asdict(resources)
        return data

    @classmethod
    def from_config(cls, config: dict) -> tuple["JobSpec", Resources]:
        values = {k: v for k, v in config.items() if k != "resources"}
        values["methods"] = tuple(values["methods"])
        values["users"] = tuple(values["users"])
        values["train"] = TrainConfig.from_dict(values["train"])
        return cls(**values), Resources(**config.get("resources", {}))


def parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not methods:
        raise ConfigError("--method names no method")
    for name in methods:
        method_spec(name)
    return methods


def resolve_users(selector: str, dataset: Dataset) -> tuple[str, ...]:
    """``all`` | ``N`` (the first N test users) | ``id,id,…`` → user ids of ``dataset``."""
    known = list(dataset.users)
    text = selector.strip()
    if text == "all":
        return tuple(known)
    if text.isdigit():
        n = int(text)
        if n < 1:
            raise DataError("--users must be 'all', a positive number or a list of ids")
        return tuple(known[:n])
    wanted = tuple(dict.fromkeys(u.strip() for u in text.split(",") if u.strip()))
    if not wanted:
        raise DataError("--users names no user: give 'all', a positive number or a list of ids")
    unknown = [u for u in wanted if u not in dataset.users]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise DataError(f"--users names {len(unknown)} id(s) not in split {dataset.split!r} of {dataset.path}: {shown}")
    return wanted


def check_address(address: str | None) -> None:
    """Refuse what is not a Ray address (``auto``, ``host:port``, ``ray://host:port``), and
    fail at once when nothing answers at a ``host:port``, where ``ray.init`` would retry
    for minutes."""
    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not (host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"--address {address!r} is not a Ray address: give auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as error:
        raise UnreachableCluster(
            f"cannot reach the Ray cluster at {address}: nothing answers there ({error}); "
            "check the address and port, or start the cluster's head there (`ray start --head`)"
        ) from None


def check_task_adapter(value: str) -> str:
    if value in TASK_ADAPTER_MODES:
        return value
    try:
        return str(check_adapter_dir(value))
    except ModelError as error:
        raise ModelError(f"--task-adapter must be none, auto or an adapter folder: {error}") from None


def check_budgets(task: Task, dataset: Dataset, users: tuple[str, ...], model: str, train: TrainConfig) -> None:
    """Fail before anything runs unless the model is a causal LM with the LoRA's target layers,
    every query prompt of ``users`` fits the job's prompt budget and the budgets fit the model
    (its tokenizer must also have an EOS token)."""
    from cbpo_orch.training.encoding import check_prompts
    from cbpo_orch.training.models import check_adaptable, load_tokenizer, model_context

    check_adaptable(model, train.lora)
    budgets = task.budgets(train.max_prompt_tokens, train.max_new_tokens)
    prompts = [(f"user {u}, query {q.id}", task.prompt(q)) for u in users for q in dataset.user(u).queries]
    check_prompts(load_tokenizer(model), prompts, budgets, model_context(model))


def check_paths(data: str | Path, model: Path) -> tuple[str, str]:
    """The job's data set as it reopens anywhere (``Source.ref``: an absolute path or a hub id)
    and its model's folder, absolute; DataError or ModelError where either is missing."""
    return open_source(data).ref, str(check_model_dir(model).resolve())


def plan_job(
    *,
    task: str,
    data: str | None,
    model: Path,
    users: str,
    methods: tuple[str, ...],
    split: str,
    train: TrainConfig,
    task_adapter: str,
    task_adapter_lr: float,
    task_adapter_epochs: int,
    embedder: str | None,
    address: str | None,
) -> JobSpec:
    """Every check a job passes before anything is written, in the order a user would fix
    them: the task, the data and model paths, the split and the users, the prompts against
    the budgets, the task adapter (with ``auto``, the train split it learns from), then the
    cluster's address. The job it describes, or DataError, ModelError, ConfigError or
    UnreachableCluster with a one-line reason."""
    task_def = load_task(task)
    data_path, model_path = check_paths(task_data(data, task_def.name), model)
    dataset = load_split(data_path, split, task_def)
    chosen = resolve_users(users, dataset)
    check_budgets(task_def, dataset, chosen, model_path, train)
    adapter = check_task_adapter(task_adapter)
    if adapter == "auto":
        load_split(data_path, "train", task_def)
    if not (math.isfinite(task_adapter_lr) and task_adapter_lr > 0) or task_adapter_epochs < 1:
        raise ConfigError("--task-adapter-lr must be a finite number > 0 and --task-adapter-epochs ≥ 1")
    check_address(address)
    return JobSpec(
        task=task if task == task_def.name else str(Path(task).resolve()),
        data=data_path,
        split=split,
        model=model_path,
        methods=methods,
        users=chosen,
        train=train,
        task_adapter=adapter,
        task_adapter_lr=task_adapter_lr,
        task_adapter_epochs=task_adapter_epochs,
        embedder=embedder,
    )
