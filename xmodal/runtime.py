"""Connecting to Ray: an existing cluster (``--address auto``/``ray://``, or inside ``ray job submit``)
or a local cluster started in-process sized to this machine."""

from __future__ import annotations

import os
from typing import Any


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> None:
    """Idempotent. With no address and no RAY_ADDRESS, start a local cluster of the CPUs this
    process may use (``num_cpus`` to choose).

    Inside ``ray job submit`` Ray sets RAY_ADDRESS, so the same command joins the cluster unchanged.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Data prints a live progress table meant for terminals; plain lines read better in logs.
    ctx_kwargs: dict[str, Any] = {"log_to_driver": True, **kwargs}
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        if "://" not in target and target != "auto":
            # A GCS address (what `ray job submit` gives its driver): hand it to every worker too.
            # Ray's own helpers inside workers (Ray Train's placement-group cleaner, the State API)
            # otherwise auto-detect the cluster and give up where several Ray instances share a host.
            env = dict(ctx_kwargs.get("runtime_env") or {})
            env["env_vars"] = {"RAY_ADDRESS": target, **env.get("env_vars", {})}
            ctx_kwargs["runtime_env"] = env
        ray.init(address=target, **ctx_kwargs)
    else:
        # A cluster of this one machine is never preempted, so Ray Train's PreemptionWatcher (an actor
        # per run, ~3 s of CPU to start: 7 % of a tiny sweep trial here) has nothing to watch. The
        # cluster's processes inherit this environment.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray starts its workers at nice 15 so a cluster node's daemons stay responsive. On a laptop
        # that makes the training yield almost all CPU to any other busy process: with two busy loops
        # beside `make demo` on 2 cores, its first epoch had not ended after 7 min. At nice 0 the
        # job started from this shell shares the CPU fairly (`ray job submit` does the same).
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=num_cpus or _affinity_cpus(), **ctx_kwargs)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = os.environ.get("XMODAL_PROGRESS_BARS") == "1"


def _affinity_cpus() -> int | None:
    """CPUs of this process's affinity mask where it is narrower than the machine (taskset, cpusets),
    which Ray does not read; else None: Ray sizes the cluster itself and reads a container's CPU
    quota, where ``os.cpu_count()`` counts the host's (64 on a 2-CPU container of a 64-core host
    would start 32 embedding actors)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return None
    return allowed if allowed < (os.cpu_count() or allowed) else None
