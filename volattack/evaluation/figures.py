"""PNG figures of evaluation results (matplotlib, Agg backend).

- :func:`dice_vs_budget`: adversarial Dice against the swept budget, one line per attack
  (:func:`budget_series`: L-inf eps in 1/255 steps on a unit-width input range, others as configured).
- :func:`triplanar_panel`: for one case, the central axial/coronal/sagittal slices of the
  image, the adversarial image, the perturbation (amplified, in source units: ``units``, e.g.
  HU for CT, a.u. for MRI), its 3D spectrum
  (log magnitude of the FFT, centred), and the clean and adversarial predictions overlaid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
    import io

    from volattack.utils import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(buf.getvalue(), path, suffix=".png")


@dataclass
class BudgetSeries:
    """One line of :func:`dice_vs_budget`: adversarial Dice against a swept parameter.

    Attributes:
        label: legend text (attack, parameter and the unit of the x values).
        xs: the swept values as plotted (L-inf eps of a unit-width input range in 1/255 steps).
        ys: mean adversarial foreground Dice at each value.
        scale: factor applied to the configured values (255 or 1).
    """

    label: str
    xs: list[float]
    ys: list[float]
    scale: float


def budget_series(results: dict[str, Any], specs: Sequence[AttackSpec]) -> list[BudgetSeries]:
    """The lines of :func:`dice_vs_budget`, one per attack with a single numeric sweep.

    An ``eps`` sweep is shown in 1/255 steps only when ``eps`` is an L-inf radius
    (``results["attacks"][i]["linf_budget"]``) and the input range has width 1 (``bounds``);
    any other parameter (an L2 radius, a quantisation step) is shown as configured.
    """
    summ = results["summary"]["attacks"]
    linf = {a["label"]: bool(a.get("linf_budget")) for a in results.get("attacks") or []}
    lo, hi = results.get("bounds") or (0.0, 1.0)
    unit_range = abs((float(hi) - float(lo)) - 1.0) < 1e-9
    out = []
    for spec in specs:
        if len(spec.sweep) != 1:
            continue
        (param, values), = spec.sweep.items()
        labels = [lbl for lbl, _ in spec.expand()]
        pts = sorted((float(v), summ[lbl]["adv_dice"]) for v, lbl in zip(values, labels)
                     if lbl in summ and isinstance(v, (int, float)))
        if not pts:
            continue
        in_255 = param == "eps" and unit_range and all(linf.get(lbl, False) for lbl in labels if lbl in summ)
        scale = 255.0 if in_255 else 1.0
        unit = "L-inf, /255" if in_255 else "as configured"
        out.append(BudgetSeries(f"{spec.name} ({param}, {unit})", [v * scale for v, _ in pts],
                                [d for _, d in pts], scale))
    return out


def dice_vs_budget(results: dict[str, Any], specs: Sequence[AttackSpec], path: str | Path) -> Optional[str]:
    """Adversarial foreground Dice versus the swept parameter, one line per attack (clean Dice dashed),
    the lines of :func:`budget_series`.

    Returns the path relative to the run directory, or ``None`` when no attack has a numeric sweep.
    """
    series = budget_series(results, specs)
    if not series:
        return None
    plt = _plt()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for s in series:
        ax.plot(s.xs, s.ys, marker="o", label=s.label)
    ax.axhline(results["summary"]["clean"]["dice"], ls="--", c="gray", label="clean")
    ax.set_xlabel("budget (unit in the legend)")
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
        unit_scale: source units per input unit (the intensity model's ``unit_scale``); the
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
