"""Helpers shared by several test modules: the real ``cbpo-orch`` console script in a session of
its own and the CLI in this process, process-tree inspection, the fast job and train-user flags,
and small training inputs. Their fixtures live in ``conftest.py``."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cbpo_orch.data.tasks import Budgets
from cbpo_orch.home import SAMPLE_DATA
from cbpo_orch.method.config import LoraSettings
from cbpo_orch.orchestrator.processes import stat_fields
from cbpo_orch.storage.registry import Registry
from cbpo_orch.training.encoding import EncodedPair, collate
from cbpo_orch.training.trainer import UserTraining, encode_samples, held_out_logp, mismatched_pairs

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).with_name("cbpo-orch")
FAST_JOB = ["--max-profile", "8", "--epochs", "1", "--max-new-tokens", "8", "--max-prompt-tokens", "128"]
"""``submit`` flags that make a job on the tiny model take seconds."""
FAST_TRAIN_USER = ["--max-profile", "8", "--epochs", "1", "--max-prompt-tokens", "128", "--max-new-tokens", "6"]
TRAIN_USER = json.loads((SAMPLE_DATA / "dev_questions.json").read_text())[0]["user_id"]
"""The shipped sample's first dev user, the one ``train_args`` trains."""
CLEAN_ENV = ("RAY_ADDRESS", "CBPO_ORCH_DB", "CBPO_ORCH_ARTIFACTS")
JOB_TIMEOUT = 240
LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
BUDGETS = Budgets(48, 12)
OPERATOR_KEY = "operator-key-0123456789"
"""The serving tests' key for every user."""


def live_processes(field: int, value: int) -> list[int]:
    """Live (non-zombie) processes whose ``/proc/PID/stat`` field ``field`` (after the
    command name: 2 = process group, 3 = session) is ``value``."""
    found = []
    for entry in os.listdir("/proc"):
        fields = stat_fields(int(entry)) if entry.isdigit() else None
        if fields is not None and fields[0] != "Z" and int(fields[field]) == value:
            found.append(int(entry))
    return found


def session_members(sid: int) -> list[int]:
    return live_processes(3, sid)


def group_members(pgid: int) -> list[int]:
    return live_processes(2, pgid)


def kill_session(sid: int, timeout: float = 15.0) -> None:
    """SIGKILL the process group ``sid`` and every other process of session ``sid``
    (Ray workers put themselves in their own group but stay in the session)."""
    deadline = time.monotonic() + timeout
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    while members := session_members(sid):
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of session {sid} survive SIGKILL: {members}")
        time.sleep(0.1)


class Cli:
    """The real ``cbpo-orch`` console script with ``CBPO_ORCH_HOME`` set to ``home``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
        self.env["CBPO_ORCH_HOME"] = str(home)
        self.started: list[subprocess.Popen] = []

    def start(self, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [str(CLI), *args],
            env=self.env,
            cwd=self.home,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.started.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
        """Wait for ``proc``, then clear what it left in its session."""
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            self.kill(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def run(self, *args: str, timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
        return self.finish(self.start(*args), timeout)

    def json(self, *args: str):
        done = self.run(*args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def kill(self, proc: subprocess.Popen) -> None:
        kill_session(proc.pid)
        proc.wait(timeout=10)

    def cleanup(self) -> None:
        for proc in self.started:
            self.kill(proc)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def ok_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"{done.args} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done.stdout.splitlines()[0].strip()


def sqlite_registry(home: Path) -> Registry:
    return Registry(f"sqlite:///{home / 'registry.db'}")


def attempt_dirs(home: Path, job: str, user: str, method: str) -> list[str]:
    """Every entry of a run's adapter folder: its attempts, and any staging folder."""
    folder = home / "artifacts" / "adapters" / job / user / method
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def cli_in_process(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """``cbpo-orch ARGV`` in this process: its exit code, stdout and stderr."""
    from cbpo_orch.cli.main import main

    monkeypatch.setattr(sys, "argv", ["cbpo-orch", *argv])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def train_args(data, model, out, *extra) -> list[str]:
    return ["train-user", "--task", "lamp4", "--data", str(data), "--user", TRAIN_USER, "--model", str(model), "--out", str(out), *FAST_TRAIN_USER, *extra]


def bad_questions(folder, mutate):
    shutil.copytree(SAMPLE_DATA, folder)
    path = folder / "dev_questions.json"
    records = json.loads(path.read_text())
    path.write_text(mutate(records) if callable(mutate) else mutate)


def random_batch(vocab: int, seed: int = 0, rows: int = 4):
    """Right-padded rows of unequal prompt and completion lengths."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(rows):
        prompt, completion = rng.randint(3, 20), rng.randint(1, 15)
        pairs.append(EncodedPair(tuple(rng.randrange(2, vocab) for _ in range(prompt + completion)), prompt))
    return pairs, collate(pairs, pad_id=1)


def user_work(tokenizer, u: int, n_own: int, n_aux: int, method: str, pad_id: int, model) -> UserTraining:
    own = [(f"Generate a headline for the following article: user {u} story {i}", f"User {u} headline {i}") for i in range(n_own)]
    aux = [(f"Generate a headline for the following article: other {u}.{i}", f"Other news {i} of {u}") for i in range(n_aux)]
    held = encode_samples(tokenizer, [(f"Generate a headline for the following article: user {u} later", f"User {u} headline")], True, BUDGETS)
    return UserTraining(
        samples=encode_samples(tokenizer, own, True, BUDGETS) + encode_samples(tokenizer, aux, False, BUDGETS),
        gamma=0.1 * (u + 1),
        seed=10 + u,
        kl_pairs=mismatched_pairs(tokenizer, own + aux, BUDGETS) if method == "kto" else None,
        validate=lambda: held_out_logp(model, [s.pair for s in held], pad_id, 4, "cpu"),
    )


def wait_until(condition, timeout: float = 10.0, what: str = "the condition") -> None:
    """Poll ``condition()`` until it is true; fail after ``timeout`` seconds (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(0.01)


def http_json(url: str, body: bytes | None = None, key: str | None = OPERATOR_KEY) -> tuple[int, dict]:
    """(status, JSON body) of a raw request to a server under test: POST when there is a body, else GET."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
