"""Where cbpo-orch keeps its things: one home folder (``--home`` or ``$CBPO_ORCH_HOME``,
default ``~/.cbpo-orch``) holding models, caches, the SQLite registry and artifacts."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "CBPO_ORCH_HOME"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SAMPLE_DATA = Path(__file__).parent / "samples" / "huffpost-headline"


class FolderError(ValueError):
    """A folder cbpo-orch needs that is a file or lies under one, or, where it writes, is read-only."""


def home_dir(override: str | Path | None = None) -> Path:
    chosen = override or os.environ.get(HOME_ENV) or Path.home() / ".cbpo-orch"
    return check_folder(Path(chosen).expanduser().resolve(), "home folder")


def check_folder(folder: Path, what: str, writable: bool = False) -> Path:
    """``folder`` if it is a folder or can be made one and, when ``writable``, this process
    may write there; else FolderError naming ``what``."""
    existing = next(path for path in (folder, *folder.parents) if os.path.exists(path))
    if not existing.is_dir():
        raise FolderError(f"{what} {folder} cannot be a folder: {existing} is a file")
    if writable and not os.access(existing, os.W_OK | os.X_OK):
        raise FolderError(f"{what} {folder} is not writable: {existing} is read-only")
    return folder


def default_model_dir(home: Path) -> Path:
    return home / "models" / DEFAULT_MODEL_NAME


def downloads_dir(home: Path) -> Path:
    return home / "downloads"
