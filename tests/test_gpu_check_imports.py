"""`make gpu-check` runs where only torch, transformers and peft are installed (the lent GPU
machines): its scripts must import nothing of Ray, FAISS, SQLAlchemy, scikit-learn or
sentence-transformers. Checked in a Python that sees this environment's packages but those."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MISSING = ("ray", "faiss", "sqlalchemy", "sklearn", "scikit_learn", "sentence_transformers", "rouge_score", "typer", "psycopg")


def test_the_gpu_check_imports_without_what_the_gpu_machines_lack(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().replace("-", "_").startswith(MISSING):
            (site / entry.name).symlink_to(entry)
    code = "import sys, bench.throughput, bench.batched_generation; print(sorted({m.split('.')[0] for m in sys.modules}))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}
    done = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(eval(done.stdout.strip().splitlines()[-1]))
    assert {"torch", "transformers", "peft", "cbpo_orch"} <= loaded
    assert not loaded & set(MISSING)
