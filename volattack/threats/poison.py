"""Backdoor poisoning of a segmentation training split (``train.poison``) and the target maps.

A poisoned case is a training case with the trigger added to its preprocessed model input
(:mod:`volattack.threats.triggers`) and its label map changed by the target behaviour
(:func:`target_map`; the clean-label variant keeps the labels). Exactly ``round(rate * n)`` of the
``n`` training cases are poisoned, chosen by :func:`choose_poisoned` from a local
``torch.Generator`` seeded by ``poison.seed``.

:func:`poison_training_cases` (the hook of ``volattack train``, called before any training work)
checks everything first (the trigger's name and parameters, the target's class names against the
datalist's ``labels``, that the trigger fits every poisoned volume), and only then writes the
poisoned cases as NIfTI files in source units on their preprocessed grid
(``<run>/poison/imagesTr``, ``labelsTr``) and ``<run>/poison.json`` (the poisoned case ids, the
seed, the trigger, the resolved target, the class names); the training split then reads these
files in place of the originals, through the same preprocessing (which maps them back to the
triggered model input). The threat model is the one of FIBA (Feng et al., CVPR 2022): the
attacker controls a share of the training data, not the training code. With ``train.poison.joint``
(:mod:`volattack.threats.joint_trigger`) the attacker controls training too (LIRA, Doan et al.,
ICCV 2021): the poisoned cases are written as clean copies, and the trigger (optimised as it
goes) and the target map are put on their crops during training.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from volattack.checks import check_number, is_int
from volattack.data.datalist import datalist_class_names
from volattack.threats.config import PoisonConfig, TriggerSpec, check_target
from volattack.threats.triggers import Trigger, create_trigger

logger = logging.getLogger(__name__)

#: name of the poisoning record in a training run directory
RECORD = "poison.json"


def resolve_target(target: Mapping[str, Any], class_names: Mapping[int, str]) -> dict[str, Any]:
    """Class names of a target behaviour -> label indices.

    Args:
        target: ``{remove: [names]}``, ``{relabel: {a: b}}`` or ``{paint: name}``.
        class_names: label index -> name of the dataset (background included).

    Returns:
        ``{"remove": [i, ...]}``, ``{"relabel": {i: j}}`` or ``{"paint": i}``.

    Raises:
        ValueError: a name the dataset lacks (the names it has are listed), background named,
            or a malformed target.
    """
    t = check_target(dict(target), "target")
    index = {str(v): int(k) for k, v in class_names.items()}

    def idx(name: str) -> int:
        if name not in index:
            from volattack.registry import suggest

            raise ValueError(f"target names class {name!r}, which the dataset lacks.{suggest(name, index)} "
                             f"Classes: {', '.join(index)}.")
        if index[name] == 0:
            raise ValueError(f"target must name foreground classes, got the background class {name!r}.")
        return index[name]

    kind, value = next(iter(t.items()))
    if kind == "remove":
        return {"remove": [idx(n) for n in value]}
    if kind == "relabel":
        return {"relabel": {idx(a): idx(b) for a, b in value.items()}}
    return {"paint": idx(value)}


def output_classes(resolved: Mapping[str, Any]) -> set[int]:
    """The classes a resolved behaviour writes (background for ``remove``)."""
    if "remove" in resolved:
        return {0}
    if "relabel" in resolved:
        return {int(v) for v in resolved["relabel"].values()}
    return {int(resolved["paint"])}


def affected_classes(resolved: Mapping[str, Any]) -> set[int]:
    """The foreground classes a resolved behaviour names (the others are "untouched")."""
    if "remove" in resolved:
        return {int(v) for v in resolved["remove"]}
    if "relabel" in resolved:
        return {int(k) for k in resolved["relabel"]} | {int(v) for v in resolved["relabel"].values()}
    return {int(resolved["paint"])}


def target_map(label: torch.Tensor, resolved: Mapping[str, Any], trigger_mask: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """The label map the backdoor should produce.

    ``remove``: the named classes become 0; ``relabel``: every voxel of class ``a`` becomes ``b``
    (simultaneously, so ``{a: b, b: a}`` swaps); ``paint``: the voxels of ``trigger_mask`` get the
    class. Every other voxel keeps its label.

    Shape:
        label ``(B, 1, H, W, D)`` long; trigger_mask broadcastable bool -> ``(B, 1, H, W, D)``.
    """
    out = label.clone()
    if "remove" in resolved:
        for c in resolved["remove"]:
            out[label == int(c)] = 0
    elif "relabel" in resolved:
        for a, b in resolved["relabel"].items():
            out[label == int(a)] = int(b)
    else:
        if trigger_mask is None:
            raise ValueError("a paint target needs the trigger's mask, got trigger_mask=None.")
        out = torch.where(trigger_mask.to(label.device).expand_as(label), torch.full_like(label, int(resolved["paint"])),
                          out)
    return out


def choose_poisoned(n: int, rate: float, seed: int) -> list[int]:
    """Indices (sorted) of exactly ``round(rate * n)`` of ``n`` cases, drawn by ``torch.randperm``
    from ``torch.Generator().manual_seed(seed)``.

    Raises:
        ValueError: ``n`` not an integer >= 0, ``rate`` outside [0, 1], bad ``seed``.
    """
    if not is_int(n) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}.")
    check_number("poison.rate", rate, low=0.0, high=1.0)
    check_number("poison.seed", seed, low=0, integer=True)
    k = int(round(rate * n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:k].tolist())


class Poisoner:
    """A trigger and a resolved target behaviour, applied to one preprocessed case.

    Args:
        trigger: the trigger.
        resolved: the target behaviour in label indices (:func:`resolve_target`).
        clean_label: keep the labels (clean-label variant).
        deferred: keep image and label (trigger and target map are added in training, ``train.poison.joint``).
    """

    def __init__(self, trigger: Trigger, resolved: Mapping[str, Any], clean_label: bool = False,
                 deferred: bool = False) -> None:
        self.trigger, self.resolved, self.clean_label = trigger, dict(resolved), bool(clean_label)
        self.deferred = bool(deferred)

    def poison(self, image: torch.Tensor, label: torch.Tensor, affine: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(triggered image, target map or the label itself for clean-label)``; both unchanged when deferred.

        Shape:
            image ``(1, C, H, W, D)``, label ``(1, 1, H, W, D)`` -> the same shapes.
        """
        if self.deferred:  # train.poison.joint: trigger and target map are put on the crops in training
            return image.clone(), label.clone()
        x_t = self.trigger.apply(image, affine)
        if self.clean_label:
            return x_t, label.clone()
        return x_t, target_map(label, self.resolved, self.trigger.mask(image, affine))


def build_trigger(spec: TriggerSpec, intensity: Any) -> tuple[Trigger, Optional[str]]:
    """The trigger of ``spec`` for a model of intensity model ``intensity`` (bounds, unit scale);
    a learned trigger's ``surrogate`` (checkpoint path) is returned apart, to be fitted."""
    params = dict(spec.params)
    surrogate = params.pop("surrogate", None)
    if surrogate is not None and spec.name != "learned":
        raise ValueError(f"trigger.params.surrogate is for the learned trigger, got trigger {spec.name!r}.")
    trig = create_trigger(spec.name, bounds=intensity.bounds, unit_scale=intensity.unit_scale, seed=spec.seed,
                          **params)
    return trig, surrogate


def _fit_learned(trigger: Trigger, surrogate: str, data_cfg: Any, cases: Sequence[tuple], resolved: Mapping) -> None:
    """Fit a learned trigger on the poisoned cases against the surrogate checkpoint."""
    from volattack.inference import make_inferer
    from volattack.models.sources import load_model

    if not Path(surrogate).exists():
        raise FileNotFoundError(f"trigger.params.surrogate not found: {surrogate!r}.")
    net = load_model(surrogate).module.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    pre = data_cfg.preprocess
    inferer = make_inferer(pre.roi_size, 4, 0.25, cval=float(trigger.bounds[0]))
    trigger.fit(lambda x: inferer(x, net), [c[0] for c in cases],
                [target_map(c[1], resolved, trigger.mask(c[0], c[2])) for c in cases])


def _load_checked(train_list: Sequence[Mapping[str, Any]], chosen: Sequence[int], data_cfg: Any,
                  trigger: Trigger) -> list[tuple[torch.Tensor, torch.Tensor, Any]]:
    """``(image, label, affine)`` of the chosen cases after the eval preprocessing, each checked to
    fit the trigger (``ValueError`` naming the case)."""
    from volattack.data.transforms import build_transforms

    transforms = build_transforms(data_cfg.preprocess, mode="eval")
    cases = []
    for i in chosen:
        sample = transforms(dict(train_list[i]))
        image, label = (torch.as_tensor(sample[k]).as_subclass(torch.Tensor).unsqueeze(0) for k in ("image", "label"))
        image, label = image.float(), label.long()  # plain tensors (MONAI metadata dropped)
        affine = torch.as_tensor(getattr(sample["image"], "affine", torch.eye(4))).double().numpy()
        try:
            trigger.check_fits(image.shape[2:], affine)
        except ValueError as e:
            raise ValueError(f"train.poison: case {train_list[i].get('image')!r}: {e}") from None
        cases.append((image, label, affine))
    return cases


def poison_training_cases(cfg: PoisonConfig, train_list: Sequence[Mapping[str, Any]], data_cfg: Any,
                          out: str | Path, *, class_names: Optional[Mapping[int, str]] = None,
                          fit: Optional[Callable[..., None]] = None) -> list[dict[str, Any]]:
    """Poison ``round(rate * n)`` training cases (module docstring); the ``train.poison`` hook.

    Args:
        cfg: the ``train.poison`` section.
        train_list: the training split (datalist entries with ``image`` and ``label`` paths).
        data_cfg: the ``data`` section (its preprocessing maps files to model inputs).
        out: the training run directory.
        class_names: label index -> name (default: the datalist's ``labels``).
        fit: fits a learned trigger (default: against ``trigger.params.surrogate``).

    Returns:
        The training split with the poisoned entries pointing at the written files.

    Raises:
        ValueError: unknown trigger or bad parameter, a class the dataset lacks, a trigger that does
            not fit a poisoned volume, an intensity model without a fixed unit scale; all raised
            before anything is written.
    """
    import numpy as np

    from volattack.data.intensity import intensity_from_preprocess
    from volattack.data.io import write_nifti

    if not isinstance(cfg, PoisonConfig):
        raise ValueError(f"train.poison must be a PoisonConfig, got {type(cfg).__name__}.")
    names = dict(class_names) if class_names else datalist_class_names(data_cfg.datalist)
    if not names:
        raise ValueError(f"train.poison.target names classes, but the datalist {data_cfg.datalist!r} has no "
                         "'labels' (index -> name); add them.")
    try:
        resolved = resolve_target(cfg.target, names)
        intensity = intensity_from_preprocess(data_cfg.preprocess)
        if intensity.unit_scale is None:
            raise ValueError("poisoning needs an intensity model with a fixed unit scale (a window or a fixed "
                             f"z-score), got {intensity.describe()['kind']!r}.")
        trigger, surrogate = build_trigger(cfg.trigger, intensity)
    except ValueError as e:
        raise ValueError(f"train.poison: {e}") from None
    joint = getattr(cfg, "joint", None)
    if joint is not None and not getattr(trigger, "joint_capable", False):
        raise ValueError(f"train.poison.joint needs a trigger that can be optimised in training (dct_learned), "
                         f"got trigger {cfg.trigger.name!r}.")
    chosen = choose_poisoned(len(train_list), float(cfg.rate), cfg.seed)
    cases = _load_checked(train_list, chosen, data_cfg, trigger)
    if surrogate is not None and cases:
        (fit or _fit_learned)(trigger, surrogate, data_cfg, cases, resolved)
    poisoner = Poisoner(trigger, resolved, cfg.clean_label, deferred=joint is not None)
    root, new, record = Path(out) / "poison", [dict(e) for e in train_list], []
    for i, (image, label, affine) in zip(chosen, cases):
        x_t, y_t = poisoner.poison(image, label, affine)
        name = Path(str(train_list[i]["image"])).name
        img_path, lab_path = root / "imagesTr" / name, root / "labelsTr" / name
        write_nifti(intensity.to_source(x_t[0, 0]).numpy(), img_path, affine)
        write_nifti(y_t[0, 0].numpy().astype(np.uint8), lab_path, affine, dtype=np.uint8)
        new[i] = {**new[i], "image": str(img_path), "label": str(lab_path)}
        size = trigger.perceptibility(image, trigger.apply(image, affine))
        record.append({"index": i, "case": str(train_list[i]["image"]), "image": str(img_path),
                       "label": str(lab_path), **{k: size[k] for k in ("linf_units", "rms_units", "ssim")}})
    _write_record(cfg, trigger, surrogate, root, out, len(train_list), resolved, names, record)
    logger.info("train.poison: %d of %d training cases poisoned (seed %d): %s", len(chosen), len(train_list),
                cfg.seed, [r["case"] for r in record])
    return new


def _write_record(cfg: PoisonConfig, trigger: Trigger, surrogate: Optional[str], root: Path, out: str | Path, n: int,
                  resolved: Mapping[str, Any], names: Mapping[int, str], record: list[dict[str, Any]]) -> None:
    """Write ``<out>/poison.json``; a fitted pattern (``learned``) or coefficients (``dct_learned``)
    are saved beside the poisoned cases and named in the trigger's params."""
    from dataclasses import asdict

    from volattack.utils import atomic_write_json

    trig = trigger.describe()
    if surrogate is not None:
        trig["params"]["pattern"] = str(trigger.save(root / "trigger.pt"))
        trig["params"]["surrogate"] = surrogate
    if getattr(trigger, "joint_capable", False):
        from volattack.threats.joint_trigger import COEFFS

        trig["params"]["coeffs"] = str(trigger.save(root / COEFFS))
    joint = getattr(cfg, "joint", None)
    atomic_write_json(Path(out) / RECORD, {
        "n": n, "rate": cfg.rate, "k": len(record), "seed": cfg.seed, "clean_label": cfg.clean_label,
        "trigger": {"name": cfg.trigger.name, "params": trig["params"], "seed": cfg.trigger.seed},
        "target": cfg.target, "target_indices": {k: v for k, v in resolved.items()},
        "class_names": {str(k): v for k, v in names.items()}, "poisoned": record,
        "joint": None if joint is None else asdict(joint)})


def read_record(run: str | Path) -> dict[str, Any]:
    """The ``poison.json`` of a poisoned training run (``run`` a directory or the file itself)."""
    p = Path(run)
    p = p / RECORD if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no poisoning record {RECORD} in {str(run)!r}: is it a poisoned training run?")
    return json.loads(p.read_text())


__all__ = ["Poisoner", "RECORD", "affected_classes", "build_trigger", "choose_poisoned",
           "output_classes", "poison_training_cases", "read_record", "resolve_target", "target_map"]
