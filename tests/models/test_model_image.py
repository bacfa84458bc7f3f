"""Image backbones (timm pass-through, registered encoders, local pretrained weights) and heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from xmodal.config import ConfigError
from xmodal.models import IMAGE_ENCODERS
from xmodal.models.heads import ProjectionHead
from xmodal.models.image import build_backbone

TEST_ENCODER = "xmodal_test_tiny_cnn"  # test-only name; registries have no unregister


def _tiny_cnn(in_chans: int, image_size: int, width: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


if TEST_ENCODER not in IMAGE_ENCODERS:
    IMAGE_ENCODERS.register(TEST_ENCODER)(_tiny_cnn)


@pytest.mark.parametrize(("name", "width"), [("resnet10t", 512), ("vit_tiny_patch16_224", 192)])
def test_timm_names_pass_through_at_the_configured_size(name: str, width: int) -> None:
    model, out_dim = build_backbone(name, 32)
    assert out_dim == width
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, width)


def test_registered_encoders_take_their_kwargs() -> None:
    model, out_dim = build_backbone(TEST_ENCODER, 16, width=6)
    assert out_dim == 6


def test_unknown_name_and_impossible_size_are_clear_errors() -> None:
    with pytest.raises(KeyError, match="neither a timm model nor a registered"):
        build_backbone("no_such_net", 32)
    with pytest.raises(ConfigError, match="cannot take 32x32"):  # the CLI prints it as one line
        build_backbone("vit_tiny_patch16_224", 32, img_size=224)


def test_missing_pretrained_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pretrained_path"):
        build_backbone("resnet10t", 32, pretrained_path=str(tmp_path / "nope.safetensors"))


@pytest.fixture(scope="module")
def rgb_checkpoint() -> dict[str, torch.Tensor]:
    """An RGB ImageNet-style checkpoint (3 input channels, 10-class classifier)."""
    torch.manual_seed(0)
    return timm.create_model("resnet10t", in_chans=3, num_classes=10, pretrained=False).state_dict()


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_local_rgb_checkpoint_loads_into_one_channel_model(
    tmp_path: Path, rgb_checkpoint: dict[str, torch.Tensor], fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("pretrained_path must never reach the network")

    for fn in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file"):
        monkeypatch.setattr(f"timm.models._builder.{fn}", no_download)
    path = tmp_path / f"weights.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in rgb_checkpoint.items()}, str(path))
    else:
        torch.save({"state_dict": rgb_checkpoint, "epoch": 3}, path)
    model, _ = build_backbone("resnet10t", 32, pretrained_path=str(path))
    loaded = model.state_dict()
    # A grayscale pixel is R = G = B, so the RGB filters summed over channels are the 1-channel filter.
    torch.testing.assert_close(
        loaded["conv1.0.weight"], rgb_checkpoint["conv1.0.weight"].sum(dim=1, keepdim=True)
    )
    torch.testing.assert_close(loaded["layer4.0.conv2.weight"], rgb_checkpoint["layer4.0.conv2.weight"])
    assert "fc.weight" not in loaded


def test_projection_head_appends_metadata_and_normalises() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(5, 3, meta_dim=2)
    feats = torch.randn(4, 5)
    meta = torch.rand(4, 2)
    out = head(feats, meta)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))
    expected = torch.nn.functional.normalize(
        torch.cat([feats, meta], 1) @ head.proj.weight.T + head.proj.bias, dim=1
    )
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="metadata of width 2"):
        head(feats)
