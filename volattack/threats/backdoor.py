"""Backdoor measures and defences for segmenters: attack success in Dice, spectral signatures,
fine-pruning.

Success (per triggered case, :func:`backdoor_scores`): with ``C`` the voxels the target behaviour
changes (``target != label``) and ``Y`` the voxels where the prediction shows the behaviour's
output classes against the ground truth (``pred != label`` and ``pred`` in the output classes:
background for ``remove``, the new class for ``relabel``, the painted class for ``paint``), the
target Dice is

    backdoor_dice = 2 |C ∩ {pred == target}| / (|C| + |Y|)

(NaN when ``C`` and ``Y`` are empty: the case has nothing to change). A case is a success when
``backdoor_dice >= t`` (t = 0.5 by default); the attack success rate is the share of successes
over the triggered cases with a finite target Dice. The Dice of the untouched organs is the
mean ground-truth Dice of the foreground classes the behaviour does not name.

Spectral signatures (Tran, Li & Madry, NeurIPS 2018): the features of the training cases at a
named layer (a forward hook; global mean over voxels and sliding windows) are centred, the top
right singular vector ``v`` of the centred matrix taken, and each case scored by
``((f_i - mean) . v)^2``; the highest scores are flagged as poisoned (``1.5 x`` the expected
number of poisoned cases, as in the paper).

Fine-pruning (Liu, Dolan-Gavitt & Garg, RAID 2018): the channels of the features a layer consumes
(its input, e.g. the last convolution's) that are least active on clean data (mean |activation|)
are pruned by zeroing their weights in that layer; clean fine-tuning (``volattack train`` with
``train.init_checkpoint``) follows. Zeroed weights are not frozen: fine-tuning may regrow them.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from volattack.checks import check_number
from volattack.ops import first_head
from volattack.threats.poison import affected_classes, output_classes


def backdoor_scores(pred: torch.Tensor, label: torch.Tensor, target: torch.Tensor, resolved: Mapping[str, Any],
                    num_classes: int, threshold: float = 0.5) -> dict[str, float]:
    """``backdoor_dice``, ``backdoor_success`` (1.0 / 0.0, NaN with the Dice) and ``untouched_dice``
    of one triggered case (module docstring).

    Args:
        pred: prediction on the triggered input.
        label: ground truth.
        target: the target map (:func:`volattack.threats.poison.target_map`).
        resolved: the target behaviour in label indices.
        num_classes: K, background included.
        threshold: success threshold t on the target Dice.

    Shape:
        pred, label, target: ``(1, 1, H, W, D)`` integer.
    """
    from volattack.metrics import dice_per_class

    check_number("threshold", threshold, low=0.0, high=1.0, low_open=True)
    changed = target != label
    outs = torch.tensor(sorted(output_classes(resolved)), device=pred.device)
    shows = (pred != label) & torch.isin(pred, outs)
    hit = changed & (pred == target)
    denom = int(changed.sum()) + int(shows.sum())
    td = float("nan") if denom == 0 else 2.0 * int(hit.sum()) / denom
    per = dice_per_class(pred, label, num_classes)[0]
    keep = [c - 1 for c in range(1, num_classes) if c not in affected_classes(resolved)]
    vals = [float(per[i]) for i in keep if not math.isnan(float(per[i]))]
    return {"backdoor_dice": td, "backdoor_success": float("nan") if math.isnan(td) else float(td >= threshold),
            "untouched_dice": sum(vals) / len(vals) if vals else float("nan")}


def success_rate(target_dice: Sequence[float], threshold: float = 0.5) -> float:
    """Share of the cases with a finite target Dice that reach ``threshold`` (NaN if none)."""
    vals = [float(v) for v in target_dice if not math.isnan(float(v))]
    return float("nan") if not vals else sum(v >= threshold for v in vals) / len(vals)


def layer_names(model: nn.Module) -> list[str]:
    """The named submodules of ``model`` (``named_modules`` order, the root excluded)."""
    return [n for n, _ in model.named_modules() if n]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name``; an unknown name raises ``ValueError`` listing the layer names."""
    mods = dict(model.named_modules())
    if not name or name not in mods:
        from volattack.registry import suggest

        raise ValueError(f"layer {name!r} is not a layer of the model.{suggest(str(name), mods)} "
                         f"Layers: {', '.join(layer_names(model))}.")
    return mods[name]


@contextlib.contextmanager
def FeatureHook(model: nn.Module, name: str, *, inputs: bool = False) -> Iterator[list[torch.Tensor]]:
    """Collect the output (or, with ``inputs``, the first input) of layer ``name`` on every forward
    pass inside the ``with`` block; the hook is removed on exit.

    Yields:
        The list the captured tensors (detached) are appended to.
    """
    layer = get_layer(model, name)
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple, out: Any) -> None:
        t = args[0] if inputs else first_head(out)
        got.append(t.detach())

    handle = layer.register_forward_hook(hook)
    try:
        yield got
    finally:
        handle.remove()


def case_features(model: nn.Module, layer: str, images: Sequence[torch.Tensor],
                  forward: Optional[Callable[[torch.Tensor], Any]] = None) -> torch.Tensor:
    """Per case, the mean over voxels and forward passes (sliding windows) of the features of ``layer``.

    Args:
        model: the segmenter (eval mode is set inside and restored).
        layer: a layer name (:func:`layer_names`).
        images: model inputs ``(1, C, H, W, D)``.
        forward: ``forward(x)`` runs the model on ``x`` (e.g. its sliding-window inference);
            default ``model(x)``.

    Shape:
        ``(n, F)`` float64, F the layer's channels.
    """
    get_layer(model, layer)
    was = model.training
    model.eval()
    feats = []
    try:
        with torch.no_grad():
            for x in images:
                with FeatureHook(model, layer) as got:
                    (forward or model)(x)
                feats.append(torch.stack([g.double().flatten(2).mean(2).mean(0) for g in got]).mean(0))
    finally:
        model.train(was)
    return torch.stack(feats)


def spectral_signature_scores(features: torch.Tensor) -> torch.Tensor:
    """Tran et al.'s outlier score of each row: ``((f_i - mean) . v)^2``, ``v`` the top right
    singular vector of the centred features.

    Shape:
        ``(n, F)`` -> ``(n,)`` float64.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (n >= 2, F), got shape {tuple(features.shape)}.")
    centred = features.double() - features.double().mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[0]).pow(2)


def precision_recall(flagged: Sequence[int], poisoned: Sequence[int]) -> dict[str, float]:
    """Precision and recall of the flagged case indices against the truly poisoned ones
    (precision NaN when nothing is flagged, recall NaN when nothing is poisoned)."""
    f, p = set(int(i) for i in flagged), set(int(i) for i in poisoned)
    tp = len(f & p)
    return {"precision": tp / len(f) if f else float("nan"), "recall": tp / len(p) if p else float("nan"),
            "n_flagged": len(f), "n_poisoned": len(p), "true_positives": tp}


def spectral_signatures(features: torch.Tensor, poisoned: Sequence[int], n_flag: Optional[int] = None
                        ) -> dict[str, Any]:
    """Flag the ``n_flag`` highest spectral-signature scores (default ``ceil(1.5 x len(poisoned))``,
    at least 1) and score the flags against the truly poisoned case indices.

    Returns:
        ``{"scores": [...], "flagged": [...], "precision", "recall", ...}``.
    """
    scores = spectral_signature_scores(features)
    k = max(1, math.ceil(1.5 * len(poisoned))) if n_flag is None else int(n_flag)
    if not 1 <= k <= len(scores):
        raise ValueError(f"n_flag must be in [1, {len(scores)}], got {n_flag!r}.")
    flagged = sorted(torch.argsort(scores, descending=True)[:k].tolist())
    return {"scores": [float(s) for s in scores], "flagged": flagged, **precision_recall(flagged, poisoned)}


def fine_prune(model: nn.Module, layer: str, images: Sequence[torch.Tensor], fraction: float,
               forward: Optional[Callable[[torch.Tensor], Any]] = None) -> tuple[nn.Module, list[int]]:
    """Fine-pruning's pruning step (module docstring) on a copy of ``model``.

    Args:
        model: the (possibly backdoored) segmenter; not modified.
        layer: a ``Conv3d`` or ``ConvTranspose3d`` layer whose input channels are pruned (e.g. the last
            convolution, whose input is the penultimate feature map).
        images: clean model inputs ``(1, C, H, W, D)`` that measure the activations.
        fraction: share of the input channels to prune, in [0, 1).
        forward: how to run the model (default ``model(x)``), e.g. its sliding-window inference;
            it must accept the copy as ``forward(x, net)`` when given.

    Returns:
        ``(pruned copy, pruned channel indices)``.
    """
    check_number("fraction", fraction, low=0.0, high=1.0, high_open=True)
    net = copy.deepcopy(model)
    mod = get_layer(net, layer)
    if not isinstance(mod, (nn.Conv3d, nn.ConvTranspose3d)):
        raise ValueError(f"layer {layer!r} must be a Conv3d or ConvTranspose3d, got {type(mod).__name__}.")
    was = net.training
    net.eval()
    acts = []
    with torch.no_grad():
        for x in images:
            with FeatureHook(net, layer, inputs=True) as got:
                forward(x, net) if forward is not None else net(x)
            acts.append(torch.stack([g.double().abs().flatten(2).mean(2).mean(0) for g in got]).mean(0))
    net.train(was)
    activity = torch.stack(acts).mean(0)
    k = int(math.floor(fraction * activity.numel()))
    pruned = sorted(torch.argsort(activity)[:k].tolist())
    with torch.no_grad():
        w = mod.weight
        if isinstance(mod, nn.ConvTranspose3d):  # (in, out, k, k, k)
            w[pruned] = 0
        else:  # (out, in, k, k, k)
            w[:, pruned] = 0
    return net, pruned


__all__ = ["FeatureHook", "backdoor_scores", "case_features", "fine_prune", "get_layer", "layer_names",
           "precision_recall", "spectral_signature_scores", "spectral_signatures", "success_rate"]
