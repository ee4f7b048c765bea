"""Shared test fixtures: the real data in the repo's sibling ``../shared`` and hand-made data."""

import shutil
from pathlib import Path

import pytest

from cbpo_orch.home import SAMPLE_DATA
from tests.helpers import Cli

SHARED = Path(__file__).parents[1] / ".." / "shared"
FIXTURES = Path(__file__).parent / "fixtures"

pytest_plugins = ["tests.postgres_server"]

RAY_HEAVY_MODULES = frozenset({"test_orchestrator", "test_serving", "test_serving_follow", "test_ray_cluster", "test_crash_resume", "test_load"})
"""Modules whose tests start whole local Rays and jobs: under ``-n 2 --dist loadgroup`` they run
in one process, one after another, so two Rays never share the 2 cores."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test's xdist group: ``ray`` for the Ray-heavy modules, else its own module (one
    module's tests stay in one process, as ``--dist loadfile`` keeps them, and share its
    module-scoped fixtures)."""
    for item in items:
        module = item.path.stem
        item.add_marker(pytest.mark.xdist_group("ray" if module in RAY_HEAVY_MODULES else module))


@pytest.fixture
def shared_dir() -> Path:
    """``../shared`` (real data and models); the test is skipped where it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared not present (real data/models live there)")
    return SHARED


@pytest.fixture
def fixtures_dir() -> Path:
    """Small hand-made data folders, one per official data shape."""
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny causal LM with random weights (see tests/tiny_model.py), built once."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-random-llama"))


@pytest.fixture(scope="session")
def commit_lm_dir() -> Path:
    """The real pretrained ``../shared/models/commit-lm-17m``; skipped where absent."""
    path = SHARED / "models" / "commit-lm-17m"
    if not path.is_dir():
        pytest.skip("../shared/models/commit-lm-17m not present (real data/models live there)")
    return path


@pytest.fixture(scope="session")
def sample_history():
    """The shipped real HuffPost sample: its dev split and the history index over it."""
    from cbpo_orch.data.tasks import load_task
    from cbpo_orch.home import SAMPLE_DATA
    from cbpo_orch.workers.context import build_history, history_datasets

    datasets = history_datasets(SAMPLE_DATA, "dev", load_task("lamp4"))
    return datasets[0], build_history(datasets)


@pytest.fixture(scope="session")
def dev_users() -> list[str]:
    from cbpo_orch.data.dataset import load_split
    from cbpo_orch.data.tasks import load_task

    return list(load_split(SAMPLE_DATA, "dev", load_task("lamp4")).users)


@pytest.fixture(scope="session")
def history_cache(tmp_path_factory, sample_history) -> Path:
    """A home's ``cache`` folder already holding the sample's history index."""
    from cbpo_orch.data.tasks import load_task
    from cbpo_orch.workers.context import history_datasets, history_key

    root = tmp_path_factory.mktemp("cache")
    datasets = history_datasets(SAMPLE_DATA, "dev", load_task("lamp4"))
    sample_history[1].save(root / "history" / history_key(datasets, None))
    return root


@pytest.fixture
def home(tmp_path, history_cache) -> Path:
    folder = tmp_path / "home"
    shutil.copytree(history_cache, folder / "cache")
    return folder


@pytest.fixture
def cli(home):
    runner = Cli(home)
    yield runner
    runner.cleanup()


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    """The tiny random-weight model, loaded on the CPU once per module."""
    from cbpo_orch.training.models import load_model

    return load_model(tiny_model_dir, "cpu")
