"""``train.noise_sigma``: Gaussian noise augmentation of training crops (so that models can be
certified by randomized smoothing): the crops the model sees carry seeded per-crop noise of that
size, clamped to the intensity bounds; 0 leaves them untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from volattack.config import from_dict
from volattack.training.config import TrainConfig
from volattack.training.step import STEP_SEED_STRIDE, crop_sample_ids, noise_crops, train_epoch
from volattack.yaml_config import ConfigError


class Spy(nn.Module):
    """Records every input it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.conv(x)


def loader(value: float = 0.5, steps: int = 2, b: int = 3) -> list[dict]:
    return [{"image": torch.full((b, 1, 6, 6, 6), value), "label": torch.zeros(b, 1, 6, 6, 6, dtype=torch.long)}
            for _ in range(steps)]


def seen(value: float = 0.5, **kw) -> list[torch.Tensor]:
    model = Spy()
    train_epoch(model, loader(value), torch.optim.SGD(model.parameters(), lr=0.0), _ce,
                device=torch.device("cpu"), **kw)
    return model.seen


def _ce(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, label[:, 0])


def test_the_model_sees_noisy_crops_of_the_configured_size():
    crops = seen(noise_sigma=0.1, bounds=(0.0, 1.0), seed=3)
    assert len(crops) == 2
    noise = torch.cat(crops) - 0.5
    assert noise.std().item() == pytest.approx(0.1, rel=0.1) and abs(noise.mean().item()) < 0.01
    # every crop has its own draw, and step it's crops are seeded from seed * STRIDE + it and their ids
    assert not torch.equal(crops[0][0], crops[0][1]) and not torch.equal(crops[0], crops[1])
    for it, x in enumerate(crops):
        ids = crop_sample_ids(3 * it, 3)
        want = noise_crops(torch.full((3, 1, 6, 6, 6), 0.5), 0.1, 3 * STEP_SEED_STRIDE + it, ids, (0.0, 1.0))
        assert torch.equal(x, want)


def test_noise_is_seeded_and_zero_sigma_trains_on_the_crops_themselves():
    a, b = seen(noise_sigma=0.1, seed=3), seen(noise_sigma=0.1, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(seen(noise_sigma=0.1, seed=4)[0], a[0])
    assert all(torch.equal(x, torch.full_like(x, 0.5)) for x in seen(noise_sigma=0.0, seed=3))


def test_noisy_crops_are_clamped_to_the_bounds_and_independent_of_their_batch():
    x = noise_crops(torch.zeros(2, 1, 5, 5, 5), 0.2, 7, [4, 9], (0.0, 1.0))
    assert float(x.min()) == 0.0 and float(x.max()) > 0
    assert float(noise_crops(torch.zeros(2, 1, 5, 5, 5), 0.2, 7, [4, 9]).min()) < 0  # no bounds: no clamp
    alone = noise_crops(torch.zeros(1, 1, 5, 5, 5), 0.2, 7, [9], (0.0, 1.0))
    assert torch.equal(alone[0], x[1])  # a crop's noise depends on the step seed and its id only
    with pytest.raises(ValueError, match=r"sample_ids must have one id per crop \(2\), got 1"):
        noise_crops(torch.zeros(2, 1, 5, 5, 5), 0.2, 7, [4])


def test_noise_sigma_is_validated():
    assert TrainConfig(noise_sigma=0.25).noise_sigma == 0.25 and TrainConfig().noise_sigma == 0.0
    with pytest.raises(ValueError, match=r"train.noise_sigma must be a finite number >= 0 \(input units\), got -0.1"):
        TrainConfig(noise_sigma=-0.1)
    with pytest.raises(ConfigError, match=r"train.noise_sigma must be a finite number >= 0 .*got inf"):
        from_dict(TrainConfig, {"noise_sigma": float("inf")})
    with pytest.raises(ValueError, match=r"noise_sigma must be a finite number >= 0, got -1"):
        seen(noise_sigma=-1)
