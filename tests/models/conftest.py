"""Shared fixtures: a synthetic model batch in the layout of docs/INTERFACES.md."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from xmodal.data.schema import N_CHANNELS


def _make_batch(b: int, image_size: int = 32, length: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(b, 1, image_size, image_size, generator=g) * 2 - 1,
        "image_meta": torch.rand(b, 2, generator=g),
        "profile": torch.rand(b, N_CHANNELS, length, generator=g) * 2 - 1,
        "profile_mask": torch.ones(b, length, dtype=torch.bool),
        "profile_meta": torch.rand(b, 1, generator=g),
        "has_image": torch.ones(b, dtype=torch.bool),
        "has_profile": torch.ones(b, dtype=torch.bool),
    }


@pytest.fixture
def make_batch() -> Callable[..., dict[str, torch.Tensor]]:
    return _make_batch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Two cores are shared by several engineers' test runs; restored for other test folders.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
