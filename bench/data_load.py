"""Loading a LongLaMP-sized data set: time and peak memory of what ``submit`` validates and of
what the driver loads, on a synthetic set in the hub's parquet layout.

Builds ``--users`` users × ``--items`` profile items of LongLaMP's ``product_review_user``
schema (``reviewerId``, ``input``, ``output``, ``profile: [{description, overall, reviewText,
summary}]``) as ``val-00000-of-00001.parquet`` and ``train-00000-of-00001.parquet``
(``--train-users`` users), and the same rows as JSONL for comparison. Each phase then runs in a
fresh Python process, which reports its seconds and its peak resident memory during the phase
(VmHWM, reset when the phase starts) over its memory after imports:

- ``submit``: ``load_split`` of the dev split and ``--users all`` resolved, as ``submit`` does
  before any job is written;
- ``driver``: ``history_datasets`` (the dev and train splits) and every profile pair the
  history index embeds (embedding itself left out: ``bench/embedding.py`` times it).

    python bench/data_load.py --users 2000 --items 300

Writes ``bench/results/data-load-<users>x<items>.json``: ``{"users", "items", "train_users",
"parquet_bytes", "jsonl_bytes", "<form>": {"<phase>": {"seconds", "base_mib", "peak_mib",
"peak_over_base_mib", "profile_items"}}}`` for the forms ``parquet`` and ``jsonl``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the a sound guitar string cable strap tone pedal amp works great price quality after week months play".split()


def _text(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + k * 13) % len(WORDS)] for k in range(words))


def _rows(split: str, users: int, items: int) -> list[dict]:
    rows = []
    for n in range(users):
        profile = [{"description": f"Product {n}-{k} " + _text(k, 8), "overall": f"{k % 5 + 1}.0",
                    "reviewText": _text(n + k, 40), "summary": _text(k, 4)} for k in range(items)]
        rows.append({"reviewerId": f"{split}{n:06d}", "input": f"Generate the review text for product {split}-{n}: " + _text(n, 12),
                     "output": _text(n, 40), "profile": profile})
    return rows


def build(folder: Path, users: int, items: int, train_users: int) -> dict[str, Path]:
    """The set as hub parquet shards and as JSONL, one folder each."""
    import datasets

    forms = {"parquet": folder / "parquet", "jsonl": folder / "jsonl"}
    for path in forms.values():
        path.mkdir(parents=True)
    for split, count in (("val", users), ("train", train_users)):
        rows = _rows(split, count, items)
        datasets.Dataset.from_list(rows).to_parquet(forms["parquet"] / f"{split}-00000-of-00001.parquet")
        with open(forms["jsonl"] / f"{'dev' if split == 'val' else split}.jsonl", "w") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)
        del rows
    return forms


def _status_mib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: the peak since the last reset)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> None:
    """Restart VmHWM from the memory now (Linux: ``5`` to clear_refs), so the peak is the phase's."""
    Path("/proc/self/clear_refs").write_text("5")


def phase(name: str, data: str) -> dict:
    """One phase in this process: its seconds, peak memory and what it loaded."""
    from cbpo_orch.data.dataset import load_split
    from cbpo_orch.data.tasks import load_task
    from cbpo_orch.orchestrator.spec import resolve_users
    from cbpo_orch.workers.context import history_datasets

    import pyarrow.parquet  # noqa: F401 — imports are not loading: they count in the base

    task = load_task("longlamp3")
    _reset_peak()
    base = _status_mib("VmRSS")
    started = time.perf_counter()
    if name == "submit":
        dataset = load_split(data, "dev", task)
        loaded = [dataset]
        resolve_users("all", dataset)
    else:
        loaded = history_datasets(data, "dev", task)
        pairs = sum(len(d.profile_examples()) for d in loaded)
        assert pairs
    seconds = time.perf_counter() - started
    items = sum(len(user.profile) for d in loaded for user in d.users.values())
    peak = _status_mib("VmHWM")
    return {"seconds": round(seconds, 2), "base_mib": round(base, 1), "peak_mib": round(peak, 1), "peak_over_base_mib": round(peak - base, 1), "profile_items": items}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--train-users", type=int, default=500)
    parser.add_argument("--phase", choices=("submit", "driver"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.data)))
        return
    report: dict = {"users": args.users, "items": args.items, "train_users": args.train_users}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        forms = build(Path(tmp), args.users, args.items, args.train_users)
        print(f"built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        for form, folder in forms.items():
            report[f"{form}_bytes"] = sum(f.stat().st_size for f in folder.iterdir())
            report[form] = {}
            for name in ("submit", "driver"):
                done = subprocess.run([sys.executable, __file__, "--phase", name, "--data", str(folder)], capture_output=True, text=True, check=True)
                report[form][name] = json.loads(done.stdout)
                print(f"{form:8} {name:7} {report[form][name]}", file=sys.stderr)
    out = Path(__file__).parent / "results" / f"data-load-{args.users}x{args.items}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
