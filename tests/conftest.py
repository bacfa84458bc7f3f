"""Shared fixtures: one local Ray cluster per test session (2 CPUs), the real-data folder,
process lookups for the fault-injection tests, and a gloo process group of several processes."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
# Ray Train's controller polls its workers every 2 s, so each run's start and end wait up to a tick;
# tests run ~15 tiny runs. A missed poll is only an error after 10 min of them.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train starts a PreemptionWatcher actor per worker group (~3 s of CPU to boot a process); the
# test clusters run on one machine that is never preempted, and the suite starts ~16 worker groups.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
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


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc (Ray's raylet moves workers into their own
    process groups, so a process-group lookup would miss them)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def train_workers(root: int) -> list[int]:
    """Live Ray Train worker processes under ``root``, by the process title Ray gives an actor
    (``ray::RayTrainWorker...``): instant, unlike the state API, which needs the dashboard and
    takes seconds, long enough for a tiny run to finish the epoch a test meant to interrupt."""
    found = []
    for pid in process_tree(root):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                found.append(pid)
        except OSError:
            continue
    return found


def registered_epoch(run_dir: Path) -> int:
    """The epoch of the newest checkpoint Ray Train has registered for a run: what a restarted
    worker group or a re-run driver resumes from. A checkpoint folder exists a moment before the
    controller registers it; a failure injected in between loses that checkpoint, as Ray documents,
    so fault tests wait for this instead of for the folder."""
    try:
        snapshot = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("epoch", 0))


def epoch_records(run_dir: Path) -> list[int]:
    """The epochs a run's ``metrics.jsonl`` recorded, in order (a repeat = a retrained epoch)."""
    f = Path(run_dir) / "metrics.jsonl"
    lines = f.read_text().splitlines() if f.exists() else []
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "epoch"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def spawn_gloo() -> Callable[..., None]:
    """``spawn_gloo(fn, world, *args)`` runs ``fn(rank, world, *args)`` (a module-level function) in
    ``world`` new processes joined in one gloo process group on localhost, and waits for them."""
    import torch.multiprocessing as mp

    def run(fn: Callable[..., None], world: int, *args: Any) -> None:
        mp.spawn(_gloo_rank, args=(world, _free_port(), fn, args), nprocs=world, join=True)

    return run


@pytest.fixture(scope="session")
def faults() -> SimpleNamespace:
    """Helpers for the failure-injection tests."""
    return SimpleNamespace(
        tree=process_tree,
        train_workers=train_workers,
        registered_epoch=registered_epoch,
        epoch_records=epoch_records,
    )


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster shared by every test that needs one (start-up costs ~10 s), retried:
    on a loaded machine Ray's own start-up wait for its processes can run out. The dashboard stays:
    Ray Train's placement-group cleaner asks the state API (served by it) whether a run's
    controller is still alive, e.g. after a test killed that run's driver."""
    import ray

    for attempt in range(3):
        # Unix socket paths must stay under 107 characters: keep the temp dir short.
        tmp = tempfile.mkdtemp(prefix="xr", dir="/tmp")
        try:
            ctx = ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=True, log_to_driver=True)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(5)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    # subprocess drivers (e.g. the `xmodal` CLI under test) join this cluster through RAY_ADDRESS
    os.environ["RAY_ADDRESS"] = ctx.address_info["gcs_address"]
    yield ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()


@pytest.fixture
def faiss_one_thread():
    """FAISS single-threaded for one test (the evaluation and index tests were written and checked
    that way); its OpenMP threads would otherwise compete with the session's Ray cluster for the
    two cores."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
