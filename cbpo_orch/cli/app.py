"""The typer app, the options every command shares, and what counts as a user mistake.

User mistakes (bad data, unknown task or method, a missing path, an out-of-range
option, an unknown job) end with one ``error:`` line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from cbpo_orch.data.dataset import DataError
from cbpo_orch.home import FolderError, check_folder, default_model_dir, home_dir
from cbpo_orch.method.config import ConfigError
from cbpo_orch.method.methods import UnknownMethod
from cbpo_orch.orchestrator.spec import UnreachableCluster
from cbpo_orch.orchestrator.update import NotUpdatable
from cbpo_orch.serving.catalog import NotServable
from cbpo_orch.serving.keys import KeyFileError
from cbpo_orch.storage.engine import RegistryUnavailable
from cbpo_orch.storage.registry import LeaseHeld, UnknownJob
from cbpo_orch.storage.schema import SchemaVersionError
from cbpo_orch.training.model_dirs import ModelError, check_model_dir

app = typer.Typer(
    help="Per-user LLM personalization with C-BPO: train one LoRA adapter per user, for many users, over Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class UsageError(ValueError):
    """A command-line mistake that is not about data, models or config values."""


USER_ERRORS: tuple[type[Exception], ...] = (
    DataError, ModelError, ConfigError, UnknownMethod, UnknownJob, SchemaVersionError, RegistryUnavailable, FolderError, UsageError, LeaseHeld, NotServable, KeyFileError,
    UnreachableCluster, NotUpdatable,
)

TaskOpt = Annotated[str, typer.Option(help="Built-in task (lamp4 lamp5 longlamp2 longlamp3 longlamp4 commit-subject) or a task definition JSON file.")]
DataOpt = Annotated[Path, typer.Option(help="Data folder in LaMP or LongLaMP format.")]
ModelOpt = Annotated[Optional[Path], typer.Option(help="Local Hugging Face model folder (default: the model `setup-model` cached in the home folder).")]
HomeOpt = Annotated[Optional[Path], typer.Option(help="Home folder for models, caches, registry and artifacts (env CBPO_ORCH_HOME, default ~/.cbpo-orch).")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")]


def resolve_model(model: Path | None, home: Path | None) -> Path:
    chosen = model or default_model_dir(home_dir(home))
    if model is None and not chosen.is_dir():
        raise ModelError(f"no --model given and no default model at {chosen}: run `cbpo-orch setup-model` first")
    return check_model_dir(chosen)


def fresh_output_dir(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"output folder {out} already exists and is not empty; choose another --out")
    check_folder(out.parent, "folder of --out", writable=True)
    return out


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to fill in the block: renamed into place when the
    block ends, removed when it fails, so ``out`` is either complete or untouched."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    staging.rename(out)


def write_folder(out: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into ``out`` through a temporary folder renamed into place."""
    with staged_folder(out) as staging:
        for name, content in files.items():
            (staging / name).write_bytes(content)
