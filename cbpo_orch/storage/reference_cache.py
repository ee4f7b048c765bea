"""π_ref's log-probs kept between jobs: one file per starting model, in the home's cache.

The job's π_ref pass (the driver's stage 3) reads what earlier jobs computed under the same
starting model and computes only the rest: another method, another β or a resumed job on the
same users costs no second pass. A starting model is named by a fingerprint of its folders
(the base model's and the task adapter's: each file's path, size and modification time, so a
model replaced in place is another model) and of the device kind (fp32 on a CPU and bf16 on a
GPU give other numbers). Each entry is found by the pair's text and budgets
(:func:`pair_text_key`: the driver holds no tokenizer, and a job whose pairs are all known
sends nothing to the cluster) and holds the key the trainer's memo knows it by (its token ids,
budgets included) with the value, or :data:`LEFT_OUT` for a pair whose prompt is over its
budget (training leaves it out). A worker looks values up by their token keys, so an entry
that no longer matches how pairs are encoded is only a miss, never a wrong value. The file is
replaced atomically: two drivers that write at once lose at most the other's new entries, and
a file that cannot be read counts as empty.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import uuid
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

KEY_BYTES = 16
"""The width of a pair's key (``training/reference_logps.py`` digests its token ids to it)."""
_FILE = "logps.npz"

Entry = tuple[bytes, float]
"""A pair's token key and π_ref's summed completion log-prob of it."""
LEFT_OUT: Entry = (bytes(KEY_BYTES), math.nan)
"""The entry of a pair that training leaves out (its prompt is over the budget)."""


def is_left_out(entry: Entry) -> bool:
    """Whether ``entry`` is :data:`LEFT_OUT` (read back from a file, it is an equal tuple)."""
    return entry[0] == LEFT_OUT[0]


def pair_text_key(x: str, y: str, prompt_tokens: int, new_tokens: int) -> bytes:
    """The key a pair's entry is found by: its prompt and completion text and the budgets."""
    digest = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in (x, y, f"{prompt_tokens}/{new_tokens}"):
        encoded = part.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return digest.digest()


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

    def load(self) -> dict[bytes, Entry]:
        """The entries by text key (:func:`pair_text_key`)."""
        try:
            with np.load(self.folder / _FILE) as data:
                text_keys, keys, values = data["text_keys"].tobytes(), data["keys"].tobytes(), data["values"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return {}
        return {
            text_keys[i * KEY_BYTES : (i + 1) * KEY_BYTES]: (keys[i * KEY_BYTES : (i + 1) * KEY_BYTES], float(value))
            for i, value in enumerate(values)
        }

    def save(self, entries: dict[bytes, Entry]) -> None:
        """Replace the file with ``entries`` (write a temporary file, then rename it)."""
        self.folder.mkdir(parents=True, exist_ok=True)

        def rows(keys: Iterable[bytes]) -> np.ndarray:
            return np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, KEY_BYTES)

        staging = self.folder / f".{uuid.uuid4().hex}.npz"
        try:
            with open(staging, "wb") as out:
                np.savez(
                    out,
                    text_keys=rows(entries),
                    keys=rows(key for key, _ in entries.values()),
                    values=np.fromiter((value for _, value in entries.values()), dtype=np.float64, count=len(entries)),
                )
            os.replace(staging, self.folder / _FILE)
        finally:
            staging.unlink(missing_ok=True)


def forget_pairs(root: Path, keys: set[bytes]) -> int:
    """Remove every starting model's file under ``root`` (``cache/reference``) that holds any of
    ``keys``: whole, since KTO's mismatched pairs mix a user's texts with others' under keys
    that cannot be told from the user's pairs alone. Returns how many were removed."""
    removed = 0
    for folder in sorted(root.glob("*")) if root.is_dir() else []:
        if folder.is_dir() and keys & ReferenceCache(folder).load().keys():
            shutil.rmtree(folder)
            removed += 1
    return removed
