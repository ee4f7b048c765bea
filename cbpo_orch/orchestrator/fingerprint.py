"""What a run reads of its user's data, recorded with the run: a stable digest of the user's
history items (so that ``cbpo-orch update`` retrains only users whose history changed), their
number, and the users whose items it trains on as auxiliary items (so that ``cbpo-orch forget``
can say whose adapters learned from a forgotten user's items)."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from cbpo_orch.data.dataset import DataError, Dataset
from cbpo_orch.storage.lineage import RunInputs

if TYPE_CHECKING:
    from cbpo_orch.method.config import TrainConfig
    from cbpo_orch.workers.user_items import UserItems

FINGERPRINT_VERSION = 1
"""Part of every digest: a change of what is digested changes every fingerprint."""


def user_fingerprint(dataset: Dataset, user_id: str, max_profile: int | None) -> tuple[str, int]:
    """The digest of the user's ``max_profile`` most recent history items (each item's id and
    its (x, y) pair as the task makes it, oldest first) and their number; DataError for a user
    the split does not hold or whose every item was left out."""
    examples = dataset.examples(user_id, max_profile)
    digest = hashlib.sha256(f"cbpo-orch user items {FINGERPRINT_VERSION}\n".encode())
    for example in examples:
        digest.update(json.dumps([example.item_id, example.x, example.y]).encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest(), len(examples)


def run_inputs(dataset: Dataset, runs: list, config_for, planned: list[tuple[TrainConfig, UserItems]]) -> dict[int, RunInputs]:
    """What each of ``runs`` reads, by run id (``config_for(method)``: its config; ``planned``:
    the driver's plan of the runs that draw aux items). A run whose user cannot be read is left
    out: its worker fails it with the reason."""
    aux = {(_owner(items), config.method): sorted({e.user_id for e in items.auxiliary}) for config, items in planned}
    digests: dict[tuple[str, int | None], tuple[str, int] | None] = {}  # a user's methods share one digest per profile cap
    inputs = {}
    for run in runs:
        key = (run.user_id, config_for(run.method).max_profile)
        if key not in digests:
            try:
                digests[key] = user_fingerprint(dataset, *key)
            except DataError:
                digests[key] = None
        if digests[key] is not None:
            fingerprint, n_items = digests[key]
            inputs[run.run_id] = RunInputs(fingerprint, n_items, tuple(aux.get((run.user_id, run.method), ())))
    return inputs


def _owner(items: UserItems) -> str:
    """The user whose items these are (every user has at least one)."""
    return next(e.user_id for e in (*items.positives, *items.held_out, *items.evaluation))
