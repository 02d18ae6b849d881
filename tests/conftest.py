"""Shared test setup: offline, deterministic, tiny models; checkpoints are made here with `transformers`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the hub; the download path is tested against a fake
REPO_ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):  # make test and test-fast: one process per core, so one thread each
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that launches sweeps through the ``sessions`` fixture (a launcher subprocess, which starts Ray) is a Ray
    test by construction; the guard below catches those that start Ray in this process."""
    for item in items:
        if "sessions" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _ray_only_where_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that starts Ray in this process must say so (``@pytest.mark.ray``), so ``make test-fast`` (``-m 'not
    ray'``) never waits for one: an unmarked test's ``ray.init`` fails at once, naming the marker."""
    if request.node.get_closest_marker("ray") is not None:
        return
    import sweeps.cluster  # noqa: F401  (Ray's environment defaults, set before Ray is imported)

    try:
        import ray
    except ImportError:  # a machine without Ray (a bare GPU box) runs the rest
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{request.node.nodeid} starts Ray: mark it @pytest.mark.ray")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="session", autouse=True)
def _token_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One token cache for the whole session (as a sweep has), never the user's own."""
    os.environ["FINETUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture
def real_data(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point FINETUNE_DATA_DIR at the real data for code that reads it from the environment."""
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(data_dir))
    return data_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data directory: $FINETUNE_DATA_DIR, else ../shared/data beside the checkout.

    Outside CI a machine without it skips the tests that read real data; in CI its absence is a failure.
    """
    value = os.environ.get("FINETUNE_DATA_DIR")
    path = Path(value) if value else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"data directory {path} missing in CI (set FINETUNE_DATA_DIR)")
        pytest.skip(f"no data directory at {path}; set FINETUNE_DATA_DIR to run tests on real data")
    return path


@pytest.fixture(scope="session")
def enc(data_dir: Path):
    """GPT-2's tokenizer built offline from the real data directory."""
    from model import get_tokenizer

    return get_tokenizer(data_dir)


@pytest.fixture(scope="session")
def shared_ray():
    """The session's Ray cluster for launcher tests (``tests/sweeps/sessions.py``): started by the first launcher that
    joins it (``Sessions.launch``), ended with the test session."""
    from tests.sweeps.sessions import SharedRay

    ray = SharedRay()
    yield ray
    assert ray.end() == [], "shared Ray processes left running"


@pytest.fixture
def sessions(shared_ray):
    """Processes a test starts, each in a session of its own, ended with the test (``tests/sweeps/sessions.py``)."""
    from tests.sweeps.sessions import Sessions

    s = Sessions(shared_ray)
    yield s
    assert s.end_all() == [], "processes left running"
