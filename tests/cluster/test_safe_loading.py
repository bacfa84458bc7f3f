"""What SECURITY.md promises about files from outside: a checkpoint or config carrying a pickle /
YAML payload is refused before the payload runs. Each payload is first shown to be live (an
unsafe loader does run it), so the refusal is what the test measures."""

from __future__ import annotations

import pytest
import torch
import yaml

from xmodal.config import ConfigError, load_config
from xmodal.data.quarantine import DataError
from xmodal.train.checkpoint import CKPT_FILE, load_checkpoint, resolve_checkpoint


class Payload:
    """Unpickling this opens (creates) ``marker``: code execution, harmlessly."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def poisoned_checkpoint(tmp_path):
    marker = tmp_path / "payload-ran"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    state = {"format": "xmodal-checkpoint-1", "config": {}, "model": {}, "extra": Payload(str(marker))}
    torch.save(state, ckpt / CKPT_FILE)
    return ckpt, marker


def test_the_checkpoint_payload_is_live(poisoned_checkpoint):
    ckpt, marker = poisoned_checkpoint
    torch.load(ckpt / CKPT_FILE, weights_only=False)  # what an unsafe loader would do
    assert marker.exists()


def test_load_checkpoint_refuses_pickled_code(poisoned_checkpoint):
    ckpt, marker = poisoned_checkpoint
    with pytest.raises(DataError, match="could run code"):
        load_checkpoint(resolve_checkpoint(ckpt))
    assert not marker.exists(), "the payload ran"


def test_config_yaml_cannot_construct_objects(tmp_path):
    marker = tmp_path / "payload-ran"
    doc = f"train: !!python/object/apply:builtins.open [{str(marker)!r}, w]\n"
    (tmp_path / "evil.yaml").write_text(doc)
    yaml.unsafe_load(doc)  # live with an unsafe loader
    assert marker.exists()
    marker.unlink()
    with pytest.raises((ConfigError, yaml.YAMLError)):
        load_config(tmp_path / "evil.yaml")
    assert not marker.exists(), "the payload ran"
