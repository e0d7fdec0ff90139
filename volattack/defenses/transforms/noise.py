"""Randomised defence: additive Gaussian noise (evaluated with EOT)."""

from __future__ import annotations

from typing import Optional

import torch

from volattack.checks import check_number
from volattack.defenses.registry import register_defense
from volattack.defenses.transforms.base import InputTransform, check_images


@register_defense("noise")
class RandomNoise(InputTransform):
    """Additive Gaussian noise ``x + sigma * n``, ``n ~ N(0, I)`` (a randomised defence, cf.
    "random self-ensemble", Liu et al., ECCV 2018); evaluate it with EOT
    (:class:`~volattack.defenses.adaptive.EOTModel`).

    Draws: each call draws one noise volume of shape ``(C, *spatial)`` in float32 on the CPU
    (so it is identical on every device), moves it to the input's device/dtype and adds it to
    **every sample of the batch** (so a sample's output does not depend on its batch-mates,
    matching the attacks' batch-consistency contract). Consecutive calls advance the generator
    and give new draws.

    Seeding: the generator is the one passed per call (``forward(x, generator=g)``, used by
    EOT), else the constructor's ``generator``, else a private CPU generator seeded with
    ``seed``. :meth:`reset` restores the constructor generator's initial state, so a sequence
    of calls can be replayed bit for bit; :meth:`reseed` restarts it from another seed (the
    evaluation reseeds per case, see :func:`volattack.defenses.registry.reseed_defense`).

    Args:
        sigma: noise standard deviation in input units, >= 0 (0 is the identity).
        seed: seed of the private generator (when ``generator`` is None), >= 0.
        generator: an explicit CPU ``torch.Generator`` to draw from.

    Shape:
        ``(B, C, H, W, D)`` -> same.
    """

    randomized = True

    def __init__(self, sigma: float = 0.05, *, seed: int = 0, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        check_number("sigma", sigma, low=0)
        check_number("seed", seed, low=0, integer=True)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got device {generator.device}.")
        self.sigma = float(sigma)
        self.seed = int(seed)
        if generator is None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(self.seed)
        self.generator = generator
        self._initial_state = generator.get_state().clone()

    def describe_args(self) -> list[str]:
        return [f"sigma={self.sigma}"]

    def reset(self) -> None:
        """Restore the constructor generator to its state at construction (replay draws)."""
        self.generator.set_state(self._initial_state)

    def reseed(self, seed: int) -> None:
        """Restart the transform's generator from ``seed`` (``manual_seed``)."""
        self.generator.manual_seed(int(seed))

    def __deepcopy__(self, memo: dict) -> "RandomNoise":
        new = RandomNoise(self.sigma, seed=self.seed)
        new.generator.set_state(self.generator.get_state())
        new._initial_state = self._initial_state.clone()
        return new

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Noisy images.

        Args:
            x: images ``(B, C, *spatial)``.
            generator: optional CPU generator for this call (overrides the constructor's).

        Shape:
            ``(B, C, *spatial)`` -> same.
        """
        x = check_images(x, None)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}.")
        g = self.generator if generator is None else generator
        noise = torch.randn(tuple(x.shape[1:]), generator=g, dtype=torch.float32)
        if self.sigma == 0:
            return x
        return x + self.sigma * noise.to(device=x.device, dtype=x.dtype)
