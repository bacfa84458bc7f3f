"""Ingest's runner (xmodal/data/runner.py) chooses the pool from measured CPU times: tasks that
outweigh the main process's work go to the pool, light tasks behind a busy main process stay
in-process, small inputs never start a pool; results come in order either way."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from xmodal.data import runner as runner_module
from xmodal.data.readers import Batch
from xmodal.data.runner import MEASURE_TASKS, OrderedRunner
from xmodal.data.schema import make_record

PER_TASK = 256


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


@dataclass
class Work:
    index: int
    cpu_s: float

    def __call__(self) -> Batch:
        _burn(self.cpu_s)
        rec = make_record(f"s:{self.index}", "s", "D", None, None, None, None)
        return Batch(seen=PER_TASK, items=[rec])


def _work(n: int, task_s: float, main_s: float) -> Iterator[Work]:
    for i in range(n):
        _burn(main_s)  # the reader's own share: parsing in the main process
        yield Work(i, task_s)


def _run(runner: OrderedRunner, tasks: int, task_s: float, main_s: float) -> list[str]:
    return [t.column("particle_id")[0].as_py() for t, *_ in runner.run(_work(tasks, task_s, main_s))]


@pytest.mark.parametrize(
    ("task_s", "main_s", "mode"),
    [(0.012, 0.002, "pool"), (0.002, 0.006, "in-process"), (0.006, 0.006, "in-process")],
    ids=["heavy-tasks", "busy-main", "even"],
)
def test_the_choice_follows_the_measured_share(task_s: float, main_s: float, mode: str) -> None:
    runner = OrderedRunner(workers=2, max_pixels=10**6)
    try:
        runner.expect((MEASURE_TASKS + 1) * PER_TASK + runner_module.PARALLEL_MIN_PARTICLES)
        assert runner.mode == "measuring"
        # exactly the measured tasks, all in-process: the choice is made on the last one
        ids = _run(runner, MEASURE_TASKS + 1, task_s, main_s)
        assert runner.mode == mode and runner.pool is None
    finally:
        runner.close()
    assert ids == [f"s:{i}" for i in range(MEASURE_TASKS + 1)]


def test_small_or_nearly_done_inputs_and_one_worker_stay_in_process() -> None:
    runner = OrderedRunner(workers=2, max_pixels=10**6)
    runner.expect(runner_module.PARALLEL_MIN_PARTICLES - 1)
    assert runner.mode == "in-process" and runner.pool is None
    runner.expect((MEASURE_TASKS + 2) * PER_TASK)  # measured to the end but for one task: no pool
    _run(runner, MEASURE_TASKS + 1, 0.012, 0.001)
    assert runner.mode == "in-process" and runner.pool is None
    one = OrderedRunner(workers=1, max_pixels=10**6)
    one.expect(None)
    assert one.mode == "in-process"


def test_pooled_results_come_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module, "MEASURE_TASKS", 0)  # the pool from the first task
    runner = OrderedRunner(workers=2, max_pixels=10**6)
    runner.expect(None)
    try:
        ids = _run(runner, 9, 0.0, 0.0)
        assert runner.mode == "pool" and runner.pool is not None
    finally:
        runner.close()
    assert ids == [f"s:{i}" for i in range(9)]
