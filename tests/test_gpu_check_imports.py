"""`make gpu-check` runs where only torch, transformers and peft are installed (the lent GPU
machines): its scripts must import nothing of Ray, FAISS, SQLAlchemy, scikit-learn or
sentence-transformers. With the wheels of `make gpu-wheels` (FAISS, SQLAlchemy) beside what
those machines have (scikit-learn, sentence-transformers), it times every phase and still
needs no Ray. Checked in a Python that sees this environment's packages but the missing ones."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MISSING = ("ray", "faiss", "sqlalchemy", "sklearn", "scikit_learn", "sentence_transformers", "rouge_score", "typer", "psycopg")


WITH_WHEELS = ("ray", "rouge_score", "psycopg")
"""What a lent GPU machine still lacks once gpu-check has installed the carried wheels."""


def run_without(missing: tuple[str, ...], code: str, tmp_path: Path) -> str:
    """``code``'s output, run by this Python over a site of this environment's packages less ``missing``."""
    site = tmp_path / "site"
    site.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().replace("-", "_").startswith(missing):
            (site / entry.name).symlink_to(entry)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_gpu_check_imports_without_what_the_gpu_machines_lack(tmp_path):
    code = "import sys, bench.throughput, bench.batched_generation; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = set(eval(run_without(MISSING, code, tmp_path)))
    assert {"torch", "transformers", "peft", "cbpo_orch"} <= loaded
    assert not loaded & set(MISSING)


def test_with_the_carried_wheels_the_gpu_check_times_index_gamma_and_registry_without_ray(tmp_path):
    code = (
        "import sys; from bench import throughput as t; users = t.synthetic_users(2, 16, 50); "
        "phases = {**t.index_and_gamma_seconds(users), **t.registry_seconds([{'adapter_model.safetensors': b'w'}] * 2)}; "
        "print(sorted(phases), sorted({m.split('.')[0] for m in sys.modules} & set(%r)))" % (WITH_WHEELS,)
    )
    assert run_without(WITH_WHEELS, code, tmp_path) == "['gamma', 'index', 'registry'] []"
