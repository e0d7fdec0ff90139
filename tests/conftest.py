"""Shared fixtures: tiny models and volumes (CPU only, 16^3)."""

from __future__ import annotations

import locale

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _restore_locale():
    """Tests that write DICOM fixtures with SimpleITK directly leave GDCM's ``LC_ALL=C`` behind,
    which would make every later ``read_text()`` decode as ASCII. volattack's own DICOM entry
    points restore the locale themselves (tests/data/test_dicom.py checks that)."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    if locale.setlocale(locale.LC_ALL) != saved:
        locale.setlocale(locale.LC_ALL, saved)


class TinySeg(nn.Module):
    """A small 3D segmenter with BatchNorm and Dropout (so eval/train mode matters), K classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(in_channels, width, 3, padding=1),
            nn.BatchNorm3d(width),
            nn.ReLU(),
            nn.Dropout3d(0.1),
            nn.Conv3d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(width, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    m = TinySeg()
    m.train()  # the attack must put it in eval mode and restore train mode
    return m


@pytest.fixture
def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 16, 16, 16, generator=g)
    y = torch.randint(0, 3, (2, 1, 16, 16, 16), generator=g)
    return x, y
