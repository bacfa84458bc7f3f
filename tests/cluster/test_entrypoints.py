"""``xmodal ...`` and ``python -m xmodal ...`` answer ``--help`` without importing the heavy stack
(torch, Ray, pyarrow...): the CLI imports those inside each command. Checked by what the
interpreter imported, not by timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "numpy", "pyarrow", "pandas", "timm", "faiss", "optuna", "matplotlib", "PIL")


def imported_by(args: list[str]) -> tuple[str, set[str]]:
    """Run ``args`` with ``python -X importtime``; (stdout, top-level packages it imported)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {
        line.split("|")[-1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return proc.stdout, names


def test_python_m_xmodal_help_imports_nothing_heavy():
    out, names = imported_by(["-m", "xmodal", "--help"])
    assert "pretrain" in out and "benchmark" in out
    assert "xmodal" in names, "the check must see the package's own imports"
    assert not names & set(HEAVY), sorted(names & set(HEAVY))


def test_every_subcommand_help_imports_nothing_heavy():
    code = (
        "import json, sys\n"
        "from xmodal.cli import build_parser\n"
        "p = build_parser()\n"
        "cmds = sorted(p._subparsers._group_actions[0].choices)\n"
        "for c in cmds:\n"
        "    try:\n"
        "        p.parse_args([c, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(json.dumps({'cmds': cmds, 'modules': sorted(sys.modules)}), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert {"pretrain", "embed", "benchmark"} <= set(report["cmds"])
    loaded = {m.split(".")[0] for m in report["modules"]}
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_console_script_answers_help():
    script = Path(sys.executable).with_name("xmodal")
    if not script.exists():
        pytest.skip(f"no console script at {script}: install the package (`make install`) to get `xmodal`")
    proc = subprocess.run([str(script), "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: xmodal" in proc.stdout, proc.stderr[-2000:]
