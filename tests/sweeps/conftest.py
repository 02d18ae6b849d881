"""Launcher tests: processes each in a session of its own, and one Ray cluster the session's launchers share."""

from __future__ import annotations

import pytest

from tests.sweeps.sessions import Sessions, SharedRay


@pytest.fixture(scope="session")
def shared_ray():
    """Started by the first launcher that joins it (``Sessions.launch``), ended with the test session."""
    ray = SharedRay()
    yield ray
    assert ray.end() == [], "shared Ray processes left running"


@pytest.fixture
def sessions(shared_ray: SharedRay):
    s = Sessions(shared_ray)
    yield s
    assert s.end_all() == [], "processes left running"
