"""Fault injection for the tests that run the real console script (tests/test_crash_resume.py,
tests/test_ray_cluster.py), loaded by every Python process whose PYTHONPATH holds this folder
(the spawned driver process and, where a test's Ray nodes inherit it, their workers).

With ``CBPO_TEST_DIE_BEFORE_RECORD=N`` the process dies (``os._exit``, as abruptly as a
SIGKILL) when it is about to record its N-th run: the adapter folder is written, the
registry does not know it yet.

With ``CBPO_TEST_HOLD_DIR=FOLDER`` a worker process holds each run after its first: it touches
``FOLDER/held-PID`` and personalizes only once ``FOLDER/release`` exists, so a test knows a
run is in flight on it, and stays so, for as long as it needs.
"""

import os

HOLD_TIMEOUT_S = 600
"""How long a held run waits for its release before it fails (a test that never releases)."""

if os.environ.get("CBPO_TEST_DIE_BEFORE_RECORD"):
    from cbpo_orch.storage.registry import Registry

    _record = Registry.record_success
    _calls = [0]

    def _die_before_the_nth(self, *args, **kwargs):
        _calls[0] += 1
        if _calls[0] == int(os.environ["CBPO_TEST_DIE_BEFORE_RECORD"]):
            os._exit(137)
        return _record(self, *args, **kwargs)

    Registry.record_success = _die_before_the_nth

if os.environ.get("CBPO_TEST_HOLD_DIR"):
    import importlib.abc
    import importlib.util
    import sys
    import time
    from pathlib import Path

    def _hold_runs_after_the_first(module) -> None:
        personalize = module.personalize_users
        calls = [0]

        def held(context, user_ids, config):
            calls[0] += 1
            if calls[0] > 1:
                folder = Path(os.environ["CBPO_TEST_HOLD_DIR"])
                (folder / f"held-{os.getpid()}").touch()
                deadline = time.monotonic() + HOLD_TIMEOUT_S
                while not (folder / "release").exists():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no {folder / 'release'} within {HOLD_TIMEOUT_S} s")
                    time.sleep(0.05)
            return personalize(context, user_ids, config)

        module.personalize_users = held

    class _OnImport(importlib.abc.MetaPathFinder):
        """Calls ``then(module)`` once module ``name`` is imported, in the processes that import
        it (the workers), so that no other process of the cluster loads the worker's code."""

        def __init__(self, name: str, then) -> None:
            self.name, self.then = name, then

        def find_spec(self, fullname, path, target=None):
            if fullname != self.name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            execute = spec.loader.exec_module

            def execute_then(module):
                execute(module)
                self.then(module)

            spec.loader.exec_module = execute_then
            return spec

    sys.meta_path.insert(0, _OnImport("cbpo_orch.workers.personalize", _hold_runs_after_the_first))
