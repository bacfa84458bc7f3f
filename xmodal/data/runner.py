"""Ingest's task runner: a reader's work items run in-process or in a process pool, results in order.

A reader yields ``Batch`` items (done in the main process) and ``Task`` callables (per-particle
checks, image decoding, records: movable to worker processes). The main process always keeps its
share: producing the tasks (e.g. reading annotations, parsing CytoClus pulses) and writing Parquet.
A pool only pays where the tasks outweigh that share: on 2 cores the two workers otherwise take CPU
from the main process, which is then the bottleneck, and every task's data crosses a pipe twice.
Measured with ``bench/bench_ingest.py`` on the 2-core VM: a SYKE layout (tasks decode and check an
image per particle, ~3x the main process's time) runs 1.25x faster in the pool; the real CytoClus
export (most particles without a crop, tasks ~0.5x the main process's time) 0.8x as fast.

So the first ``MEASURE_TASKS`` tasks run in-process, their CPU time counted apart from the rest of
the main process's (the first task, with imports and the reader's set-up, is not counted); the
pool starts only where the tasks took at least ``POOL_MIN_TASK_RATIO`` times the main process's
CPU and at least ``PARALLEL_MIN_PARTICLES`` particles are left. Measured on the SYKE layout at
6,000 particles the pool lost to in-process (1.6-2.0 s against 1.4-1.7 s) and at 30,000 it won
(1.4x). Results come back in submission
order in both modes, so output does not depend on the choice.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import pyarrow as pa

from xmodal.data.quarantine import QuarantineEntry
from xmodal.data.readers import Batch, Task
from xmodal.data.readers.validate import set_pil_pixel_limit
from xmodal.data.schema import records_to_table

# A pool costs 0.3-2 s to start and its workers' first tasks pay for their imports: it is not worth
# it for fewer particles than this left (at ~4,000-5,000 particles/s in-process, 2-2.5 s of work)
PARALLEL_MIN_PARTICLES = 10_000
MEASURE_TASKS = 12  # timed in-process before choosing; spans a CytoClus pulse block (~9 tasks each)
POOL_MIN_TASK_RATIO = 2.0  # tasks' CPU time / the main process's, from which the pool is used

Result = tuple[
    pa.Table | None, list[QuarantineEntry], int, dict[str, Any], list[str]
]  # records, entries, seen, channels, notes


def _run_task(task: Task) -> Result:
    """Runs in a worker: the reader's task, then records -> one Arrow table (cheap to send back)."""
    return _split(task())


def _split(batch: Batch) -> Result:
    records = [x for x in batch.items if not isinstance(x, QuarantineEntry)]
    entries = [x for x in batch.items if isinstance(x, QuarantineEntry)]
    table = records_to_table(records) if records else None
    return table, entries, batch.seen, batch.channels, batch.notes


def _done(value: Any) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class OrderedRunner:
    """Runs work in-process, then (where it pays, see the module docstring) in a process pool;
    yields results in order. ``mode``: "measuring", then "pool" or "in-process"."""

    def __init__(self, workers: int, max_pixels: int):
        self.workers = workers
        self.max_pixels = max_pixels
        self.pool: ProcessPoolExecutor | None = None
        self.use_pool: bool | None = None if workers > 1 else False  # None: not decided yet
        self.expected: int | None = None
        self.tasks = self.particles = 0
        self.task_cpu = 0.0  # CPU seconds of the timed in-process tasks
        self.cpu_start: float | None = None  # process CPU time when timing began

    @property
    def mode(self) -> str:
        return {None: "measuring", True: "pool", False: "in-process"}[self.use_pool]

    def expect(self, particles: int | None) -> None:
        """A new domain: the size of its work (None: unknown). Small inputs stay in-process; the
        others are measured afresh (a pool started for an earlier domain stays up meanwhile)."""
        self.expected = particles
        self.tasks = self.particles = 0
        self.task_cpu, self.cpu_start = 0.0, None
        small = particles is not None and particles < PARALLEL_MIN_PARTICLES
        self.use_pool = False if self.workers <= 1 or small else None

    def _measure(self, task_cpu: float, seen: int) -> None:
        self.tasks += 1
        self.particles += seen
        if self.tasks == 1:  # the first task and what came before it pay for imports, caches, headers
            self.cpu_start = time.process_time()
            return
        self.task_cpu += task_cpu
        if self.tasks > MEASURE_TASKS:
            main_cpu = time.process_time() - self.cpu_start - self.task_cpu
            left = None if self.expected is None else self.expected - self.particles
            self.use_pool = self.task_cpu >= POOL_MIN_TASK_RATIO * main_cpu and (
                left is None or left >= PARALLEL_MIN_PARTICLES
            )

    def _submit(self, work: Batch | Task) -> Future:
        if isinstance(work, Batch):
            return _done(_split(work))
        if self.use_pool is None and MEASURE_TASKS <= 0:
            self.use_pool = True
        if not self.use_pool:
            t0 = time.process_time()
            result = _run_task(work)
            if self.use_pool is None:
                self._measure(time.process_time() - t0, result[2])
            return _done(result)
        self._start_pool()
        return self.pool.submit(_run_task, work)

    def _start_pool(self) -> None:
        if self.pool is not None:
            return
        # forkserver, not fork: forking a parent whose pyarrow threads may hold locks can deadlock
        # the child. Preloading the readers in the server halves the workers' start-up.
        ctx = get_context("forkserver")
        ctx.set_forkserver_preload(["xmodal.data.readers"])
        self.pool = ProcessPoolExecutor(
            self.workers,
            mp_context=ctx,
            initializer=set_pil_pixel_limit,
            initargs=(self.max_pixels,),
        )

    def run(self, work: Iterator[Batch | Task]) -> Iterator[Result]:
        pending: deque[Future] = deque()
        for w in work:
            pending.append(self._submit(w))
            while pending and (len(pending) > 2 * self.workers or pending[0].done()):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None
