import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scrna"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets beside the checkout; tests using them skip when it is absent."""
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is absent (real datasets are not part of the repo)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _quiet_ray(monkeypatch):
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
