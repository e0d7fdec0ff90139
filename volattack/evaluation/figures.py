"""PNG figures of evaluation results (matplotlib, Agg backend).

- :func:`dice_vs_budget`: adversarial Dice against the swept budget, one line per attack.
- :func:`triplanar_panel`: for one case, the central axial/coronal/sagittal slices of the
  image, the adversarial image, the perturbation (amplified, in source units: ``units``, e.g.
  HU for CT, a.u. for MRI), its 3D spectrum
  (log magnitude of the FFT, centred), and the clean and adversarial predictions overlaid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from volattack.evaluation.config import AttackSpec


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Atomic PNG write."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def dice_vs_budget(results: dict[str, Any], specs: Sequence[AttackSpec], path: str | Path) -> Optional[str]:
    """Adversarial foreground Dice versus the swept parameter, one line per attack (clean Dice dashed).

    Returns the path relative to the run directory, or ``None`` when no attack has a numeric sweep.
    """
    plt = _plt()
    path = Path(path)
    summ = results["summary"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    drawn = 0
    for spec in specs:
        if len(spec.sweep) != 1:
            continue
        (param, values), = spec.sweep.items()
        pts = [(v, summ["attacks"][lbl]["adv_dice"]) for v, (lbl, _) in zip(values, spec.expand())
               if lbl in summ["attacks"] and isinstance(v, (int, float))]
        if not pts:
            continue
        pts.sort()
        scale = 255 if param == "eps" and max(v for v, _ in pts) <= 1 else 1
        ax.plot([v * scale for v, _ in pts], [d for _, d in pts], marker="o", label=f"{spec.name} ({param})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(summ["clean"]["dice"], ls="--", c="gray", label="clean")
    ax.set_xlabel("budget (eps in /255 units; other parameters as given)")
    ax.set_ylabel("foreground Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Dice versus budget ({results['threat_model']} threat model)")
    _save(fig, path)
    plt.close(fig)
    return f"{path.parent.name}/{path.name}"


def _slices(v: torch.Tensor) -> list[torch.Tensor]:
    """Central axial (H, W), coronal (H, D) and sagittal (W, D) slices of a (H, W, D) volume."""
    h, w, d = v.shape
    return [v[:, :, d // 2], v[:, w // 2, :], v[h // 2, :, :]]


def triplanar_panel(
    image: torch.Tensor,
    adv: torch.Tensor,
    clean_pred: torch.Tensor,
    adv_pred: torch.Tensor,
    label: torch.Tensor,
    path: str | Path,
    *,
    title: str = "",
    unit_scale: float = 1.0,
    units: str = "HU",
) -> Path:
    """Write the triplanar panel of one case.

    Args:
        image: clean input (model input units).
        adv: adversarial input (model input units).
        clean_pred: clean predicted class map.
        adv_pred: adversarial predicted class map.
        label: ground-truth class map.
        path: PNG file to write (atomically).
        title: figure title.
        unit_scale: source units per input unit (``hu_per_unit`` of the preprocessing); the
            perturbation column is shown in source units.
        units: name of the source unit for the perturbation column (``data.preprocess.units``).

    Shape:
        image, adv ``(1, C, H, W, D)`` (channel 0 shown); predictions and label ``(1, 1, H, W, D)``.
    """
    plt = _plt()
    path = Path(path)
    x, a = image[0, 0].float(), adv[0, 0].float()
    delta = (a - x) * unit_scale
    lim = float(delta.abs().max()) or 1.0
    spec = torch.fft.fftshift(torch.fft.fftn(a - x).abs().add(1e-8).log10())
    cp, ap, gt = clean_pred[0, 0], adv_pred[0, 0], label[0, 0]
    k = int(max(int(gt.max()), int(cp.max()), int(ap.max()), 1))
    cols = ["image", "adversarial", f"perturbation ({units}, ±{lim:.1f})", "log |FFT| of perturbation",
            "clean prediction", "adversarial prediction"]
    fig, axes = plt.subplots(3, 6, figsize=(15, 7.5))
    for r, (xs, as_, ds, ss, cs, aps) in enumerate(zip(_slices(x), _slices(a), _slices(delta), _slices(spec),
                                                         _slices(cp), _slices(ap))):
        views = [(xs, "gray", None), (as_, "gray", None), (ds, "seismic", (-lim, lim)), (ss, "magma", None)]
        for c, (v, cmap, rng) in enumerate(views):
            kw = {"vmin": rng[0], "vmax": rng[1]} if rng else {}
            axes[r, c].imshow(v.T.numpy(), cmap=cmap, origin="lower", **kw)
        for c, p in ((4, cs), (5, aps)):
            axes[r, c].imshow(xs.T.numpy(), cmap="gray", origin="lower")
            m = p.float()
            axes[r, c].imshow(torch.where(m > 0, m, torch.tensor(math.nan)).T.numpy(), cmap="tab10",
                              vmin=0, vmax=max(k, 9), alpha=0.5, origin="lower", interpolation="nearest")
    for c, name in enumerate(cols):
        axes[0, c].set_title(name, fontsize=9)
    for r, name in enumerate(["axial", "coronal", "sagittal"]):
        axes[r, 0].set_ylabel(name)
    for axx in axes.flat:
        axx.set_xticks([])
        axx.set_yticks([])
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
    plt.close(fig)
    return path
