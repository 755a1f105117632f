import os
from contextlib import contextmanager
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scrna"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets beside the checkout; tests using them skip when it is absent."""
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is absent (real datasets are not part of the repo)")
    return SHARED_DATA


@contextmanager
def _mlflow_uris_restored():
    import mlflow.tracking._model_registry.utils as registry
    import mlflow.tracking._tracking_service.utils as tracking

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    uris = (tracking._tracking_uri, registry._registry_uri)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        tracking._tracking_uri, registry._registry_uri = uris


# MLflow's set_tracking_uri/set_registry_uri set process-wide state and environment variables
# (which every subprocess a later test starts inherits): each module and each test gets the
# MLflow URIs it began with.
@pytest.fixture(autouse=True, scope="module")
def _own_mlflow_uris_per_module():
    with _mlflow_uris_restored():
        yield


@pytest.fixture(autouse=True)
def _own_mlflow_uris():
    with _mlflow_uris_restored():
        yield


@pytest.fixture(autouse=True)
def _quiet_ray(monkeypatch):
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
