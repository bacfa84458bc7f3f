"""``init_ray``: which cluster it starts or joins, and the environment a local cluster inherits
(``ray.init`` itself is recorded, not run: starting clusters is what the Ray tests do)."""

from __future__ import annotations

import os

import pytest

from xmodal.runtime import init_ray

WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
NICENESS = "RAY_worker_niceness"


@pytest.fixture
def recorded_init(monkeypatch):
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append({**kw, "env": dict(os.environ)}))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(WATCHER, raising=False)
    monkeypatch.delenv(NICENESS, raising=False)
    return calls


def test_local_cluster_starts_without_preemption_watcher(recorded_init):
    init_ray(num_cpus=3)
    (call,) = recorded_init
    assert call["num_cpus"] == 3 and "address" not in call
    # set before ray.init, so the cluster's processes (Ray Train's controller) inherit it
    assert call["env"][WATCHER] == "0"
    assert call["env"][NICENESS] == "0"  # workers share the CPU with the user's other processes


def test_joining_a_cluster_leaves_its_settings_alone(recorded_init, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    init_ray()
    (call,) = recorded_init
    assert call["address"] == "10.0.0.5:6379"
    assert call["runtime_env"]["env_vars"] == {"RAY_ADDRESS": "10.0.0.5:6379"}
    assert WATCHER not in call["env"] and NICENESS not in call["env"]


def test_a_users_own_setting_wins(recorded_init, monkeypatch):
    monkeypatch.setenv(WATCHER, "1")
    monkeypatch.setenv(NICENESS, "10")
    init_ray()
    assert recorded_init[0]["env"][WATCHER] == "1" and recorded_init[0]["env"][NICENESS] == "10"


def test_a_local_clusters_workers_run_at_normal_priority():
    """Ray itself reads the setting: a task of a cluster started by init_ray runs at nice 0
    (Ray's default is 15). A fresh interpreter, as the session's cluster is already running."""
    import shutil
    import subprocess
    import sys
    import tempfile

    tmp = tempfile.mkdtemp(prefix="xr", dir="/tmp")  # Ray's socket paths must stay under 107 characters
    code = (
        "import os, ray\n"
        "from xmodal.runtime import init_ray\n"
        f"init_ray(num_cpus=1, include_dashboard=False, _temp_dir={tmp!r})\n"
        "print('nice', ray.get(ray.remote(lambda: os.nice(0)).remote()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", NICENESS)}
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"nice {os.nice(0)}" in out.stdout.splitlines()


def test_a_local_cluster_is_sized_by_ray_or_the_affinity_mask(recorded_init, monkeypatch):
    """Ray reads a container's CPU quota; os.cpu_count() counts the host's CPUs, so it is not passed.
    An affinity mask narrower than the machine (taskset) Ray does not read: it is passed."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    init_ray()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    init_ray()
    assert [c["num_cpus"] for c in recorded_init] == [None, 2]
