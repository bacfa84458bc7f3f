"""Profile encoders: a particle's features do not depend on how far its batch is padded."""

from __future__ import annotations

import pytest
import torch

from xmodal.data.schema import N_CHANNELS
from xmodal.models import PROFILE_ENCODERS

SMALL = {
    "cnn": {"base_channels": 8, "blocks": [1, 2, 1]},
    "lstm": {"hidden": 8, "layers": 2},
    "transformer": {"width": 16, "depth": 2, "heads": 2, "max_length": 64},
}
LENGTHS = [5, 23, 40]


def _particles(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(N_CHANNELS, n, generator=g) * 2 - 1 for n in LENGTHS]


def _padded(particles: list[torch.Tensor], length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch padded to ``length`` with random garbage (not zeros) so that only the mask can hide it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(len(particles), N_CHANNELS, length, generator=g) * 10
    mask = torch.zeros(len(particles), length, dtype=torch.bool)
    for i, p in enumerate(particles):
        x[i, :, : p.shape[1]] = p
        mask[i, : p.shape[1]] = True
    return x, mask


def test_all_three_encoders_are_registered() -> None:
    assert set(PROFILE_ENCODERS.names()) >= {"cnn", "lstm", "transformer"}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_eval_output_is_invariant_to_padding(name: str) -> None:
    torch.manual_seed(0)
    enc = PROFILE_ENCODERS.build(name, in_channels=N_CHANNELS, length=48, **SMALL[name]).eval()
    particles = _particles()
    with torch.no_grad():
        tight = enc(*_padded(particles, 40, seed=1))
        loose = enc(*_padded(particles, 64, seed=2))
        alone = torch.cat([enc(*_padded([p], p.shape[1], seed=3)) for p in particles])
    assert tight.shape == (3, enc.out_dim)
    torch.testing.assert_close(loose, tight, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, tight, atol=1e-5, rtol=0)
    assert not torch.allclose(tight[0], tight[1])  # the features do depend on the particle


@pytest.mark.parametrize("name", sorted(SMALL))
def test_rows_without_any_valid_sample_stay_finite_and_gradients_flow(name: str) -> None:
    enc = PROFILE_ENCODERS.build(name, in_channels=N_CHANNELS, length=48, **SMALL[name])
    x, mask = _padded(_particles(), 48, seed=4)
    mask[1] = False  # a particle without a profile
    out = enc(x, mask)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())


def test_cnn_width_and_depth_follow_its_settings() -> None:
    enc = PROFILE_ENCODERS.build("cnn", in_channels=N_CHANNELS, length=64, base_channels=4, blocks=[1, 1, 3])
    assert enc.out_dim == 16
    assert len(enc.blocks) == 5


def test_lstm_rejects_a_mask_with_holes() -> None:
    enc = PROFILE_ENCODERS.build("lstm", in_channels=N_CHANNELS, length=8, hidden=4)
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[0, 3] = False
    with pytest.raises(ValueError, match="prefix"):
        enc(torch.zeros(1, N_CHANNELS, 8), mask)


def test_transformer_names_the_setting_when_profiles_are_too_long() -> None:
    enc = PROFILE_ENCODERS.build("transformer", in_channels=N_CHANNELS, length=8, width=8, depth=1, heads=2)
    with pytest.raises(ValueError, match="profile_length"):
        enc(torch.zeros(1, N_CHANNELS, 9), torch.ones(1, 9, dtype=torch.bool))
