"""The passes of one case in the scan's own domain (``evaluate.space: source``).

The perturbation is a tensor on the scan's own grid in its own units (HU for CT), and the
attacked function is the deployed segmenter as one differentiable function
(:class:`~volattack.inference.deployed.DeployedPipeline`: the model's reorientation, resampling,
intensity window and crop, sliding-window inference and softmax, and the way back to the scan's
grid). Budgets (``eps``, ``alpha``, ``sigma``) are in source units: ``-p eps=8`` is 8 HU.

Per case:

1. the image and the label are read as :class:`~volattack.data.source.SourceScan` s; the label
   must be on the image's grid (same shape and affine), else the case fails naming both files;
2. the deployed pipeline is built for the scan (``LoadedModel.deploy`` when the model source
   has its own, else :func:`volattack.models.deploy.build_pipeline` with the preprocessing stored
   with the model (a volattack checkpoint's), or the run's ``data.preprocess`` for models that
   carry none);
3. clean prediction on the source grid;
4. every attack runs on the pipeline (``inferer=None``: the pipeline holds the inference;
   ``bounds`` = the pipeline's source bounds; ``unit_scale=1``);
5. the adversarial array is quantised to the scan's stored type (rounded; an L-inf attack's
   rounded perturbation is kept within ``eps``, so the budget holds in the file), written with
   :func:`~volattack.data.source.write_scan` (``adversarial/`` with ``save_adv``, else a temporary
   folder that is removed; an image given as channel files, as nnU-Net's raw data stores
   multi-modal scans, is written back as one file per channel, ``<case>_<attack>_0000.nii.gz``,
   ``..._0001.nii.gz``, each with its own file's type and header), **read back from disk**, and predicted by the deployed pipeline of
   the read-back scan (its crop box recomputed, as the deployed segmenter would): the Dice, HD95
   (mm, source spacing) and perturbation sizes (source units, of the rounded file) in the record
   are those of the file.

The records go through the results schema unchanged, so reports, caches (keyed on ``space`` and
``source_bounds`` with every other ``evaluate`` option) and summaries work as in model space.
Sanity checks: the unbounded PGD runs through the pipeline; the zero-gradient fraction is not
computed (voxels outside the intensity window legitimately have a zero gradient in the scan's
domain, so the model-space threshold does not apply).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from volattack.data.source import scan_suffix
from volattack.evaluation.cases import CaseData, attack_outcome, clean_outcome, score
from volattack.evaluation.passes import CasePasses, slug
from volattack.evaluation.records import CaseRecord, SanityRecord

logger = logging.getLogger(__name__)

#: perturbation sizes of the attack's ``info`` replaced by those of the read-back file
_SIZE_KEYS = ("linf", "rms", "psnr", "ssim", "linf_units", "rms_units", "l2")


def _image_files(image: Any) -> list[str]:
    """The files of a case's ``image``: one path, or a list of channel files."""
    if image is None:
        return []
    return [str(p) for p in image] if isinstance(image, (list, tuple)) else [str(image)]


def _first_image(entry: Mapping[str, Any]) -> Any:
    img = entry.get("image")
    return img[0] if isinstance(img, (list, tuple)) else img


def _scan_paths(entry: Mapping[str, Any]) -> Any:
    """What :func:`~volattack.data.source.read_scan` reads for ``entry``: its image file, or its
    list of channel files."""
    img = entry.get("image")
    return [str(p) for p in img] if isinstance(img, (list, tuple)) else str(img)


def _budget_values(cfg: Any) -> list[tuple[str, str, float]]:
    """``(label, name, eps)`` of every configured attack with an ``eps`` (its default when not given)."""
    from torch import nn

    from volattack.attacks import create_attack

    dummy = nn.Conv3d(1, 1, 1)
    out = []
    for spec in cfg.attacks:
        for label, kw in spec.expand():
            atk = create_attack(spec.name, dummy, **kw)
            eps = getattr(atk, "eps", None)
            if isinstance(eps, (int, float)):
                out.append((label, spec.name, float(eps)))
    return out


def check_units(cfg: Any, units: str, where: str) -> None:
    """Refuse budgets that cannot mean what they say in the scan's domain.

    - ``eps < 1`` on CT (``units == "HU"``): an error, not a warning. Such a value is a model-space
      fraction (``8/255`` = 0.031) read as HU: rounding to the scan's integer HU erases it, so the
      run would cost a full evaluation and report an attack that did nothing.
    - any ``eps`` when the units are unknown (MRI, ``units == "intensity"``) and no
      ``evaluate.source_bounds`` states the scan's range: MRI intensities have no absolute scale, so
      a budget in them means something different in every scan.

    Raises:
        ValueError: naming the attack, ``eps`` and the units.
    """
    budgets = _budget_values(cfg)
    if units == "HU":
        for label, _, eps in budgets:
            if eps < 1:
                raise ValueError(
                    f"evaluate.attacks: {label}: eps={eps:.4g} with space: source is in HU, the scan's own units; "
                    f"it looks like a model-space fraction (8/255 = 0.031), which rounding to the scan's integer "
                    f"HU would erase. Give the budget in HU (e.g. -p eps=8) or use space: model.")
    elif budgets and cfg.source_bounds is None:
        label, _, eps = budgets[0]
        raise ValueError(
            f"evaluate.attacks: {label}: eps={eps:.4g} with space: source needs known source units, but {where} "
            f"has intensities in unknown units ({units!r}: MRI has no absolute scale, so an eps in its units "
            "means something else in every scan). Use space: model, or state the scan's range with "
            "evaluate.source_bounds: [lo, hi].")


def _check_label_grid(entry: Mapping[str, Any]) -> None:
    """Fail when the label's header geometry differs from the image's (both files named)."""
    from volattack.data.source import read_geometry

    img, lab = _first_image(entry), entry.get("label")
    if not img or not lab:
        raise ValueError(f"space: source needs an image and a label per case, got {dict(entry)!r}.")
    gi, gl = read_geometry(img), read_geometry(lab)
    if gi is None or gl is None:
        return
    if gi[0] != gl[0] or not np.allclose(gi[1], gl[1], atol=1e-3):
        raise ValueError(f"label {str(lab)!r} is not on the grid of image {str(img)!r}: shape {gl[0]} vs {gi[0]}, "
                         f"affine\n{gl[1]}\nvs\n{gi[1]}.")


def check_source_run(cfg: Any, cases: Sequence[Mapping[str, Any]], loaded: Any, intensity: Any) -> list[Any]:
    """Every bad input of a ``space: source`` run that can be seen before anything is written: a
    missing model (``loaded``), budgets that do not fit the source units (:func:`check_units`),
    labels on another grid than their images (headers only).

    Returns:
        ``cases`` as a list.

    Raises:
        ValueError: with the reason.
    """
    cases = list(cases)
    if loaded is None:
        raise ValueError("space: source needs the LoadedModel (evaluate(..., loaded=load_model(path))) to build "
                         "its deployed pipeline.")
    own = getattr(loaded.preprocessing, "intensity", None) if loaded.preprocessing.config is not None else None
    units = "HU" if getattr(own or intensity, "units", None) == "HU" else "intensity"
    limit = cfg.max_cases or len(cases)
    if getattr(loaded, "deploy", None) is not None and cases:
        from volattack.data.source import read_scan

        units = loaded.deploy(read_scan(_scan_paths(cases[0]))).units
    check_units(cfg, units, f"model {loaded.info.get('path')!r}")
    for entry in cases[:limit]:
        _check_label_grid(entry)
    return cases


def quantize_adv(scan: Any, adv: torch.Tensor, clean: torch.Tensor, bounds: tuple[float, float],
                 eps: Optional[float] = None) -> np.ndarray:
    """The adversarial array as the scan's stored type holds it: clipped to ``bounds``, rounded to
    the representable values, and (L-inf attacks, ``eps`` given) kept within ``eps`` of the clean
    scan after rounding (the clean values are representable, so ``clean +- floor(eps / step) *
    step`` is).

    Shape:
        adv, clean ``(1, C, I, J, K)`` -> ``(C, I, J, K)`` float32.
    """
    a = adv.detach().cpu().double().numpy()[0]
    c = clean.detach().cpu().double().numpy()[0]
    out = np.empty(a.shape, dtype=np.float32)
    for ch, part in enumerate(scan.channel_scans()):  # channel files may differ in stored type
        lo, hi = bounds
        step = part.grid_step
        if step > 0:  # the grid points inside the bounds
            inter = part.storage()[2]
            lo = np.ceil((lo - inter) / step - 1e-9) * step + inter
            hi = np.floor((hi - inter) / step + 1e-9) * step + inter
        q = part.quantize(np.clip(a[ch:ch + 1], lo, hi)).astype(np.float64)
        if eps is not None:
            k = np.floor(eps / step + 1e-9) * step if step > 0 else eps
            q = np.clip(q, c[ch:ch + 1] - k, c[ch:ch + 1] + k)
        out[ch:ch + 1] = np.clip(q, lo, hi)
    return out


class SourcePasses(CasePasses):
    """The passes of one case with ``evaluate.space: source`` (see the module docstring).

    Args:
        loaded: the :class:`~volattack.models.sources.base.LoadedModel` (its ``deploy`` or its module).
        eval_cfg, preprocess, intensity, num_classes, seed, out, device, class_names: as
            :class:`CasePasses` (``evaluate.goal`` names classes by ``class_names``).
    """

    def __init__(self, loaded: Any, eval_cfg: Any, preprocess: Any, intensity: Any, num_classes: int, seed: int,
                 out: Path, device: torch.device, class_names: Optional[Mapping[int, str]] = None) -> None:
        super().__init__(loaded.module, None, eval_cfg, preprocess, intensity, num_classes, seed, out, device,
                         class_names=class_names)
        self.loaded = loaded
        own = loaded.preprocessing.config  # the model's own preprocessing (a volattack checkpoint) comes first
        if own is not None:
            from volattack.data.intensity import intensity_from_preprocess
            from volattack.inference import make_inferer

            if own != preprocess:
                logger.info("space: source deploys the model with the preprocessing stored with it, not data.preprocess")
            self.deploy_pre, self.deploy_intensity = own, loaded.preprocessing.intensity or intensity_from_preprocess(own)
            self.inferer = make_inferer(own.roi_size, eval_cfg.sw_batch_size, eval_cfg.sw_overlap,
                                        cval=float(self.deploy_intensity.pad_value))
        else:
            self.deploy_pre, self.deploy_intensity = preprocess, intensity
        self.unit_scale = 1.0
        self.case_bounds: dict[str, tuple[float, float]] = {}
        self.bounds = tuple(eval_cfg.source_bounds) if eval_cfg.source_bounds else self.bounds

    @property
    def run_bounds(self) -> tuple[float, float]:
        """The union of the cases' source bounds (``evaluate.source_bounds`` when given)."""
        if self.cfg.source_bounds or not self.case_bounds:
            return tuple(self.bounds)  # type: ignore[return-value]
        return (min(b[0] for b in self.case_bounds.values()), max(b[1] for b in self.case_bounds.values()))

    def _create(self, name: str, model: Any, **kw: Any) -> Any:
        from volattack.attacks import create_attack

        bounds = getattr(model, "bounds", None) or self.bounds
        if self.goal is not None and self.goal.targeted:
            kw.setdefault("targeted", True)
        kw.setdefault("measure_ssim", False)  # the sizes that count are measured on the read-back file
        return create_attack(name, model, inferer=None, bounds=bounds, seed=self.seed, unit_scale=1.0, **kw)

    def pipeline(self, scan: Any) -> Any:
        """The deployed pipeline of ``scan`` on the evaluation device."""
        from volattack.models.deploy import pipeline_for

        pipe = pipeline_for(self.loaded, scan, bounds=self.cfg.source_bounds, preprocess=self.deploy_pre,
                            intensity=self.deploy_intensity, inferer=self.inferer)
        return pipe.to(self.device).eval()

    def read_case(self, entry: Mapping[str, Any]) -> tuple[Any, torch.Tensor]:
        """The image scan and its label ``(1, 1, I, J, K)`` long; the label must share the image's grid."""
        from volattack.data.source import read_scan

        scan = read_scan(_scan_paths(entry))
        lab = read_scan(str(entry.get("label")))
        if lab.shape != scan.shape or not np.allclose(lab.affine, scan.affine, atol=1e-3):
            raise ValueError(f"label {str(lab.path)!r} is not on the grid of image {str(scan.path)!r}: shape "
                             f"{lab.shape} vs {scan.shape}, affine\n{lab.affine}\nvs\n{scan.affine}.")
        y = torch.as_tensor(np.rint(lab.array[:1]).astype(np.int64))[None]
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= self.k:
            raise ValueError(f"case {str(lab.path)!r}: labels must be in [0, {self.k - 1}], got values in [{lo}, {hi}].")
        return scan, y

    # ------------------------------------------------------------------ outputs
    def expected_outputs(self, cid: str, image: Any = None) -> list[str]:
        """Files the configuration asks for case ``cid`` (adversarial scans in the source's format;
        one file per channel, ``_0000``, ``_0001``, ..., for an image given as channel files)."""
        files = _image_files(image)
        if len(files) <= 1:
            return super().expected_outputs(cid, scan_suffix(files[0]) if files else ".nii.gz")
        out = [f for f in super().expected_outputs(cid) if not f.startswith("adversarial/")]
        if self.cfg.save_adv:
            out += [f"adversarial/{cid}_{slug(lbl)}_{c:04d}{scan_suffix(p)}" for lbl, _, _ in self.runs
                    for c, p in enumerate(files)]
        return out

    def missing_outputs(self, record: CaseRecord, entry: Optional[Mapping[str, Any]] = None) -> list[str]:
        b = record.clean.info.get("source_bounds")
        if isinstance(b, list) and len(b) == 2:
            self.case_bounds[record.case] = (float(b[0]), float(b[1]))
        image = entry.get("image") if entry is not None else record.image
        return [f for f in self.expected_outputs(record.case, image) if not (self.out / f).exists()]

    def wants_panel(self, index: int) -> bool:
        return False  # the triplanar panel shows model-input volumes

    def _write_pred(self, cid: str, lbl: str, pred: torch.Tensor, scan: Any) -> str:
        from volattack.data.io import write_nifti

        rel = f"predictions/{cid}_{slug(lbl)}.nii.gz"
        write_nifti(pred[0, 0].to(torch.uint8).cpu().numpy(), self.out / rel, scan.affine, dtype=np.uint8)
        return rel

    # ------------------------------------------------------------------ the passes
    def attack_scan(self, lbl: str, name: str, kw: dict[str, Any], scan: Any, pipe: Any, data: CaseData,
                    index: int, folder: Path, cid: str) -> tuple[Any, torch.Tensor, torch.Tensor, dict[str, Any], list[Path]]:
        """One attack: craft on the pipeline, quantise, write, read back, predict the read-back file.

        Returns:
            ``(read-back scan, its tensor (1, C, I, J, K), its prediction, info, written paths)``
            (one path, or one per channel file).
        """
        from volattack.data.source import read_scan, write_scan
        from volattack.data.source_channels import channel_file_names, write_scan_channels

        atk = self._create(name, pipe, **kw)
        goal = self.case_goal.run_kwargs(atk) if self.case_goal is not None else {}
        res = atk.run(data.image, data.label, seed=self.seed, sample_ids=[index], **goal)
        eps = getattr(atk, "eps", None) if getattr(atk, "linf_budget", False) else None
        q = quantize_adv(scan, res.adv, data.image, pipe.bounds, eps)
        desc = f"volattack adversarial: {lbl}"
        if scan.parts:  # channel files in, channel files out (nnU-Net's raw naming)
            written = write_scan_channels(scan, q, [folder / n for n in channel_file_names(f"{cid}_{slug(lbl)}", scan)],
                                          description=desc)
        else:
            path = folder / f"{cid}_{slug(lbl)}{scan_suffix(scan.path) if scan.format != 'dicom' else ''}"
            written = [write_scan(scan, q, path, description=desc)]
        back = read_scan(written if scan.parts else written[0])
        xb = torch.as_tensor(back.array)[None].to(self.device)
        adv_pipe = self.pipeline(back)
        pred = adv_pipe.predict(xb)
        info = {k: v for k, v in res.info.items() if k not in _SIZE_KEYS}
        info["crafted_linf"] = res.info.get("linf")
        info["crop_changed"] = [s.describe() for s in adv_pipe.steps] != [s.describe() for s in pipe.steps]
        return back, xb, pred, info, written

    def source_sanity(self, pipe: Any, data: CaseData, index: int, case_seed: int) -> SanityRecord:
        """Unbounded PGD through the pipeline (the zero-gradient fraction is not computed here)."""
        rec = SanityRecord()
        if not (self.cfg.sanity_checks and self.cfg.sanity_unbounded_steps > 0):
            return rec
        width = pipe.bounds[1] - pipe.bounds[0]
        atk = self._create("pgd", pipe, eps=width, alpha=width / 8, steps=self.cfg.sanity_unbounded_steps,
                           measure_ssim=False, targeted=False)
        adv = atk.run(data.image, data.label, seed=self.seed, sample_ids=[index]).adv
        rec.unbounded_pgd_dice = clean_outcome(pipe.predict(adv), data, self.k).dice
        return rec

    def run(self, entry: Mapping[str, Any], index: int, cid: str) -> CaseRecord:
        """Every pass of one case in the scan's domain -> its record (without key)."""
        t0 = time.perf_counter()
        scan, y = self.read_case(entry)
        pipe = self.pipeline(scan)
        check_units(self.cfg, pipe.units, f"scan {str(scan.path)!r}")
        data = CaseData(torch.as_tensor(scan.array)[None].to(self.device), y.to(self.device), scan.affine,
                        list(scan.spacing))
        self.case_bounds[cid] = pipe.bounds
        clean_pred = pipe.predict(data.image)
        # the goal on the scan's own grid: its target map, its mask (body above the HU threshold of
        # the source values themselves, near an organ in mm, a box in world mm)
        clean = self.resolve_goal(clean_outcome(clean_pred, data, self.k), data, cid, bounds=pipe.bounds,
                                  units=pipe.units, to_source=lambda t: t)
        record = CaseRecord(case=cid, image=str(entry.get("image")), label=str(entry.get("label")), index=index,
                            seed=self.seed + index, shape=list(scan.shape), spacing_mm=list(scan.spacing),
                            clean=score(clean, clean_row=True))
        record.clean.info = {"source_bounds": list(pipe.bounds), "space": "source", "scan": scan.describe()}
        if self.cfg.save_pred:
            record.outputs.append(self._write_pred(cid, "clean", clean_pred, scan))
        with tempfile.TemporaryDirectory(prefix="volattack_adv_") as tmp:
            folder = self.out / "adversarial" if self.cfg.save_adv else Path(tmp)
            for lbl, name, kw in self.runs:
                _back, xb, adv_pred, info, written = self.attack_scan(lbl, name, kw, scan, pipe, data, index,
                                                                      folder, cid)
                record.attacks[lbl] = score(attack_outcome(adv_pred, xb, info, data, clean, bounds=pipe.bounds,
                                                           unit_scale=1.0))
                if self.cfg.save_adv:
                    record.outputs.extend(str(w.relative_to(self.out)) for w in written)
                if self.cfg.save_pred:
                    record.outputs.append(self._write_pred(cid, lbl, adv_pred, scan))
        record.sanity = self.source_sanity(pipe, data, index, self.seed + index)
        record.seconds = time.perf_counter() - t0
        return record


__all__ = ["SourcePasses", "check_source_run", "check_units", "quantize_adv", "scan_suffix"]
