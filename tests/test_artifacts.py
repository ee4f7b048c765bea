"""Tests of the artifact store: atomic writes, checksums, path safety, crash safety."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cbpo_orch.storage import artifacts
from cbpo_orch.storage.artifacts import (
    ArtifactStore,
    check_name,
    directory_sha256,
    files_sha256,
)

FILES = {
    "adapter_model.safetensors": b"\x00\x01weights" * 100,
    "adapter_config.json": b'{"r": 8}',
}


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def test_write_dir_writes_files_with_matching_checksum(store: ArtifactStore) -> None:
    info = store.write_dir("job1/u1/cbpo", FILES)
    assert info.path == store.root / "job1" / "u1" / "cbpo"
    assert {p.name: p.read_bytes() for p in info.path.iterdir()} == FILES
    assert info.sha256 == directory_sha256(info.path) == files_sha256(FILES)
    assert info.bytes == sum(len(data) for data in FILES.values())
    assert store.verify(info.path, info.sha256)
    assert sorted(os.listdir(info.path.parent)) == ["cbpo"]
    assert info.as_dict() == {"path": str(info.path), "sha256": info.sha256, "bytes": info.bytes}


def test_checksum_follows_the_documented_definition() -> None:
    expected = hashlib.sha256()
    for name in sorted(FILES):
        data = FILES[name]
        expected.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    assert files_sha256(FILES) == expected.hexdigest()
    assert files_sha256(dict(reversed(FILES.items()))) == expected.hexdigest()
    assert files_sha256({"a": b"bc"}) != files_sha256({"ab": b"c"})


def test_nested_files_and_paths_relative_to_root(store: ArtifactStore) -> None:
    files = {"sub/a.bin": b"a", "b.txt": b"b"}
    info = store.write_dir("tam/key1", files)
    assert (info.path / "sub" / "a.bin").read_bytes() == b"a"
    assert {name: (info.path / name).read_bytes() for name in files} == files
    assert store.verify("tam/key1", info.sha256)


def test_a_corrupted_or_altered_directory_fails_verify(store: ArtifactStore) -> None:
    info = store.write_dir("job1/u1/cbpo", FILES)
    weights = info.path / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(b"\xff" + original[1:])
    assert not store.verify(info.path, info.sha256)
    weights.write_bytes(original)
    assert store.verify(info.path, info.sha256)
    (info.path / "extra.txt").write_bytes(b"")
    assert not store.verify(info.path, info.sha256)
    assert not store.verify(store.root / "missing", info.sha256)


@pytest.mark.parametrize(
    "relative",
    ["../escape", "a/../b", "/abs/path", "a\\b", "", ".hidden", "a//b", "a/", "-rf", "a b"],
)
def test_unsafe_relative_paths_are_refused(store: ArtifactStore, relative: str) -> None:
    with pytest.raises(ValueError):
        store.write_dir(relative, FILES)
    assert not store.root.exists()


@pytest.mark.parametrize("name", ["../evil", "sub/../x", "/etc/passwd", "..", ""])
def test_unsafe_file_names_are_refused(store: ArtifactStore, name: str) -> None:
    with pytest.raises(ValueError):
        store.write_dir("job1/u1/cbpo", {name: b"x"})
    assert not store.root.exists()


def test_check_name() -> None:
    assert check_name("user_12.a-b") == "user_12.a-b"
    for bad in ("..", ".", "a/b", "a\\b", "", "x" * 256, "é"):
        with pytest.raises(ValueError):
            check_name(bad)


def test_writing_the_same_content_twice_is_a_no_op(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = store.write_dir("job1/u1/cbpo", FILES)
    before = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}

    def refuse(destination: Path, data: bytes) -> None:
        raise AssertionError(f"rewrote {destination}")

    monkeypatch.setattr(artifacts, "_write_file", refuse)
    second = store.write_dir("job1/u1/cbpo", dict(reversed(FILES.items())))
    assert second == first
    assert {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()} == before


def test_other_content_at_an_existing_path_is_refused(store: ArtifactStore) -> None:
    first = store.write_dir("job1/u1/cbpo", FILES)
    with pytest.raises(FileExistsError, match="other content"):
        store.write_dir("job1/u1/cbpo", {**FILES, "adapter_config.json": b'{"r": 16}'})
    assert store.verify(first.path, first.sha256)
    assert sorted(os.listdir(first.path.parent)) == ["cbpo"]


def test_a_crash_mid_write_leaves_no_partial_target(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = artifacts._write_file
    written: list[Path] = []

    def crash_on_second(destination: Path, data: bytes) -> None:
        if written:
            destination.write_bytes(data[: len(data) // 2])
            raise OSError("disk died")
        written.append(destination)
        real_write(destination, data)

    monkeypatch.setattr(artifacts, "_write_file", crash_on_second)
    with pytest.raises(OSError, match="disk died"):
        store.write_dir("job1/u1/cbpo", FILES)
    assert written and written[0].parent.name.startswith(".cbpo.")
    assert not (store.root / "job1" / "u1" / "cbpo").exists()
    assert os.listdir(store.root / "job1" / "u1") == []

    monkeypatch.setattr(artifacts, "_write_file", real_write)
    info = store.write_dir("job1/u1/cbpo", FILES)
    assert store.verify(info.path, files_sha256(FILES))


def test_find_describes_a_written_folder_and_none_for_a_missing_one(store: ArtifactStore) -> None:
    written = store.write_dir("task-adapters/k1", FILES)
    assert store.find("task-adapters/k1") == written
    assert store.find("task-adapters/k2") is None


def test_remove_unregistered_deletes_what_a_crash_left_and_keeps_the_registered(store: ArtifactStore) -> None:
    kept = store.write_dir("adapters/j1/u1/sft/attempt-1", FILES)
    orphan = store.write_dir("adapters/j1/u1/sft/attempt-2", FILES)  # written, never recorded
    other_user = store.write_dir("adapters/j1/u2/sft/attempt-1", FILES)
    staging = store.root / "adapters" / "j1" / "u2" / "sft" / ".attempt-2.0123abcd.tmp"  # a crash mid-write
    staging.mkdir()
    (staging / "adapter_config.json").write_bytes(b"{")
    other_job = store.write_dir("adapters/j2/u1/sft/attempt-1", FILES)

    removed = store.remove_unregistered("adapters/j1", 3, [str(kept.path), other_user.path])

    assert removed == sorted([orphan.path, staging])
    assert store.verify(kept.path, kept.sha256) and store.verify(other_user.path, other_user.sha256)
    assert not orphan.path.exists() and not staging.exists()
    assert store.verify(other_job.path, other_job.sha256), "another job's folders are not this job's to clean"
    assert store.remove_unregistered("adapters/j3", 3, []) == []
