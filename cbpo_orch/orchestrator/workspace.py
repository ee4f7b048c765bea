"""Where jobs live: the registry, the artifact store and the cache folder.

Kept free of model libraries so that `status` and `results` start in a blink.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cbpo_orch.home import check_folder
from cbpo_orch.storage.artifacts import ArtifactStore
from cbpo_orch.storage.registry import Registry

DB_ENV = "CBPO_ORCH_DB"
ARTIFACTS_ENV = "CBPO_ORCH_ARTIFACTS"


@dataclass
class Workspace:
    """Where jobs live: the registry, the artifact store and the cache folder."""

    registry: Registry
    artifacts: ArtifactStore
    cache: Path

    @classmethod
    def open(cls, home: Path, db: str | None = None, artifacts: Path | None = None, writes: bool = False) -> "Workspace":
        """``db`` defaults to ``$CBPO_ORCH_DB`` then SQLite in ``home``; artifacts to
        ``$CBPO_ORCH_ARTIFACTS`` then ``home/artifacts``. With ``writes`` (jobs will run)
        the artifact and cache folders are checked writable before the registry is opened."""
        url = db or os.environ.get(DB_ENV) or f"sqlite:///{home / 'registry.db'}"
        folder = artifacts or Path(os.environ.get(ARTIFACTS_ENV) or home / "artifacts")
        store, cache = ArtifactStore(folder), home / "cache"
        if writes:
            check_folder(store.root, "artifact folder", writable=True)
            check_folder(cache, "cache folder", writable=True)
        return cls(Registry(url), store, cache)
