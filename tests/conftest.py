"""Shared fixtures: one local Ray cluster per test session (2 CPUs), and the real-data folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
# Local test clusters only: token auth off so subprocess drivers (the CLI) can join the session cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parents[1]


def realdata_dir() -> Path:
    return Path(os.environ.get("XMODAL_REALDATA", REPO.parent / "shared" / "realdata"))


@pytest.fixture(scope="session")
def realdata() -> Path:
    d = realdata_dir()
    if not d.is_dir():
        pytest.skip(f"real instrument data not found at {d} (set XMODAL_REALDATA)")
    return d


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster shared by every test that needs one (start-up costs ~10 s)."""
    import ray

    # Unix socket paths must stay under 107 characters: keep the temp dir short.
    tmp = tempfile.mkdtemp(prefix="xr", dir="/tmp")
    ctx = ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=True, log_to_driver=True)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    # subprocess drivers (e.g. the `xmodal` CLI under test) join this cluster through RAY_ADDRESS
    os.environ["RAY_ADDRESS"] = ctx.address_info["gcs_address"]
    yield ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()
