"""The cluster files are correct and their commands copy-pasteable: Ray's own schema for the
launcher YAML, safe defaults (127.0.0.1, token auth) everywhere, one Ray version, the RayJob's
cluster equal to the RayCluster, and every ``python -m xmodal`` command in the cluster README (and
the RayJob) parsed by the real CLI parser with its config files and ``--set`` keys loaded."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from xmodal.cli import build_parser
from xmodal.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
IMAGE_PREFIX = "/home/ray/xmodal-src/"  # where cluster/Dockerfile puts the repository


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_pin() -> str:
    (pin,) = re.findall(r'"ray\[[^\]]*\]==([\w.]+)"', (REPO / "pyproject.toml").read_text())
    return pin


def aws_config() -> dict:
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    for placeholder, value in (
        ("__REGION__", "us-west-2"),
        ("__AMI__", "ami-0123456789abcdef0"),
        ("__EFS__", "fs-0123"),
    ):
        assert placeholder in text, f"aws-gpu.yaml lost its {placeholder} (cluster/README.md fills it in)"
        text = text.replace(placeholder, value)
    return yaml.safe_load(text)


def test_aws_launcher_config_passes_rays_own_validation():
    pytest.importorskip("jsonschema", reason="Ray's cluster-config validation needs jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(aws_config()))


def test_dashboard_bound_to_localhost_and_token_auth_everywhere():
    aws = aws_config()
    (head_start,) = [c for c in aws["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--env RAY_AUTH_MODE=token" in aws["docker"]["run_options"]
    assert "~/.ray/auth_token" in aws["file_mounts"]
    rc = load("kuberay/raycluster.yaml")["spec"]
    rj = load("kuberay/rayjob.yaml")["spec"]
    for spec in (rc, rj["rayClusterSpec"]):
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
        assert spec["authOptions"]["mode"] == "token"
    # the submitter must reach a job server that listens on localhost only
    assert rj["submissionMode"] == "SidecarMode"
    for f in sorted(CLUSTER.rglob("*")):
        if f.is_file():
            assert "0.0.0.0" not in f.read_text(), f"{f.relative_to(REPO)} binds or suggests 0.0.0.0"


def test_rayjob_runs_the_raycluster_spec():
    """The RayJob's cluster is raycluster.yaml's (the head's restartPolicy aside, which SidecarMode needs)."""
    rc = load("kuberay/raycluster.yaml")["spec"]
    rj = copy.deepcopy(load("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"])
    assert rj["headGroupSpec"]["template"]["spec"].pop("restartPolicy") == "Never"
    assert rj == rc


def test_one_ray_version_everywhere():
    pin = ray_pin()
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{pin}-" in dockerfile
    assert aws_config()["docker"]["image"].startswith(f"rayproject/ray:{pin}-")
    assert load("kuberay/raycluster.yaml")["spec"]["rayVersion"] == pin
    assert load("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"]["rayVersion"] == pin
    # dependencies come from pyproject.toml only: the image and the launcher install this repository
    assert 'pip install --no-cache-dir "/home/ray/xmodal-src[gpu,dashboard]"' in dockerfile
    assert 'pip install -q "$HOME/xmodal-src[gpu,dashboard]"' in aws_config()["setup_commands"]


def uploaded(root: Path, tmp_path: Path) -> set[str]:
    """The files ``ray job submit --working-dir ROOT --runtime-env cluster/runtime_env.yaml`` zips,
    by Ray's own packaging code (what the job's copy of the repository will hold)."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / f"{root.name}.zip"
    create_package(str(root), target, include_gitignore=True, excludes=load("runtime_env.yaml")["excludes"])
    return {n for n in zipfile.ZipFile(target).namelist() if not n.endswith("/")}


def test_runtime_env_uploads_the_source_and_no_data(tmp_path):
    env = load("runtime_env.yaml")
    assert "pip" not in env and "conda" not in env, "pins live in pyproject.toml (the image), not per job"
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray accepts every field
    # Excludes are .gitignore patterns: an unanchored "data/" also dropped the package xmodal/data/,
    # so every job imported xmodal.data from wherever else it could (or failed)
    repo_files = uploaded(REPO, tmp_path)
    source = {
        str(f.relative_to(REPO)) for d in ("xmodal", "configs", "tune_spaces") for f in (REPO / d).rglob("*")
    }
    source = {f for f in source if (REPO / f).is_file() and "__pycache__" not in f}
    assert "xmodal/data/schema.py" in source and not source - repo_files, sorted(source - repo_files)[:5]
    tree = tmp_path / "repo"  # the top-level outputs a laptop run leaves beside the source
    for rel in (
        "xmodal/data/a.py",
        "data/LAB/part-00000.parquet",
        "data/raw/x.csv",
        "runs/r/metrics.jsonl",
        "sweeps/s/optuna.db",
        "demo_out/data/UTO/y.csv",
        "build/lib/z.py",
        "emb/e.parquet",
    ):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    assert uploaded(tree, tmp_path) == {"xmodal/data/a.py"}


def shell_commands(markdown: str) -> list[str]:
    """The commands in the fenced bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)
    return [c for b in blocks for c in b.replace("\\\n", " ").splitlines() if c.strip()]


def xmodal_invocations() -> list[tuple[str, list[str]]]:
    found = []
    readme = (CLUSTER / "README.md").read_text()
    rayjob = load("kuberay/rayjob.yaml")["spec"]["entrypoint"]
    for where, cmd in [("cluster/README.md", c) for c in shell_commands(readme)] + [("rayjob.yaml", rayjob)]:
        if "python -m xmodal" not in cmd:
            continue
        words = shlex.split(cmd, comments=True)
        for i in range(len(words) - 2):
            if words[i : i + 3] == ["python", "-m", "xmodal"]:
                found.append((where, [w.replace(IMAGE_PREFIX, "") for w in words[i + 3 :]]))
    return found


def test_documented_xmodal_commands_parse_and_load(monkeypatch):
    monkeypatch.chdir(REPO)
    commands = xmodal_invocations()
    names = {args[0] for _, args in commands}
    assert {"pretrain", "embed", "benchmark", "synth", "ingest"} <= names, names
    parser = build_parser()
    for where, args in commands:
        if args[0] not in parser._subparsers._group_actions[0].choices:
            pytest.fail(f"{where}: `xmodal {args[0]}` is not a command (yet): {' '.join(args)}")
        ns = parser.parse_args(args)  # an unknown flag exits here with argparse's message
        if getattr(ns, "config", None) or getattr(ns, "set", None):
            load_config(ns.config, ns.set)  # config file exists, every --set key is real
        if getattr(ns, "space", None):
            assert Path(ns.space).is_file(), f"{where}: {ns.space} does not exist"
        if args[0] == "pretrain" or args[0] == "tune":
            paths = [
                s.split("=", 1)[1] for s in ns.set if s.split("=")[0].startswith(("data.", "train.storage"))
            ]
            assert all(p.startswith(("/", "s3://")) for p in paths), (
                f"{where}: relative path in a job: {args}"
            )


def test_readme_names_existing_files():
    readme = (CLUSTER / "README.md").read_text()
    for rel in sorted(set(re.findall(r"\b(cluster/[\w./-]+\.(?:yaml|md)|cluster/Dockerfile)\b", readme))):
        assert (REPO / rel).is_file(), rel
    table = [line for line in readme.splitlines() if line.startswith("| `")]
    listed = {name for line in table for name in re.findall(r"`([^`]+)`", line.split("|")[1])}
    assert len(listed) >= 5, table
    for rel in listed:
        assert (CLUSTER / rel).is_file(), f"the README's file table lists cluster/{rel}, which does not exist"


def test_set_takes_several_values_per_flag_and_repeats():
    ns = build_parser().parse_args(
        ["pretrain", "--set", "optim.lr=0.01", "optim.epochs=2", "--set", "train.seed=3"]
    )
    assert ns.set == ["optim.lr=0.01", "optim.epochs=2", "train.seed=3"]
    cfg = load_config(None, ns.set)
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.train.seed) == (0.01, 2, 3)
