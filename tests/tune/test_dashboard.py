"""``optuna-dashboard sqlite:///<sweep>/optuna.db`` serves a sweep's study on 127.0.0.1 and a real
browser (headless Chromium) renders its trials: the study is written the way a sweep writes it
(the space's define-by-run function, the sweep's storage URL)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from xmodal.tune.report import storage_url
from xmodal.tune.space import load_space

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DASHBOARD = Path(sys.executable).parent / "optuna-dashboard"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while True:
        assert proc.poll() is None, f"optuna-dashboard exited:\n{proc.stdout.read()}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.time() - t0 < timeout, f"{url} did not answer within {timeout} s"
        time.sleep(0.5)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium not installed (apt-get install chromium)")
@pytest.mark.skipif(not DASHBOARD.exists(), reason="optuna-dashboard not installed (the dev/dashboard extra)")
def test_dashboard_serves_the_sweep_study_with_its_trials(tmp_path, tiny_data, tune_helpers):
    space = load_space(tune_helpers.write_space(tmp_path / "space.yaml", tune_helpers.tiny_space(tiny_data)))
    study = tune_helpers.scored_study(space, storage_url(tmp_path), "laptop-sweep", n=4)
    port = free_port()
    server = subprocess.Popen(
        [str(DASHBOARD), storage_url(tmp_path), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/api/studies", server)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10) as r:
            studies = {s["study_name"]: s["study_id"] for s in json.loads(r.read())["study_summaries"]}
        assert list(studies) == ["laptop-sweep"]
        page = f"http://127.0.0.1:{port}/dashboard/studies/{studies['laptop-sweep']}/trials"
        dom = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                f"--user-data-dir={tmp_path / 'chromium'}",
                "--virtual-time-budget=20000",
                "--dump-dom",
                page,
            ],
            capture_output=True,
            text=True,
            timeout=180,
        ).stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
    for t in study.trials:
        assert f"Trial {t.number}" in text, f"trial {t.number} not rendered"
    assert "Complete" in text and "model.image_encoder" in text
