"""``--data`` takes the data as users hold it: LongLaMP's hub parquet shards, one parquet file,
a ``save_to_disk`` folder, the ``datasets`` cache of a hub id (read offline), and today's JSON
layouts; all give the same users through one path, with one-line errors naming the source and
the record. A long task without ``--data`` reads its LongLaMP config from the hub or the cache.

Fixtures are written at test time by ``datasets``/pyarrow in the hub's schema: one row layout
per LongLaMP user config, and real reviews from ``../shared`` where it is present.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
from datasets.data_files import DataFilesDict
from datasets.packaged_modules.parquet.parquet import Parquet

from cbpo_orch.data.dataset import DataError, find_splits, load_split
from cbpo_orch.data.sources import LONGLAMP, LONGLAMP_CONFIGS, task_data
from cbpo_orch.data.tasks import load_task
from tests.helpers import FAST_JOB, Cli, cli_in_process, ok_line

SPLITS = ("train", "val", "test")
CACHE_HASH = "0123456789abcdef0123456789abcdef01234567"


def _rows(config: str, split: str, users: int = 3) -> list[dict]:
    """Rows of a LongLaMP user config in the hub's schema (user-id field, profile item fields)."""
    rows = []
    for n in range(users):
        user = f"{split}-user {n}"  # a space: unsafe as a file name, as real names are
        if config == "abstract_generation_user":
            items = [{"title": f"Paper {k} of {user}", "abstract": f"We study {k} things.", "id": f"p{n}{k}", "year": 2000 + k} for k in range(3)]
            rows.append({"name": user, "input": f'Generate an abstract for the title "Topic {n} {split}".', "output": "An abstract.", "profile": items})
        elif config == "product_review_user":
            items = [{"description": f"Product {k}", "overall": f"{k + 1}.0", "reviewText": f"Review {k} by {n}.", "summary": f"Sum {k}"} for k in range(3)]
            rows.append({"reviewerId": user.replace(" ", ""), "input": f"Generate the review text for product {n} {split}.", "output": "A review.", "profile": items})
        else:
            items = [{"summary": f"post {k}", "content": f"Content {k} by {n}."} for k in range(3)]
            rows.append({"author": user, "input": f"Generate the content for a reddit post {n} {split}", "output": "A post.", "profile": items})
    return rows


def _task(config: str):
    return load_task(next(task for task, known in LONGLAMP_CONFIGS.items() if known == config))


def _parquet_shards(folder: Path, splits: dict[str, list[dict]]) -> Path:
    """The hub's layout of one config: ``{split}-00000-of-00001.parquet`` written by datasets."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        datasets.Dataset.from_list(rows).to_parquet(folder / f"{split}-00000-of-00001.parquet")
    return folder


def _hub_cache(hf_home: Path, config: str, splits: dict[str, list[dict]]) -> Path:
    """``LongLaMP/LongLaMP``'s config in the datasets cache under ``hf_home``, as
    ``load_dataset`` leaves it after a download: the parquet builder's Arrow files and info
    under ``LongLaMP___long_la_mp/{config}/0.0.0/{commit}``."""
    shards = _parquet_shards(hf_home / "shards" / config, splits)
    files = DataFilesDict.from_patterns({split: [str(shards / f"{split}-00000-of-00001.parquet")] for split in splits})
    builder = Parquet(cache_dir=str(hf_home / "build"), dataset_name="long_la_mp", config_name=config, hash=CACHE_HASH, data_files=files)
    builder.download_and_prepare()
    target = hf_home / "datasets" / "LongLaMP___long_la_mp" / config / "0.0.0" / CACHE_HASH
    target.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)
    shutil.rmtree(hf_home / "build")
    return hf_home


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty HF home, the hub off: ``load_dataset`` may read only the cache."""
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    env = {"HF_HOME": str(hf_home), "HF_DATASETS_CACHE": str(hf_home / "datasets"), "HF_HUB_OFFLINE": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_home / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    from cbpo_orch.data import sources

    sources._load_hub.cache_clear()
    yield hf_home, env
    sources._load_hub.cache_clear()


def _as_jsonl(folder: Path, splits: dict[str, list[dict]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (folder / f"{'dev' if split == 'val' else split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return folder


@pytest.mark.parametrize("config", list(LONGLAMP_CONFIGS.values()))
def test_every_form_of_a_longlamp_config_gives_the_same_users(config, tmp_path, offline_hub):
    splits = {split: _rows(config, split) for split in SPLITS}
    task = _task(config)
    shards = _parquet_shards(tmp_path / "shards", splits)
    saved = tmp_path / "saved"
    datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in splits.items()}).save_to_disk(saved)
    one_split = tmp_path / "one-split"  # as `load_dataset(…, split="val").save_to_disk(…)` leaves it
    datasets.Dataset.from_list(splits["val"], split=datasets.NamedSplit("val")).save_to_disk(one_split)
    _hub_cache(offline_hub[0], config, splits)
    expected = load_split(_as_jsonl(tmp_path / "jsonl", splits), "dev", task)

    forms = (shards, shards / "val-00000-of-00001.parquet", saved, one_split, f"{LONGLAMP}:{config}")
    for form in forms:
        loaded = load_split(form, "dev", task)
        assert loaded.users == expected.users, form
    assert find_splits(shards) == ("test", "train", "val")
    assert find_splits(f"{LONGLAMP}:{config}") == ("test", "train", "val")
    assert list(load_split(saved, "train", task).users) == list(load_split(tmp_path / "jsonl", "train", task).users)


def test_dev_val_and_validation_name_one_split(tmp_path):
    task = _task("topic_writing_user")
    rows = _rows("topic_writing_user", "val")
    for held in ("dev", "val", "validation"):
        folder = _parquet_shards(tmp_path / held, {held: rows})
        for asked in ("dev", "val", "validation"):
            assert len(load_split(folder, asked, task).users) == 3
    _as_jsonl(tmp_path / "val", {"val": rows})  # dev.jsonl beside val-00000-of-00001.parquet
    with pytest.raises(DataError, match=r"split 'dev' is ambiguous: both dev.jsonl and val-00000-of-00001.parquet exist"):
        load_split(tmp_path / "val", "dev", task)
    with pytest.raises(DataError, match=r"no split 'test' .*splits found: dev, val"):
        load_split(tmp_path / "val", "test", task)


def test_a_bad_record_is_one_line_naming_the_source_and_the_record(tmp_path, offline_hub):
    task = _task("product_review_user")
    rows = _rows("product_review_user", "val")
    del rows[1]["profile"][2]["overall"]  # Arrow keeps the field, null: it is left out
    shards = _parquet_shards(tmp_path / "shards", {"val": rows})
    _hub_cache(offline_hub[0], "product_review_user", {"val": rows})
    expected = {
        shards: f"{shards / 'val-00000-of-00001.parquet'}: row 1 (user 'val-user1'): profile item 2: lacks field 'overall' (needed by task 'longlamp3')",
        f"{LONGLAMP}:product_review_user": f"{LONGLAMP}:product_review_user split 'val': row 1 (user 'val-user1'): profile item 2: lacks field 'overall'",
    }
    for form, message in expected.items():
        with pytest.raises(DataError) as error:
            load_split(form, "dev", task)
        assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_hub_id_neither_reachable_nor_cached_is_one_line_saying_what_to_do(tmp_path, offline_hub, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("CBPO_ORCH_HOME", str(tmp_path / "home"))
    for argv in (["--task", "longlamp3"], ["--task", "longlamp3", "--data", LONGLAMP], ["--data", "nobody/nothing:none"]):
        code, out, err = cli_in_process(monkeypatch, capsys, "submit", *argv, "--model", str(tiny_model_dir), *FAST_JOB)
        [line] = err.splitlines()
        assert code == 2 and out == "" and "Traceback" not in err
        named = "nobody/nothing:none" if "--data" in argv and LONGLAMP not in argv else f"{LONGLAMP}:product_review_user"
        assert line.startswith(f"error: {named}: neither the Hugging Face hub") and "datasets cache" in line
        assert "--data" in line and "load_dataset(" in line
    assert not (tmp_path / "home" / "registry.db").exists()


def test_a_long_task_defaults_to_its_longlamp_config_and_lamp_to_the_sample():
    from cbpo_orch.home import SAMPLE_DATA

    assert task_data(None, "longlamp2") == f"{LONGLAMP}:abstract_generation_user"
    assert task_data(None, "longlamp3") == f"{LONGLAMP}:product_review_user"
    assert task_data(None, "longlamp4") == f"{LONGLAMP}:topic_writing_user"
    assert task_data(LONGLAMP, "longlamp4") == f"{LONGLAMP}:topic_writing_user"
    assert task_data(None, "lamp4") == SAMPLE_DATA
    assert task_data("elsewhere/data", "longlamp3") == "elsewhere/data"


def test_real_reviews_read_the_same_from_parquet_save_to_disk_and_jsonl(shared_dir, tmp_path):
    """A few rows of ``../shared/data/amazon-musical-review`` (LongLaMP-3's row layout),
    written at test time, never committed."""
    source = shared_dir / "data" / "amazon-musical-review"
    splits = {}
    for split, name in (("val", "dev"), ("train", "train")):
        lines = (source / f"{name}.jsonl").read_text().splitlines()[:6]
        splits[split] = [json.loads(line) for line in lines]
    task = load_task("longlamp3")
    expected = load_split(_as_jsonl(tmp_path / "jsonl", splits), "dev", task)
    shards = _parquet_shards(tmp_path / "shards", splits)
    saved = tmp_path / "saved"
    datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in splits.items()}).save_to_disk(saved)
    for form in (shards, saved):
        assert load_split(form, "dev", task).users == expected.users
    assert len(expected.users) == 6 and all(user.queries[0].gold for user in expected.users.values())


def test_the_literal_longlamp3_submit_reads_the_cache_offline_and_says_its_config(tmp_path, tiny_model_dir, offline_hub):
    """``cbpo-orch submit --task longlamp3 --users 2`` with no --data, the hub off, the cache full."""
    hf_home, env = offline_hub
    _hub_cache(hf_home, "product_review_user", {split: _rows("product_review_user", split) for split in SPLITS})
    (tmp_path / "home").mkdir()
    cli = Cli(tmp_path / "home")
    cli.env.update(env)
    try:
        done = cli.run("submit", "--task", "longlamp3", "--users", "2", "--method", "sft", "--model", str(tiny_model_dir), "--workers", "1",
                       "--max-profile", "8", "--epochs", "1", "--max-new-tokens", "8", "--max-prompt-tokens", "256")
        job = ok_line(done)
        rows = json.loads(cli.run("results", job, "--format", "json").stdout)
    finally:
        cli.cleanup()
    assert f"data: {LONGLAMP}, config product_review_user, split 'val' (for --split dev)" in done.stderr
    assert sorted(row["user_id"] for row in rows) == ["val-user0", "val-user1"]
    assert all(0.0 <= row["rouge1"] <= 1.0 for row in rows)
