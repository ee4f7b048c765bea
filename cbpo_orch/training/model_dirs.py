"""Checking a model folder before anything heavy is imported or loaded."""

from __future__ import annotations

from pathlib import Path


class ModelError(ValueError):
    """A model path that cannot be loaded."""


def check_model_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelError(f"model path {str(path)!r} is not a folder (need a local Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise ModelError(f"model path {str(path)!r} has no config.json (need a local Hugging Face model folder)")
    return path


def check_adapter_dir(path: str | Path) -> Path:
    """A folder holding a saved peft adapter (``adapter_config.json``), resolved."""
    folder = Path(path).expanduser().resolve()
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(f"adapter folder {str(path)!r} has no adapter_config.json")
    return folder
