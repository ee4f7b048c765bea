"""Load: one job of N synthetic users through the real ``cbpo-orch`` command line.

The data are SYNTHETIC, labelled so in every text and in the folder's README: N users of
LaMP-4 shape (headline generation), 2–3 profile items and 1 query each, a few common words
per text, so that embedding them stays cheap. The model is the tiny random-weights Llama of
``tests/tiny_model.py``. Nothing here says anything about quality; it measures the
orchestrator:

1. ``submit --method base --users all``: the wall time of each stage (from the stage lines
   the driver prints on stderr); the runs per second the driver records (from the registry's
   ``started_at`` / ``finished_at``, overall and per tenth of the runs); the resident memory
   of the driver process (found by the pid in the job's lease) over the fan-out; and, at a
   few points while the job runs and once after it, the latency of ``status``,
   ``status JOB --json`` and ``results JOB --format json``: the whole command in a new
   process (its start-up included) and the same command run in this process (the registry
   query and the printing alone), next to the start-up alone (importing the CLI).
2. ``submit --method sft`` on a few users with tiny flags: a training method end to end.

    .venv/bin/python bench/load.py --users 200     # a quick try
    .venv/bin/python bench/load.py                 # 5,000 users

Writes ``bench/results/load-<N>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.tiny_model and tests.helpers

from sqlalchemy import create_engine, select  # noqa: E402

from cbpo_orch.cli.main import main as cli_main  # noqa: E402
from cbpo_orch.orchestrator.lease import owner_pid  # noqa: E402
from cbpo_orch.storage.models import UserRun  # noqa: E402
from cbpo_orch.storage.registry import Registry  # noqa: E402
from tests.helpers import Cli  # noqa: E402
from tests.tiny_model import build_tiny_model  # noqa: E402

TINY = ["--max-new-tokens", "4", "--max-prompt-tokens", "64"]
TRAIN = ["--max-profile", "2", "--epochs", "1", *TINY]
INSTRUCTION = "Generate a headline for the following article: "
WORDS = (
    "city council storm police school state plan report new water market health court music film "
    "team game price home food power river road fire family world night study park bank"
).split()
STAGES = {
    "driver_start": "connecting to Ray",
    "ray_start": "embedding users' histories",
    "embedding": "personalizing users",
}
"""Each stage ends where the driver prints the line that starts the next one, in the driver's
order: it joins (or starts) Ray, then embeds the histories in shards on it."""
TARGETS = {"runs_per_s": 20.0, "command_s": 1.0}
JOB_TIMEOUT_S = 3600


def write_data(folder: Path, n_users: int, seed: int = 0) -> Path:
    """A LaMP-4 ``dev`` split of ``n_users`` synthetic users (2–3 profile items, 1 query each)."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    questions, golds = [], []
    for u in range(n_users):
        user = f"synth-{u:05d}"
        profile = [
            {"id": f"{user}-p{j}", "text": f"synthetic {u}.{j} {words(4)}", "title": f"synthetic {words(3)}", "date": f"2024-01-{j + 1:02d}"}
            for j in range(rng.randint(2, 3))
        ]
        questions.append({"id": f"{user}-q0", "user_id": user, "input": f"{INSTRUCTION}synthetic {u}.q {words(4)}", "profile": profile})
        golds.append({"id": f"{user}-q0", "output": f"synthetic {words(3)}"})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dev_questions.json").write_text(json.dumps(questions))
    (folder / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_4", "golds": golds}))
    (folder / "README.md").write_text(
        f"# Synthetic load-test data ({n_users} users)\n\nWritten by bench/load.py: random common words, no real "
        "users or articles. It measures the orchestrator only and says nothing about quality.\n"
    )
    return folder


def registry_url(home: Path) -> str:
    return f"sqlite:///{home / 'registry.db'}"


def run_base_job(cli: Cli, data: Path, model: Path, workers: int, probes: int = 3, sample_every_s: float = 0.5) -> dict:
    """``submit --method base --users all`` on ``data``: stages, recorded runs/s, the driver's
    memory and the latency of the read commands (``probes`` times while it runs, once after)."""
    url = registry_url(cli.home)
    _in_process(cli.home, ["status"])  # loads the command modules before anything is timed
    started = time.time()
    proc = cli.start("submit", "--data", str(data), "--model", str(model), "--method", "base", "--users", "all", "--workers", str(workers), "--examples", "0", *TINY)
    job = proc.stdout.readline().strip()
    submitted = time.time()
    lines = _Lines(proc.stderr)
    if not job:
        proc.wait(JOB_TIMEOUT_S)
        raise RuntimeError(f"submit printed no job id:\n{lines.text()[-4000:]}")
    rest = _Lines(proc.stdout)  # drained, so that the driver never waits on a full pipe
    with Registry(url) as registry:
        total = len(registry.job(job).users)
        pid = _driver_pid(registry, job, proc)
    sampler = _Sampler(url, job, pid, sample_every_s)
    during = []
    for k in range(1, probes + 1):
        if not sampler.wait_for(total * k / (probes + 1), proc):
            break
        during.append({"done": sampler.samples[-1]["done"], **probe(cli, job)})
    code = proc.wait(JOB_TIMEOUT_S)
    ended = time.time()
    sampler.stop()
    rest.join()
    lines.join()
    cli.kill(proc)
    if code != 0:
        raise RuntimeError(f"submit exited {code}:\n{lines.text()[-4000:]}")
    return {
        "job": job,
        "users": total,
        "stages_s": _stages(lines.timed, started, submitted, ended, job),
        "rate": _rate(url, job),
        "memory": _memory(sampler.samples, total),
        "latency": {"during": during, "after": probe(cli, job)},
    }


def run_train_job(cli: Cli, data: Path, model: Path, method: str, users: int, workers: int) -> dict:
    """``submit --method METHOD`` on the first ``users`` users with tiny training flags."""
    started = time.time()
    done = cli.run("submit", "--data", str(data), "--model", str(model), "--method", method, "--users", str(users), "--workers", str(workers), "--examples", "0", *TRAIN, timeout=JOB_TIMEOUT_S)
    wall = time.time() - started
    if done.returncode != 0:
        raise RuntimeError(f"the {method} job exited {done.returncode}:\n{done.stderr[-4000:]}")
    job = done.stdout.splitlines()[0].strip()
    with Registry(registry_url(cli.home)) as registry:
        rows = registry.results(job)
    return {"job": job, "method": method, "users": users, "succeeded": len(rows), "wall_s": round(wall, 1), "mean_run_s": round(sum(r["seconds"] for r in rows) / len(rows), 3)}


def read_commands(job: str) -> dict[str, list[str]]:
    return {"status": ["status"], "status JOB --json": ["status", job, "--json"], "results JOB --format json": ["results", job, "--format", "json"]}


def probe(cli: Cli, job: str) -> dict:
    """The latency of each read command: ``cli_s`` the whole command in a new process,
    ``in_process_s`` the same command in this process; ``startup_s`` importing the CLI."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cbpo_orch.cli.main"], check=True, env=cli.env)
    found = {"startup_s": round(time.perf_counter() - started, 3)}
    for name, argv in read_commands(job).items():
        started = time.perf_counter()
        proc = cli.start(*argv)
        out, err = proc.communicate(timeout=120)
        whole = time.perf_counter() - started
        cli.kill(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} exited {proc.returncode}: {err[-2000:]}")
        found[name] = {"cli_s": round(whole, 3), "in_process_s": round(_in_process(cli.home, argv), 3), "bytes": len(out)}
    return found


def _in_process(home: Path, argv: list[str]) -> float:
    """Seconds of one ``cbpo-orch`` command run in this process (its modules already loaded)."""
    saved = sys.argv
    sys.argv = ["cbpo-orch", *argv, "--home", str(home), "--db", registry_url(home)]
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cli_main()
    except SystemExit as exit_:
        if exit_.code:
            raise RuntimeError(f"{argv} exited {exit_.code}") from None
    finally:
        sys.argv = saved
    return time.perf_counter() - started


class _Lines:
    """Reads a stream's lines in the background, each with the time it arrived."""

    def __init__(self, stream) -> None:
        self.timed: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.timed.append((time.time(), line.rstrip("\n")))

    def join(self) -> None:
        self._thread.join(timeout=30)

    def text(self) -> str:
        return "\n".join(line for _, line in self.timed)


def _driver_pid(registry: Registry, job: str, proc, timeout_s: float = 300) -> int:
    """The pid of the job's driver: the one in its lease owner (``host:pid:nonce``)."""
    deadline = time.monotonic() + timeout_s
    while (owner := registry.lease(job)["owner"]) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the driver of job {job} never took its lease (submit exited {proc.returncode})")
        time.sleep(0.05)
    return owner_pid(owner)


class _Sampler:
    """Every ``every_s``: the driver's RSS and the job's finished runs, until the driver ends."""

    def __init__(self, url: str, job: str, pid: int, every_s: float) -> None:
        self.url, self.job, self.pid, self.every_s = url, job, pid, every_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with Registry(self.url) as registry:
            while True:
                rss = _rss_mb(self.pid)
                if rss is None:
                    return
                counts = registry.job(self.job).counts
                self.samples.append({"t": time.time(), "done": counts["succeeded"] + counts["failed"], "rss_mb": rss})
                if self._stop.wait(self.every_s):
                    return

    def wait_for(self, done: float, proc) -> bool:
        """Wait until ``done`` runs have finished; False if the job ended first."""
        while not self.samples or self.samples[-1]["done"] < done:
            if proc.poll() is not None or not self._thread.is_alive():
                return False
            time.sleep(self.every_s / 2)
        return True

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb = next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return None if kb is None else round(int(kb) / 1024, 1)


def _stages(lines: list[tuple[float, str]], started: float, submitted: float, ended: float, job: str) -> dict:
    """Seconds of each stage, from the times the driver printed its stage lines."""
    def first(text: str) -> float:
        return next(t for t, line in lines if line.startswith(text))

    marks = {"submit": submitted, **{stage: first(text) for stage, text in STAGES.items()}, "fan_out": first(f"job {job} "), "end": ended}
    names, times = list(marks), [started, *marks.values()]
    return {name: round(times[i + 1] - times[i], 1) for i, name in enumerate(names)} | {"total": round(ended - started, 1)}


def _rate(url: str, job: str) -> dict:
    """Runs per second the driver recorded, from its first recorded run to its last (before
    it, ``warm_up_s``: the workers loading the model), and in each tenth of the runs."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(UserRun.started_at, UserRun.finished_at).where(UserRun.job_id == job, UserRun.state == "succeeded")).all()
    finally:
        engine.dispose()
    first = min(_seconds(start) for start, _ in rows)
    finished = sorted(_seconds(end) for _, end in rows)
    n, span = len(finished), finished[-1] - finished[0]
    edges = [finished[round((n - 1) * k / 10)] for k in range(11)]
    tenths = [round((n - 1) / 10 / (b - a), 1) if b > a else None for a, b in zip(edges, edges[1:])]
    return {"runs": n, "warm_up_s": round(finished[0] - first, 1), "recording_s": round(span, 1), "runs_per_s": round((n - 1) / span, 1) if span else None, "per_tenth": tenths}


def _seconds(moment) -> float:
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _memory(samples: list[dict], total: int) -> dict:
    """The driver's RSS when it took the lease, after 10 % of the runs, at its peak and at the
    end; ``growth_mb``: end − after 10 %, what would grow with the runs."""
    tenth = next(s for s in samples if s["done"] >= total / 10)
    end = samples[-1]
    return {
        "start_mb": samples[0]["rss_mb"],
        "after_10pct_mb": tenth["rss_mb"],
        "peak_mb": max(s["rss_mb"] for s in samples),
        "end_mb": end["rss_mb"],
        "growth_mb": round(end["rss_mb"] - tenth["rss_mb"], 1),
        "samples": [[round(s["t"] - samples[0]["t"], 1), s["done"], s["rss_mb"]] for s in samples],
    }


def _worst(latency: dict) -> dict[str, dict[str, float]]:
    """Per read command, the slowest whole command and in-process run while the job ran."""
    during = latency["during"] or [latency["after"]]
    return {name: {key: max(p[name][key] for p in during) for key in ("cli_s", "in_process_s")} for name in read_commands("JOB")}


def print_report(report: dict) -> None:
    base, train = report["base"], report["train"]
    print(f"\n{report['users']} synthetic users, base, {report['workers']} workers — {report['machine']}")
    print("stage seconds: " + ", ".join(f"{k} {v}" for k, v in base["stages_s"].items()))
    rate = base["rate"]
    print(f"runs recorded: {rate['runs']} in {rate['recording_s']} s after a {rate['warm_up_s']} s warm-up = {rate['runs_per_s']} runs/s (target ≥ {TARGETS['runs_per_s']:g}); per tenth: {rate['per_tenth']}")
    m = base["memory"]
    print(f"driver RSS MB: start {m['start_mb']}, after 10 % {m['after_10pct_mb']}, peak {m['peak_mb']}, end {m['end_mb']} (growth {m['growth_mb']})")
    worst, after = _worst(base["latency"]), base["latency"]["after"]
    startups = [p["startup_s"] for p in base["latency"]["during"]] + [after["startup_s"]]
    print(f"\n{'command':28s} {'while running: cli':>19s} {'in-process':>11s} {'after: cli':>11s} {'in-process':>11s}")
    for name in read_commands("JOB"):
        print(f"{name:28s} {worst[name]['cli_s']:>19.2f} {worst[name]['in_process_s']:>11.3f} {after[name]['cli_s']:>11.2f} {after[name]['in_process_s']:>11.3f}")
    print(f"CLI start-up alone (import): {min(startups):.2f}–{max(startups):.2f} s; target per command < {TARGETS['command_s']:g} s")
    print(f"\n{train['method']} on {train['users']} users: {train['succeeded']} succeeded, {train['wall_s']} s wall, {train['mean_run_s']} s a run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=5000, help="synthetic users of the base job")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of each job")
    parser.add_argument("--home", type=Path, help="cbpo-orch home to use and keep (default: a temporary one, removed)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder of load-<N>.json")
    parser.add_argument("--probes", type=int, default=3, help="times the read commands are timed while the job runs")
    parser.add_argument("--train-method", default="sft")
    parser.add_argument("--train-users", type=int, default=5)
    args = parser.parse_args(argv)

    home = args.home or Path(tempfile.mkdtemp(prefix="cbpo-load-"))
    load = os.getloadavg()
    cli = Cli(home)
    try:
        data = write_data(home / "synthetic-data", args.users)
        model = build_tiny_model(home / "tiny-random-llama")
        base = run_base_job(cli, data, model, args.workers, args.probes)
        train = run_train_job(cli, data, model, args.train_method, args.train_users, args.workers)
    finally:
        cli.cleanup()
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)
    report = {
        "users": args.users,
        "workers": args.workers,
        "machine": f"{os.cpu_count()} CPUs, load average {load[0]:.1f} at the start",
        "data": "synthetic (bench/load.py write_data), tiny random-weights Llama (tests/tiny_model.py)",
        "targets": TARGETS,
        "base": base,
        "train": train,
    }
    print_report(report)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"load-{args.users}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
