"""π_ref's log-probs kept between jobs: one file per starting model, in the home's cache.

The job's π_ref pass (the driver's stage 3) reads what earlier jobs computed under the same
starting model and computes only the rest: another method, another β or a resumed job on the
same users costs no second pass. A starting model is named by a fingerprint of its folders
(the base model's and the task adapter's: each file's path, size and modification time, so a
model replaced in place is another model) and of the device kind (fp32 on a CPU and bf16 on a
GPU give other numbers). Values are keyed as the trainer's memo keys them (the pair's token
ids, budgets included). The file is replaced atomically: two drivers that write at once lose
at most the other's new values, and a file that cannot be read counts as empty.
"""

from __future__ import annotations

import hashlib
import os
import uuid
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

KEY_BYTES = 16
"""The width of a pair's key (``training/reference_logps.py`` digests its token ids to it)."""
_FILE = "logps.npz"


def starting_model_fingerprint(folders: Iterable[str | Path | None], device_kind: str) -> str:
    """A digest of the starting model's folders (``None``: no task adapter) and the device kind."""
    digest = hashlib.sha256(device_kind.encode())
    for folder in folders:
        if folder is None:
            digest.update(b"\0no folder\n")
            continue
        root = Path(folder).resolve()
        digest.update(f"{root}\n".encode())
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            stat = file.stat()
            digest.update(f"{file.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


class ReferenceCache:
    """The values known for one starting model: ``folder`` is ``cache/reference/FINGERPRINT``."""

    def __init__(self, folder: Path):
        self.folder = folder

    def load(self) -> dict[bytes, float]:
        try:
            with np.load(self.folder / _FILE) as data:
                keys, values = data["keys"], data["values"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return {}
        raw = keys.tobytes()
        return {raw[i * KEY_BYTES : (i + 1) * KEY_BYTES]: float(v) for i, v in enumerate(values)}

    def save(self, values: dict[bytes, float]) -> None:
        """Replace the file with ``values`` (write a temporary file, then rename it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        keys = np.frombuffer(b"".join(values), dtype=np.uint8).reshape(-1, KEY_BYTES)
        staging = self.folder / f".{uuid.uuid4().hex}.npz"
        try:
            with open(staging, "wb") as out:
                np.savez(out, keys=keys, values=np.fromiter(values.values(), dtype=np.float64, count=len(values)))
            os.replace(staging, self.folder / _FILE)
        finally:
            staging.unlink(missing_ok=True)
