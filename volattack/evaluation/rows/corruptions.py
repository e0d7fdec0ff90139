"""Natural corruptions beside the adversarial ones: TorchIO artefacts at five fixed severities.

``evaluate.corruptions: {names: [motion, ...], severities: [1, 2, 3, 4, 5], seed: 0}`` adds, to
every case, one row ``<name> s<k>`` per corruption and severity and one row
``<name> severity-weighted`` per corruption, all scored through the results schema (Dice, HD95,
flip rate, the size of the change in model-input and source units, SSIM, ...).

Where they act: on the preprocessed model input ``(1, C, H, W, D)`` (model-input units, the
grid and affine after preprocessing; physical parameters such as a blur width are in mm of
that grid), like the attacks; the result is clamped to the model-input bounds. The corruptions
are TorchIO's deterministic transforms (Pérez-García et al., Comput. Methods Programs Biomed.
2021) with explicit parameters per severity, so a severity means the same thing on every case
and run (the parameters are recorded in ``results.json`` by :meth:`CorruptionPass.describe`):

============  =================================================================================
corruption    severity 1 .. 5
============  =================================================================================
motion        tio.Motion: 2 movements at times 0.35, 0.7 of the acquisition, rotations (d,0,0)°
              and (0,d,0)°, translations (d,0,0) and (0,d,0) mm, d = 0.5, 1, 2, 4, 8
ghosting      tio.Ghosting: 4 ghosts along axis 0, intensity 0.15, 0.3, 0.45, 0.6, 0.75,
              restore 0.02
spike         tio.Spike: one k-space spike at relative position (0.6, 0.55, 0.5), intensity
              0.1, 0.2, 0.3, 0.4, 0.5 (times the spectrum's maximum magnitude)
bias_field    tio.BiasField: order 3, coefficients 0.1 k x u with u ~ U(-1, 1)^20 drawn once from
              ``torch.Generator().manual_seed(seed)`` (recorded)
noise         tio.Noise: mean 0, std 0.02 k x (hi - lo) of the model-input range, seed
              ``seed_from(seed, case index)`` (the same draw at every severity; recorded per row)
blur          tio.Blur: gaussian std 1, 1.5, 2, 3, 4 mm along each axis
anisotropy    tio.Resample to the spacing times f along the last axis (nearest) and back to the
              grid (linear), as tio.RandomAnisotropy does, f = 1.5, 2, 3, 4, 5
============  =================================================================================

Severity-weighted degradation (after ROOD-MRI, Boone et al., NeuroImage 2023), over the
configured severities S of one corruption c and one case, with M_0 the clean value:

    D_c(Dice) = sum_{s in S} s * (Dice_0 - Dice_{c,s}) / sum_{s in S} s
    D_c(HD95) = sum_{s in S} s * (HD95_{c,s} - HD95_0) / sum_{s in S} s   (mm; larger is worse)

The ``<name> severity-weighted`` row holds, for every column, the severity-weighted mean
``sum_s s * v_s / sum_s s`` of the severity rows (NaN values skipped, weights renormalised), so
its ``dice_drop`` is D_c(Dice); its ``info`` has ``dice_degradation`` and
``hd95_degradation_mm``. D is linear in the per-case values, so the mean over cases of the
per-case D equals D of the case means (when no value is NaN).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from volattack.evaluation.rows import RowPass, register_row_pass

if TYPE_CHECKING:  # pragma: no cover
    from volattack.evaluation.cases import CaseData, Outcome
    from volattack.evaluation.config import EvalConfig
    from volattack.evaluation.records import Scores

#: corruption -> severity -> the TorchIO parameters (see the module docstring); ``bias_field``'s
#: ``scale`` multiplies the seeded coefficient pattern, ``noise``'s ``std_of_range`` the input range
SEVERITY_TABLE: dict[str, dict[int, dict[str, Any]]] = {
    "motion": {k: {"degrees": [[d, 0.0, 0.0], [0.0, d, 0.0]], "translation_mm": [[d, 0.0, 0.0], [0.0, d, 0.0]],
                   "times": [0.35, 0.7]} for k, d in zip(range(1, 6), (0.5, 1.0, 2.0, 4.0, 8.0))},
    "ghosting": {k: {"num_ghosts": 4, "axis": 0, "intensity": v, "restore": 0.02}
                 for k, v in zip(range(1, 6), (0.15, 0.3, 0.45, 0.6, 0.75))},
    "spike": {k: {"spikes_positions": [[0.6, 0.55, 0.5]], "intensity": 0.1 * k} for k in range(1, 6)},
    "bias_field": {k: {"order": 3, "scale": 0.1 * k} for k in range(1, 6)},
    "noise": {k: {"mean": 0.0, "std_of_range": 0.02 * k} for k in range(1, 6)},
    "blur": {k: {"std_mm": v} for k, v in zip(range(1, 6), (1.0, 1.5, 2.0, 3.0, 4.0))},
    "anisotropy": {k: {"axis": 2, "downsampling": v} for k, v in zip(range(1, 6), (1.5, 2.0, 3.0, 4.0, 5.0))},
}

#: coefficients of a 3D polynomial of order 3 (TorchIO's bias field)
BIAS_TERMS = 20


def bias_pattern(seed: int) -> list[float]:
    """The bias-field coefficient pattern ``u ~ U(-1, 1)^20`` of ``seed`` (local generator)."""
    g = torch.Generator().manual_seed(int(seed))
    return [float(v) for v in (torch.rand(BIAS_TERMS, generator=g, dtype=torch.float64) * 2 - 1)]


def _transform(name: str, severity: int, *, width: float, noise_seed: int, pattern: Sequence[float],
               shape: Sequence[int], affine: Any) -> Any:
    """The TorchIO transform of ``name`` at ``severity`` (parameters of :data:`SEVERITY_TABLE`)."""
    import numpy as np
    import torchio as tio

    p = SEVERITY_TABLE[name][severity]
    if name == "motion":
        return tio.Motion(degrees=np.array(p["degrees"]), translation=np.array(p["translation_mm"]),
                          times=np.array(p["times"]), image_interpolation="linear")
    if name == "ghosting":
        return tio.Ghosting(num_ghosts=p["num_ghosts"], axis=p["axis"], intensity=p["intensity"],
                            restore=p["restore"])
    if name == "spike":
        return tio.Spike(spikes_positions=np.array(p["spikes_positions"]), intensity=p["intensity"])
    if name == "bias_field":
        return tio.BiasField(coefficients=[p["scale"] * u for u in pattern], order=p["order"])
    if name == "noise":
        return tio.Noise(mean=p["mean"], std=p["std_of_range"] * width, seed=int(noise_seed))
    if name == "blur":
        return tio.Blur(std=(p["std_mm"],) * 3)
    if name == "anisotropy":
        def anisotropy(img: Any) -> Any:
            spacing = [float(s) for s in img.spacing]
            spacing[p["axis"]] *= p["downsampling"]
            down = tio.Resample(target=tuple(spacing), image_interpolation="nearest")(img)
            return tio.Resample(target=(tuple(shape), np.asarray(affine)), image_interpolation="linear")(down)

        return anisotropy
    raise ValueError(f"corruption must be one of {sorted(SEVERITY_TABLE)}, got {name!r}.")


def corrupt(image: torch.Tensor, affine: Any, name: str, severity: int, *, bounds: tuple[float, float],
            noise_seed: int = 0, pattern: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Corrupt one preprocessed image with TorchIO.

    Args:
        image: ``(1, C, H, W, D)`` model input (any device).
        affine: ``(4, 4)`` affine of its grid (mm).
        name: a corruption of :data:`SEVERITY_TABLE`.
        severity: 1..5.
        bounds: model-input range ``(lo, hi)``: the noise std scales with ``hi - lo``, the result
            is clamped to it.
        noise_seed: the seed of ``noise``'s draw.
        pattern: ``bias_field``'s coefficient pattern (default: :func:`bias_pattern` of 0).

    Returns:
        The corrupted image, same shape, dtype and device, inside ``bounds``. The global random
        stream is left as it was (TorchIO's own draw of its apply-probability runs in a fork).
    """
    import numpy as np
    import torchio as tio

    if name not in SEVERITY_TABLE:
        raise ValueError(f"corruption must be one of {sorted(SEVERITY_TABLE)}, got {name!r}.")
    if severity not in SEVERITY_TABLE[name]:
        raise ValueError(f"severity must be in 1..5, got {severity!r}.")
    lo, hi = float(bounds[0]), float(bounds[1])
    aff = np.asarray(affine, dtype=np.float64)
    t = _transform(name, severity, width=hi - lo, noise_seed=noise_seed,
                   pattern=bias_pattern(0) if pattern is None else pattern, shape=image.shape[2:], affine=aff)
    img = tio.ScalarImage(tensor=image[0].detach().float().cpu().clone(), affine=aff)
    with torch.random.fork_rng(devices=[]):  # TorchIO draws its apply-probability from the global stream
        out = torch.as_tensor(t(img).data).to(image.dtype)
    return out.unsqueeze(0).to(image.device).clamp(lo, hi)


def _weighted(values: Sequence[Any], weights: Sequence[float]) -> Any:
    """``sum w v / sum w`` over the finite numbers (elementwise for lists); ``None`` if none."""
    if values and all(isinstance(v, (list, tuple)) for v in values):
        n = min(len(v) for v in values)
        return [_weighted([v[j] for v in values], weights) for j in range(n)]
    pairs = [(float(v), w) for v, w in zip(values, weights)
             if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v))]
    if not pairs:
        return float("nan") if any(isinstance(v, float) for v in values) else None
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


def severity_weighted(rows: Sequence["Scores"], severities: Sequence[int], clean: "Scores") -> "Scores":
    """The ``severity-weighted`` row of one corruption from its severity rows (module docstring).

    Args:
        rows: the scores of the severity rows, in the order of ``severities``.
        severities: their severities (the weights).
        clean: the clean scores of the case (``adv_dice``, ``hd95_mm``).
    """
    from volattack.evaluation.records import Scores

    w = [float(s) for s in severities]
    keys = list(dict.fromkeys(k for r in rows for k in r.values))
    values = {k: _weighted([r.get(k) for r in rows], w) for k in keys}
    info: dict[str, Any] = {"dice_degradation": _weighted([clean.get("adv_dice") - r.get("adv_dice") for r in rows],
                                                          w)}
    h0 = clean.get("hd95_mm")
    if isinstance(h0, (int, float)):
        info["hd95_degradation_mm"] = _weighted(
            [None if r.get("hd95_mm") is None else r.get("hd95_mm") - h0 for r in rows], w)
    return Scores(values=values, info=info)


@register_row_pass("corruptions")
class CorruptionPass(RowPass):
    """Rows ``<name> s<k>`` and ``<name> severity-weighted`` of ``evaluate.corruptions`` (module docstring)."""

    @classmethod
    def enabled(cls, eval_cfg: "EvalConfig") -> bool:
        return getattr(eval_cfg, "corruptions", None) is not None

    def __init__(self, passes: Any) -> None:
        super().__init__(passes)
        self.cc = passes.cfg.corruptions
        self.pattern = bias_pattern(self.cc.seed)

    def labels(self) -> list[str]:
        out = []
        for n in self.cc.names:
            out += [f"{n} s{s}" for s in self.cc.severities] + [f"{n} severity-weighted"]
        return out

    def rows(self, data: "CaseData", index: int, case_seed: int, clean: "Outcome") -> dict[str, "Scores"]:
        from volattack.evaluation.cases import attack_outcome, score
        from volattack.ops import seed_from

        p = self.passes
        clean_scores = score(clean, clean_row=True)
        noise_seed = seed_from(self.cc.seed, index)
        out: dict[str, Scores] = {}
        for n in self.cc.names:
            per_sev = []
            for s in self.cc.severities:
                x = corrupt(data.image, data.affine, n, s, bounds=p.bounds, noise_seed=noise_seed, pattern=self.pattern)
                info: dict[str, Any] = {"severity": s}
                if n == "noise":
                    info["noise_seed"] = noise_seed
                out[f"{n} s{s}"] = score(attack_outcome(p.predict(x), x, info, data, clean, bounds=p.bounds,
                                                        unit_scale=p.unit_scale))
                per_sev.append(out[f"{n} s{s}"])
            out[f"{n} severity-weighted"] = severity_weighted(per_sev, self.cc.severities, clean_scores)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "library": "torchio",
            "space": "preprocessed model input, clamped to the model-input bounds",
            "names": list(self.cc.names),
            "severities": list(self.cc.severities),
            "seed": self.cc.seed,
            "parameters": {n: {str(s): SEVERITY_TABLE[n][s] for s in self.cc.severities} for n in self.cc.names},
            "bias_field_pattern": self.pattern,
            "noise_seed": "seed_from(seed, case index), recorded per row as info.noise_seed",
            "degradation": "D(Dice) = sum_s s (Dice_0 - Dice_s) / sum_s s; "
                           "D(HD95) = sum_s s (HD95_s - HD95_0) / sum_s s (mm)",
        }


__all__ = ["CorruptionPass", "SEVERITY_TABLE", "bias_pattern", "corrupt", "severity_weighted"]
