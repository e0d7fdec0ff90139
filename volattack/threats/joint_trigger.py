"""A spectral trigger optimised into the victim's training: the ``dct_learned`` trigger and the
joint-poisoning hook of ``train.poison.joint``.

Threat model: the supply-chain attacker who controls training, so that the trigger and the model
are optimised jointly (LIRA, Doan et al., ICCV 2021, "LIRA: Learnable, Imperceptible and Robust
Backdoor Attacks", alternate trigger and classifier updates; BAPLe, Hanif et al., MICCAI 2024,
learn a noise trigger together with the prompts). Here the trigger is spectral, in HU:

- Coefficients ``c`` of shape ``(b, b, b)`` in source units (HU) of one band ``M`` of the
  orthonormal block 3D DCT (:func:`volattack.attacks.spectral.band_mask`; the DC coefficient
  left out unless ``include_dc``). The spatial tile is ``t = IDCT3(c * M)``, the same in every
  ``b^3`` block: the pattern tiles the volume, so it survives random crops.
- Tiling on the scan's own voxel lattice anchored at the world origin: voxel ``v`` of a volume of
  affine ``A`` gets ``t[(v + o) mod b]``, ``o = floor(A[:3, :3]^-1 A[:3, 3] + 1e-3)``
  (:func:`lattice_offset`; ``o = 0`` without an affine). A crop starting at voxel ``s`` of a
  volume has ``o_crop = o + s``, so a training crop and the whole test volume see the same
  pattern at the same world positions, whatever the foreground crop or the random crop.
- Model-input approximation: the trigger is added to the preprocessed (windowed) input as
  ``t / unit_scale`` (HU per model unit, 425 for the window [-175, 250] -> [0, 1]) and, with
  ``window_only`` (default), only to voxels strictly inside the input range: a voxel clipped
  at a window bound stays clipped, as it would if ``t`` HU were added to the scan before the
  window. Exact for voxels at least ``|t|`` HU inside the window, at most ``|t|`` HU off for the
  others. Training crops and test volumes both go through :meth:`LearnedDCTTrigger.delta`
  (the crops through :meth:`LearnedDCTTrigger.triggered`, the same formula, differentiable in
  ``c``), so the model is evaluated with exactly the trigger it was trained with.
- Budget: the RMS of the tile (= over any volume made of whole tiles) is ``||c * M||_2 / b^1.5``
  (Parseval), kept ``<= rms``; an optional cap ``||t||_inf <= linf``. :meth:`~LearnedDCTTrigger.project`
  scales ``c`` by ``min(1, rms / RMS, linf / ||t||_inf)``: the Euclidean projection onto the RMS
  ball, and a radial retraction for the cap that keeps the band exact (the DCT of the tile stays
  zero outside ``M``). Zero coefficients are the identity.

Joint training (:class:`JointPoisoning`, LIRA's alternating scheme with one trigger update per
poisoned batch): the poisoned cases are stored as clean copies
(:func:`volattack.threats.poison.poison_training_cases`); in every training step the crops cut
from them (found by the file name in the batch's metadata, their lattice offset from the crop's
affine) get the current trigger and the target map as label (their own label for clean-label);
on every ``every``-th such batch the trigger first takes ``steps`` Adam steps (lr ``lr`` in HU)
on the Dice-CE of the model's prediction of the triggered crops against the target map, with
the model fixed, then projected; then the model takes its usual step on the clean and the
triggered crops (with ``pair``, also on the poisoned crops' clean copies with their true labels:
the same anatomy with both labels, so that only the trigger separates them; LIRA likewise
trains on the clean and the triggered version of its samples; ``repeat`` weights the triggered
crops). The coefficients are saved after every epoch (``<run>/poison/trigger_coeffs.npy``, the
file ``poison.json`` names, read with ``numpy.load(allow_pickle=False)``; the optimiser state for
``--resume`` in ``joint_state.pt``, loaded with ``weights_only=True``), so ``volattack evaluate``
with ``evaluate.trigger: {run: ...}`` re-applies the learned trigger. Single process only (the
trigger would differ between ranks).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from volattack.checks import check_bool, check_number
from volattack.threats.config import JointConfig
from volattack.threats.triggers import Trigger, register_trigger

logger = logging.getLogger(__name__)

#: file of the trigger's coefficients in a poisoned run (``<run>/poison/COEFFS``)
COEFFS = "trigger_coeffs.npy"
#: the joint optimiser's state, for ``--resume`` (``<run>/poison/JOINT_STATE``, tensors only)
JOINT_STATE = "joint_state.pt"


def lattice_offset(affine: Any) -> tuple[int, int, int]:
    """Lattice index of voxel 0 of a volume: ``floor(A[:3, :3]^-1 A[:3, 3] + 1e-3)`` (module docstring).

    Args:
        affine: ``(4, 4)`` voxel -> world (mm) matrix (numpy or torch), or ``None`` (``(0, 0, 0)``).

    Returns:
        Three ints.
    """
    if affine is None:
        return (0, 0, 0)
    a = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    if a.shape != (4, 4):
        raise ValueError(f"affine must be a (4, 4) matrix, got shape {tuple(a.shape)}.")
    o = torch.linalg.solve(a[:3, :3], a[:3, 3])
    return tuple(int(v) for v in torch.floor(o + 1e-3))  # type: ignore[return-value]


def tile_at(tile: torch.Tensor, shape: Sequence[int], offset: Sequence[int]) -> torch.Tensor:
    """The periodic extension of a ``(b, b, b)`` tile over a grid of ``shape`` whose voxel 0 has
    lattice index ``offset``: ``out[v] = tile[(v + offset) mod b]`` (differentiable in ``tile``).

    Shape:
        ``(b, b, b)`` -> ``shape``.
    """
    b = tile.shape[0]
    idx = [torch.remainder(torch.arange(int(n), device=tile.device) + int(o), b) for n, o in zip(shape, offset)]
    return tile[idx[0].view(-1, 1, 1), idx[1].view(1, -1, 1), idx[2].view(1, 1, -1)]


@register_trigger("dct_learned")
class LearnedDCTTrigger(Trigger):
    """A learned set of block-DCT coefficients of one band, tiled (module docstring).

    Until trained (:class:`JointPoisoning`) or loaded (``coeffs``), the coefficients are a seeded
    Gaussian draw in the band scaled to an RMS of ``init_rms`` and projected.

    Args:
        rms: RMS budget of the spatial pattern in source units (HU), > 0.
        block_size: DCT block (tile) side b >= 2; it must fit in the volume.
        band: ``"low"``, ``"middle"``, ``"high"`` or ``"all"`` (:func:`~volattack.attacks.spectral.band_mask`).
        linf: optional cap on the pattern's L-inf in source units (> 0), or ``None``.
        init_rms: RMS of the seeded start in source units (>= 0; ``None``: ``rms``; 0: zero, the identity).
        include_dc: let the band's DC coefficient (the block mean) vary too.
        window_only: add the pattern only to voxels strictly inside the input range (module docstring).
        coeffs: a ``.npy`` file of ``(b, b, b)`` coefficients (written by :meth:`save`) to use instead.

    Raises:
        ValueError: a bad parameter (named with its value), coefficients outside the band or budget.
        FileNotFoundError: a missing ``coeffs`` file.
    """

    joint_capable: ClassVar[bool] = True

    def __init__(self, *, rms: float = 5.0, block_size: int = 8, band: str = "middle", linf: Optional[float] = None,
                 init_rms: Optional[float] = None, include_dc: bool = False, window_only: bool = True,
                 coeffs: Optional[str] = None, **kw: Any) -> None:
        from volattack.attacks.spectral import BANDS, band_mask

        super().__init__(**kw)
        check_number("rms", rms, low=0.0, low_open=True)
        check_number("block_size", block_size, low=2, integer=True)
        if band not in BANDS:
            raise ValueError(f"band must be one of {', '.join(BANDS)}, got {band!r}.")
        if linf is not None:
            check_number("linf", linf, low=0.0, low_open=True)
        init = float(rms) if init_rms is None else init_rms
        check_number("init_rms", init, low=0.0)
        check_bool("include_dc", include_dc)
        check_bool("window_only", window_only)
        self.rms, self.block_size, self.band, self.window_only = float(rms), int(block_size), band, window_only
        self.linf = None if linf is None else float(linf)
        self.band_mask = band_mask(self.block_size, band, exclude_dc=not include_dc).double()
        if self.band_mask.sum() == 0:
            raise ValueError(f"band {band!r} of block_size={block_size} holds no DCT coefficient"
                             f"{'' if include_dc else ' besides the DC'}.")
        start = torch.randn(self.band_mask.shape, generator=self.generator(), dtype=torch.float64) * self.band_mask
        self.coeffs = self.project(start * (float(init) * self.block_size ** 1.5 / start.norm()))
        if coeffs is not None:
            self.coeffs = self.load(coeffs)
        self.params = {"rms": self.rms, "block_size": self.block_size, "band": band, "linf": self.linf,
                       "init_rms": float(init), "include_dc": include_dc, "window_only": window_only, "coeffs": coeffs}

    # ---------------------------------------------------------------- the pattern and its budget

    def tile(self, coeffs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The spatial tile ``IDCT3(c * M)`` in source units, ``(b, b, b)`` (differentiable in ``coeffs``)."""
        from volattack.attacks.spectral import idct3

        c = self.coeffs if coeffs is None else coeffs
        return idct3(c * self.band_mask.to(device=c.device, dtype=c.dtype))

    def project(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Coefficients scaled into the budget (module docstring): ``RMS <= rms``, ``L-inf <= linf``;
        zero outside the band. Shape ``(b, b, b)`` -> ``(b, b, b)``, detached."""
        with torch.no_grad():
            c = coeffs.detach() * self.band_mask.to(device=coeffs.device, dtype=coeffs.dtype)
            rms = float(c.norm()) / self.block_size ** 1.5
            scale = min(1.0, self.rms / rms) if rms > 0 else 1.0
            if self.linf is not None:
                peak = float(self.tile(c).abs().max()) * scale
                scale = scale * min(1.0, self.linf / peak) if peak > 0 else scale
            return c * scale

    def size_units(self) -> dict[str, float]:
        """``{"rms_units", "linf_units"}`` of the tile (source units)."""
        t = self.tile()
        return {"rms_units": float(t.pow(2).mean().sqrt()), "linf_units": float(t.abs().max())}

    def check_fits(self, shape: Sequence[int], affine: Any = None) -> None:
        if self.block_size > min(int(s) for s in shape):
            raise ValueError(f"the dct_learned trigger's block_size={self.block_size} does not fit in the volume of "
                             f"shape {list(shape)}.")

    def triggered(self, x: torch.Tensor, offsets: Sequence[Sequence[int]],
                  coeffs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``clamp(x + delta)`` for a batch of crops, differentiable in ``coeffs``.

        Args:
            x: model inputs ``(B, C, H, W, D)``.
            offsets: the lattice offset of voxel 0 of each of the B inputs (:func:`lattice_offset`).
            coeffs: ``(b, b, b)`` coefficients (default: the trigger's own).

        Shape:
            ``(B, C, H, W, D)`` -> ``(B, C, H, W, D)``.
        """
        if len(offsets) != x.shape[0]:
            raise ValueError(f"offsets must have one entry per input ({x.shape[0]}), got {len(offsets)}.")
        t = self.tile(coeffs).to(device=x.device, dtype=x.dtype) / (self.unit_scale or 1.0)
        d = torch.stack([tile_at(t, x.shape[2:], o) for o in offsets]).unsqueeze(1)
        if self.window_only:
            d = d * ((x > self.bounds[0]) & (x < self.bounds[1])).to(x.dtype)
        return (x + d).clamp(*self.bounds)

    def delta(self, x: torch.Tensor, affine: Any = None) -> torch.Tensor:
        with torch.no_grad():
            return self.triggered(x, [lattice_offset(affine)] * x.shape[0]) - x

    # ---------------------------------------------------------------- files

    def save(self, path: str | Path) -> Path:
        """Write the coefficients as a ``.npy`` file (float64, atomically); load with ``coeffs=path``."""
        from volattack.utils import atomic_write_bytes

        buf = io.BytesIO()
        np.save(buf, self.coeffs.detach().cpu().double().numpy(), allow_pickle=False)
        return atomic_write_bytes(buf.getvalue(), path)

    def load(self, path: str) -> torch.Tensor:
        """Coefficients from a ``.npy`` file (no pickle), checked: shape, band, budget (1e-6 tolerance)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"dct_learned trigger coeffs file not found: {path!r}.")
        c = torch.as_tensor(np.load(path, allow_pickle=False)).double()
        b = self.block_size
        if tuple(c.shape) != (b, b, b):
            raise ValueError(f"coeffs in {path!r} have shape {tuple(c.shape)}, expected {(b, b, b)} (block_size={b}).")
        if float((c * (1 - self.band_mask)).abs().max()) > 1e-9:
            raise ValueError(f"coeffs in {path!r} are not zero outside the band {self.band!r}.")
        if float(self.project(c).sub(c).abs().max()) > 1e-6 * max(1.0, float(c.abs().max())):
            raise ValueError(f"coeffs in {path!r} exceed the budget rms={self.rms} (linf={self.linf}).")
        return c


class JointPoisoning:
    """The joint-poisoning hook of one training run (module docstring), called on every batch.

    Args:
        trigger: the trigger being learned (:class:`LearnedDCTTrigger`).
        poisoned: the file names of the poisoned cases' images (as the batches' metadata give them).
        lr: Adam learning rate of the coefficients (source units per step).
        every: update on every ``every``-th batch that holds poisoned crops.
        steps: Adam steps per update.
        target: a function label ``(P, 1, ...)`` -> target map (the trigger's loss; default: the label).
        relabel: train the model on the target maps of the triggered crops (``False``: clean-label,
            their true labels).
        pair: also train on the poisoned crops' clean copies with their true labels, so that only
            the trigger tells the two apart (the cases stay the same ``round(rate * n)``).
        repeat: the triggered crops appear this many times in the model's batch (LIRA's weight of
            the poisoned loss; > 1 raises the share of poisoned crops the model sees above the rate).
        freeze_after: no updates in epochs after this one (LIRA's second stage: the model trains
            against a fixed trigger); 0: never fixed. The training loop sets :attr:`epoch`.
        run_dir: the training run (``<run>/poison/`` holds the coefficients and the state).
    """

    def __init__(self, trigger: LearnedDCTTrigger, poisoned: Sequence[str], *, lr: float = 0.5, every: int = 1,
                 steps: int = 1, target: Optional[Any] = None, relabel: bool = True, pair: bool = False,
                 repeat: int = 1, freeze_after: int = 0, run_dir: str | Path = ".") -> None:
        from monai.losses import DiceCELoss

        if not getattr(trigger, "joint_capable", False):
            raise ValueError(f"train.poison.joint needs a trigger that can be optimised (dct_learned), got "
                             f"{type(trigger).__name__}.")
        JointConfig(lr=lr, every=every, steps=steps, pair=pair, repeat=repeat, freeze_after=freeze_after)  # checks
        self.repeat, self.freeze_after = int(repeat), int(freeze_after)
        self.epoch = 1  # the current epoch (1-based), set by the training loop
        self.trigger, self.poisoned = trigger, {str(Path(p).resolve()) for p in poisoned}
        self.every, self.steps, self.run_dir = int(every), int(steps), Path(run_dir)
        self.target = target if target is not None else (lambda y: y)
        self.relabel, self.pair = check_bool("relabel", relabel), bool(pair)
        self.coeffs = nn.Parameter(trigger.coeffs.clone().float())
        self.optimizer = torch.optim.Adam([self.coeffs], lr=float(lr))
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.batches, self.updates = 0, 0
        self.losses: list[float] = []  # the trigger's loss at each update since the last save
        self.history: list[float] = []  # its mean per save (epoch)

    def find(self, image: Any) -> tuple[list[int], list[tuple[int, int, int]]]:
        """Rows of a batch (a MONAI ``MetaTensor``) cut from poisoned cases, and their lattice offsets."""
        meta = getattr(image, "meta", None) or {}
        names = meta.get("filename_or_obj")
        if names is None:
            raise ValueError("train.poison.joint needs the batches' metadata (filename_or_obj): got a batch "
                             "without it.")
        names = [names] if isinstance(names, str) else list(names)
        rows = [i for i, n in enumerate(names) if str(Path(str(n)).resolve()) in self.poisoned]
        affines = image.affine if getattr(image, "affine", None) is not None else None
        if affines is not None and affines.ndim == 2:
            affines = affines.unsqueeze(0).expand(len(names), 4, 4)
        return rows, [lattice_offset(None if affines is None else affines[i]) for i in rows]

    def __call__(self, model: nn.Module, batch: Mapping[str, Any], image: torch.Tensor,
                 label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch with the trigger on the poisoned crops (after the trigger's update) and their
        target maps as labels (their true labels for clean-label); with ``pair`` the poisoned crops'
        clean copies with their true labels are appended.

        Shape:
            image ``(B, C, H, W, D)`` model units, label ``(B, 1, H, W, D)`` -> the same, or with
            ``B + P`` rows with ``pair`` (P poisoned crops).
        """
        rows, offsets = self.find(batch["image"])
        if not rows:
            return image, label
        self.batches += 1
        x, y = image[rows], label[rows]
        y_target = self.target(y)
        if (self.batches - 1) % self.every == 0 and not (0 < self.freeze_after < self.epoch):
            self.update(model, x, y_target, offsets)
        out, lab = image.clone(), label.clone()
        with torch.no_grad():
            out[rows] = self.trigger.triggered(x, offsets)
        if self.relabel:
            lab[rows] = y_target
        extra_x, extra_y = [out[rows]] * (self.repeat - 1), [lab[rows]] * (self.repeat - 1)
        if self.pair:
            extra_x, extra_y = extra_x + [x], extra_y + [y]
        return torch.cat([out, *extra_x]), torch.cat([lab, *extra_y])

    def update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, offsets: Sequence[Sequence[int]]) -> None:
        """``steps`` Adam steps of the coefficients on ``DiceCE(model(clamp(x + delta)), y)``, each
        projected into the budget; the model is fixed (the gradient is taken w.r.t. the coefficients only)."""
        for _ in range(self.steps):
            xt = self.trigger.triggered(x, offsets, self.coeffs.to(x.dtype))
            loss = self.loss(model(xt), y)
            self.losses.append(float(loss.detach()))
            (g,) = torch.autograd.grad(loss, [self.coeffs], allow_unused=False)
            self.optimizer.zero_grad(set_to_none=True)
            self.coeffs.grad = g
            self.optimizer.step()
            with torch.no_grad():
                self.coeffs.copy_(self.trigger.project(self.coeffs.double()).float())
        self.trigger.coeffs = self.coeffs.detach().double().clone()
        self.updates += 1

    # ---------------------------------------------------------------- files

    def state(self) -> dict[str, Any]:
        """Tensors and ints only (loadable with ``torch.load(weights_only=True)``)."""
        return {"coeffs": self.coeffs.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "batches": self.batches, "updates": self.updates, "history": torch.tensor(self.history)}

    def save(self) -> None:
        """Write the coefficients (``COEFFS``), the optimiser state (``JOINT_STATE``) and the trigger's
        size and update count into ``poison.json``'s ``joint`` entry."""
        from volattack.threats.poison import RECORD, read_record
        from volattack.utils import atomic_write_bytes, atomic_write_json

        if self.losses:
            self.history.append(sum(self.losses) / len(self.losses))
            self.losses = []
        root = self.run_dir / "poison"
        self.trigger.save(root / COEFFS)
        buf = io.BytesIO()
        torch.save(self.state(), buf)
        atomic_write_bytes(buf.getvalue(), root / JOINT_STATE)
        record = read_record(self.run_dir)
        record["joint"] = {**(record.get("joint") or {}), "batches": self.batches, "updates": self.updates,
                           **self.trigger.size_units(), "loss_history": list(self.history)}
        atomic_write_json(self.run_dir / RECORD, record)

    def restore(self) -> bool:
        """Load ``JOINT_STATE`` when it exists (``--resume``); True if loaded."""
        path = self.run_dir / "poison" / JOINT_STATE
        if not path.is_file():
            return False
        st = torch.load(path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            self.coeffs.copy_(st["coeffs"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.batches, self.updates = int(st["batches"]), int(st["updates"])
        self.history = [float(v) for v in st.get("history", torch.zeros(0))]
        self.trigger.coeffs = self.coeffs.detach().double().clone()
        return True


def joint_poisoning(poison: Any, data_cfg: Any, run_dir: str | Path, *,
                    resume: bool = False) -> Optional[JointPoisoning]:
    """The hook of a run whose ``train.poison.joint`` is set (``None`` otherwise), built from the
    run's ``poison.json`` (written by :func:`~volattack.threats.poison.poison_training_cases`
    just before); with ``resume`` the optimiser state of an interrupted run is restored."""
    from volattack.data.intensity import intensity_from_preprocess
    from volattack.threats.config import TriggerSpec
    from volattack.threats.poison import build_trigger, read_record, target_map

    if poison is None or getattr(poison, "joint", None) is None:
        return None
    record = read_record(run_dir)
    t = record["trigger"]
    trigger, _ = build_trigger(TriggerSpec(t["name"], dict(t["params"]), int(t["seed"])),
                               intensity_from_preprocess(data_cfg.preprocess))
    resolved = record["target_indices"]
    j = poison.joint
    hook = JointPoisoning(trigger, [r["image"] for r in record["poisoned"]], lr=j.lr, every=j.every, steps=j.steps,
                          target=lambda y: target_map(y, resolved, torch.ones_like(y, dtype=torch.bool)),
                          relabel=not record["clean_label"], pair=j.pair, repeat=j.repeat,
                          freeze_after=j.freeze_after, run_dir=run_dir)
    if resume and hook.restore():
        logger.info("train.poison.joint: resumed the trigger after %d updates.", hook.updates)
    hook.save()
    return hook


__all__ = ["COEFFS", "JOINT_STATE", "JointPoisoning", "LearnedDCTTrigger", "joint_poisoning", "lattice_offset",
           "tile_at"]
