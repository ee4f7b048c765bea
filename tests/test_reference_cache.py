"""π_ref's values kept between jobs: a file per starting model that round-trips every key,
a fingerprint that changes with the model's files and the device kind, and a damaged file
that reads as empty."""

from __future__ import annotations

import os

from cbpo_orch.storage.reference_cache import ReferenceCache, starting_model_fingerprint


def test_values_round_trip_with_any_key_bytes(tmp_path):
    values = {bytes(16): -1.5, b"\x00" * 15 + b"\x01": -2.25, bytes(range(16)): 0.0, b"\xff" * 16: -1e-9}
    cache = ReferenceCache(tmp_path / "reference" / "fp")
    assert cache.load() == {}
    cache.save(values)
    assert cache.load() == values
    cache.save({**values, b"\x07" * 16: -3.0})
    assert len(cache.load()) == 5 and not [p for p in cache.folder.iterdir() if p.name.startswith(".")]


def test_a_damaged_file_reads_as_empty(tmp_path):
    cache = ReferenceCache(tmp_path)
    cache.save({bytes(16): -1.0})
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
