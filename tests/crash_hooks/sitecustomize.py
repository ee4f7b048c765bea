"""Fault injection for tests/test_crash_resume.py, loaded by every Python process whose
PYTHONPATH holds this folder (the spawned driver process included).

With ``CBPO_TEST_DIE_BEFORE_RECORD=N`` the process dies (``os._exit``, as abruptly as a
SIGKILL) when it is about to record its N-th run: the adapter folder is written, the
registry does not know it yet.
"""

import os

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
