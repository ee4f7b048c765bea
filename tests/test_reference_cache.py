"""π_ref's values kept between jobs: a file per starting model that round-trips every entry,
entries found by a text key that tells pairs and budgets apart,
a fingerprint that changes with the model's files and the device kind, and a damaged file
that reads as empty."""

from __future__ import annotations

import math
import os

from cbpo_orch.storage.reference_cache import KEY_BYTES, LEFT_OUT, ReferenceCache, pair_text_key, starting_model_fingerprint


def test_entries_round_trip_with_any_key_bytes(tmp_path):
    entries = {bytes(16): (b"\x01" * 16, -1.5), b"\x00" * 15 + b"\x01": (bytes(16), -2.25), bytes(range(16)): (b"\xff" * 16, 0.0),
               b"\xff" * 16: (bytes(range(16, 32)), -1e-9), b"\x05" * 16: LEFT_OUT}
    cache = ReferenceCache(tmp_path / "reference" / "fp")
    assert cache.load() == {}
    cache.save(entries)
    loaded = cache.load()
    assert loaded.keys() == entries.keys() and loaded[b"\x05" * 16][0] == LEFT_OUT[0] and math.isnan(loaded[b"\x05" * 16][1])
    assert all(loaded[key] == entry for key, entry in entries.items() if key != b"\x05" * 16)
    cache.save({**entries, b"\x07" * 16: (b"\x08" * 16, -3.0)})
    assert len(cache.load()) == 6 and not [p for p in cache.folder.iterdir() if p.name.startswith(".")]


def test_a_text_key_tells_every_part_apart():
    keys = {pair_text_key("ab", "c", 64, 8), pair_text_key("a", "bc", 64, 8), pair_text_key("ab", "c", 64, 9), pair_text_key("ab", "c", 6, 48)}
    assert len(keys) == 4 and all(len(key) == KEY_BYTES for key in keys)
    assert pair_text_key("x\ud800", "y", 1, 1) != pair_text_key("x", "y", 1, 1)  # any str, lone surrogates too


def test_a_damaged_file_reads_as_empty(tmp_path):
    cache = ReferenceCache(tmp_path)
    cache.save({bytes(16): (bytes(16), -1.0)})
    path = tmp_path / "logps.npz"
    path.write_bytes(path.read_bytes()[:40])
    assert cache.load() == {}


def test_the_fingerprint_names_the_model_files_and_the_device(tmp_path):
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    for folder in (model, adapter):
        folder.mkdir()
        (folder / "weights.safetensors").write_bytes(b"1234")
    first = starting_model_fingerprint([model, None], "cpu")
    assert first == starting_model_fingerprint([str(model), None], "cpu")
    assert first != starting_model_fingerprint([model, None], "gpu")
    assert first != starting_model_fingerprint([model, adapter], "cpu")
    os.utime(model / "weights.safetensors", ns=(1, 1))  # replaced in place: another model
    assert first != starting_model_fingerprint([model, None], "cpu")
