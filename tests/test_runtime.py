"""``init_ray``: which cluster it starts or joins, and the environment a local cluster inherits
(``ray.init`` itself is recorded, not run: starting clusters is what the Ray tests do)."""

from __future__ import annotations

import os

import pytest

from xmodal.runtime import init_ray

WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


@pytest.fixture
def recorded_init(monkeypatch):
    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append({**kw, "env": dict(os.environ)}))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(WATCHER, raising=False)
    return calls


def test_local_cluster_starts_without_preemption_watcher(recorded_init):
    init_ray(num_cpus=3)
    (call,) = recorded_init
    assert call["num_cpus"] == 3 and "address" not in call
    # set before ray.init, so the cluster's processes (Ray Train's controller) inherit it
    assert call["env"][WATCHER] == "0"


def test_joining_a_cluster_leaves_its_settings_alone(recorded_init, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    init_ray()
    (call,) = recorded_init
    assert call["address"] == "10.0.0.5:6379"
    assert call["runtime_env"]["env_vars"] == {"RAY_ADDRESS": "10.0.0.5:6379"}
    assert WATCHER not in call["env"]


def test_a_users_own_setting_wins(recorded_init, monkeypatch):
    monkeypatch.setenv(WATCHER, "1")
    init_ray()
    assert recorded_init[0]["env"][WATCHER] == "1"
