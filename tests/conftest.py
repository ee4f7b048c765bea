"""Shared test fixtures: the real data in the repo's sibling ``../shared`` and hand-made data."""

from pathlib import Path

import pytest

SHARED = Path(__file__).parents[1] / ".." / "shared"
FIXTURES = Path(__file__).parent / "fixtures"


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
