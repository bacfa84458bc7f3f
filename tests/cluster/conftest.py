"""A private Ray head node for the job-submission tests: ``ray start --head`` on 127.0.0.1 with free
ports and its own short temp dir, driven with the ``ray job`` CLI as a user would, and stopped by
killing exactly its own process tree (``ray stop`` would stop every Ray process of this user,
including other test sessions' clusters on the same machine)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def processes_mentioning(text: str) -> list[int]:
    """Processes whose command line names ``text`` (our temp dir): catches any that were reparented."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text in (d / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(d.name))
            except OSError:
                continue
    return found


@dataclass
class LocalHead:
    dashboard: str  # http://127.0.0.1:PORT: the job server
    temp_dir: Path
    proc: subprocess.Popen
    env: dict[str, str]
    faults: SimpleNamespace  # the root conftest's fault-injection helpers

    def ray(self, *args: str, timeout: float = 120) -> str:
        cmd = [str(BIN / "ray"), *args]
        p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p.stdout + p.stderr

    def submit(self, submission_id: str, *entrypoint: str, timeout: float = 90) -> str:
        """``ray job submit --working-dir <repo> --runtime-env cluster/runtime_env.yaml --no-wait``.

        Retried while the job server is not ready ("No available agent": the head's agent registers
        some seconds after the dashboard opens) or drops the connection (seen on an overloaded
        machine); a retry that finds the submission already there counts as submitted."""
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard, "--working-dir", str(REPO)]
        cmd += ["--runtime-env", str(REPO / "cluster" / "runtime_env.yaml")]
        cmd += ["--submission-id", submission_id, "--no-wait", "--", *entrypoint]
        t0, tries = time.monotonic(), 0
        while True:
            p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=120)
            tries += 1
            if p.returncode == 0 or (tries > 1 and "already exists" in p.stderr):
                return submission_id
            transient = any(m in p.stderr for m in ("No available agent", "ConnectionError"))
            retry = transient and time.monotonic() - t0 < timeout
            assert retry, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
            time.sleep(2)

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard)

    def status(self, job: str) -> str:
        return str(self.client().get_job_status(job).value)

    def logs(self, job: str) -> str:
        return self.ray("job", "logs", "--address", self.dashboard, job)

    def wait(self, job: str, timeout: float = 900) -> str:
        """Block until ``job`` ends; its terminal status."""
        t0 = time.monotonic()
        while (status := self.status(job)) not in TERMINAL:
            assert time.monotonic() - t0 < timeout, f"job {job} still {status} after {timeout}s"
            time.sleep(1)
        return status

    def wait_succeeded(self, job: str, timeout: float = 900) -> str:
        status = self.wait(job, timeout)
        logs = self.logs(job)
        assert status == "SUCCEEDED", f"job {job} ended {status}:\n{logs[-6000:]}"
        return logs

    def wait_for_checkpoint(self, job: str, run_dir: Path, timeout: float = 900) -> None:
        """Until Ray Train has registered a checkpoint of the run in ``run_dir`` (see the root
        conftest's ``registered_epoch``); fails early if the job ends first. The timeouts here only
        guard against hangs: on a 2-core machine shared with other Ray test sessions (load average
        15-50) the first checkpoint took up to 5 minutes."""
        t0 = time.monotonic()
        while self.faults.registered_epoch(run_dir) < 1:
            status = self.status(job)
            assert status not in TERMINAL, (
                f"job {job} {status} before a checkpoint:\n{self.logs(job)[-5000:]}"
            )
            assert time.monotonic() - t0 < timeout, (
                f"no checkpoint under {run_dir} after {timeout}s; job log:\n{self.logs(job)[-3000:]}"
            )
            time.sleep(0.5)

    def kill_train_worker(self) -> int:
        """SIGKILL one live Ray Train worker of this head; its pid."""
        workers = self.faults.train_workers(self.proc.pid)
        assert workers, "no live RayTrainWorker process on the test cluster"
        os.kill(workers[-1], signal.SIGKILL)
        return workers[-1]

    def shutdown(self) -> None:
        """SIGKILL this head's processes only (SIGTERM makes Ray drain for 30 s first)."""
        pids = set(self.faults.tree(self.proc.pid)) | set(processes_mentioning(str(self.temp_dir)))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)  # killed processes release their files before the folder goes
        if os.environ.get("XMODAL_KEEP_RAY_LOGS"):  # debugging a failed run: keep session logs
            print(f"[head] logs kept in {self.temp_dir}")
        else:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(
    faults: SimpleNamespace, num_cpus: int = 2, attempts: int = 3, timeout: float = 150
) -> LocalHead:
    """Start a head node, retried: on a loaded machine Ray's own 30-s start-up wait
    for its agents can run out."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join the session cluster
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in entrypoints is this venv's
        RAY_AUTH_MODE="disabled",  # local test cluster only: see cluster/README.md for token auth
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="90",
        PYTHONUNBUFFERED="1",
    )
    errors = []
    for _ in range(attempts):
        temp_dir = Path(tempfile.mkdtemp(prefix="xc", dir="/tmp"))  # socket paths must stay short
        ports = free_ports(len(PORT_FLAGS))
        flags = [str(a) for pair in zip(PORT_FLAGS, ports) for a in pair]
        log = open(temp_dir / "head.log", "w")
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
            + ["--dashboard-host", "127.0.0.1", "--num-cpus", str(num_cpus), "--temp-dir", str(temp_dir)]
            + ["--disable-usage-stats", *flags],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        head = LocalHead(f"http://127.0.0.1:{ports[1]}", temp_dir, proc, env, faults)
        t0 = time.monotonic()
        # Ready = `ray start` reported success (the dashboard answers earlier, while the start can
        # still time out and tear everything down) and the job server answers.
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if "Ray runtime started" in (temp_dir / "head.log").read_text():
                try:
                    head.client()
                    print(f"[head] {head.dashboard} up in {time.monotonic() - t0:.0f}s (temp dir {temp_dir})")
                    return head
                except (ConnectionError, RuntimeError):
                    pass
            time.sleep(1)
        errors.append((temp_dir / "head.log").read_text()[-3000:])
        head.shutdown()
    pytest.fail(f"ray start --head failed {attempts} times:\n" + "\n---\n".join(errors))


@pytest.fixture(scope="package")
def head(faults):
    """One head for all job tests of this folder (each start costs 10-40 s), stopped after them so
    its idle processes do not take CPU from later tests."""
    h = start_head(faults)
    yield h
    h.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Parquet LAB (160 labelled) and UTO (256 unlabelled) particles, 24-px crops."""
    from xmodal.data.synth import synthesize

    out = tmp_path_factory.mktemp("data")
    synthesize(out, n_lab=160, n_sea=0, n_uto=256, seed=0, fmt="parquet", image_size=24)
    return out
