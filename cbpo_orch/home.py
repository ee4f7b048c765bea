"""Where cbpo-orch keeps its things: one home folder (``--home`` or ``$CBPO_ORCH_HOME``,
default ``~/.cbpo-orch``) holding models, caches, the SQLite registry and artifacts."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "CBPO_ORCH_HOME"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SAMPLE_DATA = Path(__file__).parent / "samples" / "huffpost-headline"


def home_dir(override: str | Path | None = None) -> Path:
    chosen = override or os.environ.get(HOME_ENV) or Path.home() / ".cbpo-orch"
    return Path(chosen).expanduser().resolve()


def default_model_dir(home: Path) -> Path:
    return home / "models" / DEFAULT_MODEL_NAME


def downloads_dir(home: Path) -> Path:
    return home / "downloads"
