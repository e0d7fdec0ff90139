"""A two-channel nnU-Net v2 model folder (CT plus an MR-like channel, so one channel gets nnU-Net's
CT normalisation and the other its per-image z-score), planned by nnU-Net's own planner with
random weights: volattack's deployed pipeline on the two channel files against
``nnUNetPredictor`` on the same files, the input gradient reaching both channels, and a scan with
the wrong number of channels refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (pip install 'volattack[nnunet]')")

from volattack.data.source import read_scan  # noqa: E402
from volattack.models.sources import load_model  # noqa: E402

from tests.models.test_nnunet import (  # noqa: E402,F401  (fixtures: one thread, nnU-Net's folders)
    SPACINGS,
    _checkpoint,
    _fingerprint,
    _write_nifti,
    nnunet_env,
    one_thread,
)

DATASET_ID = 988
NAME = f"Dataset{DATASET_ID}_VolattackChannels"
LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}


def _mr_like(ct: np.ndarray, seed: int) -> np.ndarray:
    """A second channel on the same grid with other units: an affine map of the CT plus noise."""
    rng = np.random.default_rng(seed)
    return (0.6 * ct + 400.0 + rng.normal(0.0, 15.0, ct.shape)).clip(0, None)


@pytest.fixture(scope="module")
def model_dir(nnunet_env: Path) -> Path:
    """Raw two-channel phantoms, nnU-Net's planner, two folds of random weights."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiments

    from volattack.data.phantoms import generate_phantom

    env = nnunet_env
    raw = env / "raw" / NAME
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for i, sp in enumerate(SPACINGS):
        ph = generate_phantom(i, size=(20, 20, 16), spacing=sp)
        _write_nifti(raw / "imagesTr" / f"c{i}_0000.nii.gz", np.round(ph.image), sp, np.int16)
        _write_nifti(raw / "imagesTr" / f"c{i}_0001.nii.gz", _mr_like(ph.image, i), sp, np.float32)
        _write_nifti(raw / "labelsTr" / f"c{i}.nii.gz", ph.label, sp, np.uint8)
    ds = {"channel_names": {"0": "CT", "1": "T2"}, "labels": LABELS, "numTraining": 3, "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(ds))
    _fingerprint(raw, env / "pre" / NAME, channels=2)
    plan_experiments([DATASET_ID])
    plans = json.loads((env / "pre" / NAME / "nnUNetPlans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [min(4 * 2 ** s, 32) for s in range(len(arch["features_per_stage"]))]
    folder = env / "res" / NAME / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    for f in (0, 1):
        (folder / f"fold_{f}").mkdir(parents=True)
        torch.save(_checkpoint(plans, ds, f, seed=20 + f, in_channels=2), folder / f"fold_{f}" / "checkpoint_final.pth")
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(ds))
    return folder


@pytest.fixture(scope="module")
def channel_files(nnunet_env: Path) -> list[Path]:
    """A held-out case as two channel files (int16 HU and float32), zero border on the CT."""
    from volattack.data.phantoms import generate_phantom

    sp = (1.3, 1.45, 3.1)
    ph = generate_phantom(7, size=(26, 24, 22), spacing=sp)
    ct = np.round(ph.image)
    ct[:2] = 0
    paths = [nnunet_env / "case_0000.nii.gz", nnunet_env / "case_0001.nii.gz"]
    _write_nifti(paths[0], ct, sp, np.int16)
    _write_nifti(paths[1], _mr_like(ph.image, 7), sp, np.float32)
    return paths


def test_two_channel_folder_matches_nnunet_predictor(model_dir, channel_files):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    plans = json.loads((model_dir / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization", "ZScoreNormalization"]
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                           perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(model_dir), use_folds=None)

    def predictor(change=None):  # read afresh: nnUNetPredictor normalises its input array in place
        img, props = SimpleITKIO().read_images([str(p) for p in channel_files])
        if change is not None:
            img[1] = change(img[1])
        seg, probs = pred.predict_single_npy_array(img, props, None, None, True)
        return seg.transpose(2, 1, 0), probs.transpose(0, 3, 2, 1)

    seg_ref, probs_ref = predictor()
    scan = read_scan(channel_files)
    pipe = load_model(model_dir).deploy(scan).eval()
    x = torch.from_numpy(scan.array)[None]
    assert x.shape[1] == 2 and pipe.units == "intensity"  # not every channel is CT
    probs = pipe.probabilities(x)[0].numpy()
    assert probs.shape == probs_ref.shape
    assert len(np.unique(seg_ref)) > 1
    assert (probs.argmax(0) == seg_ref).mean() >= 0.999
    assert np.abs(probs - probs_ref).max() <= 1e-3

    # the second channel matters (a pointwise non-affine change: its z-score is invariant to affine
    # ones): nnUNetPredictor's probabilities move, and ours move with them
    def change(v):
        return v * v / 500.0

    probs_ref2 = predictor(change)[1]
    assert np.abs(probs_ref2 - probs_ref).max() > 1e-2
    x2 = x.clone()
    x2[0, 1] = change(x2[0, 1])
    assert np.abs(pipe.probabilities(x2)[0].numpy() - probs_ref2).max() <= 1e-3


def test_the_gradient_reaches_both_channels(model_dir, channel_files):
    from volattack.attacks.objectives import objective_per_sample

    scan = read_scan(channel_files)
    pipe = load_model(model_dir, folds=[0], use_mirroring=False).deploy(scan).eval()
    x = torch.from_numpy(scan.array)[None].requires_grad_(True)
    y = pipe.predict(x.detach())
    (g,) = torch.autograd.grad(objective_per_sample(pipe(x), y, "dice_ce").sum(), x)
    assert g.shape == x.shape
    assert all(float(g[0, c].abs().max()) > 0 for c in (0, 1))


def test_a_scan_with_another_channel_count_is_refused(model_dir, channel_files):
    with pytest.raises(ValueError, match=r"has 1 channel\(s\); the nnU-Net model expects 2 .*'CT'.*'T2'"):
        load_model(model_dir).deploy(read_scan(channel_files[0]))


def test_a_source_space_attack_writes_channel_files_that_nnunet_scores_as_reported(model_dir, channel_files, tmp_path):
    """``volattack attack MODEL DATALIST pgd --space source --save-adv`` on a case given as two
    channel files: it writes two files in nnU-Net's raw naming, each with its source's dtype, and
    ``nnUNetPredictor`` on them gives the adversarial Dice volattack reported."""
    import nibabel as nib
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from volattack.cli import main
    from volattack.metrics import mean_foreground_dice

    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                           perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(model_dir), use_folds=(0,))

    def nnunet_seg(paths) -> np.ndarray:
        img, props = SimpleITKIO().read_images([str(p) for p in paths])
        return pred.predict_single_npy_array(img, props, None, None, False).transpose(2, 1, 0)

    ct = nib.load(str(channel_files[0]))
    label = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(nnunet_seg(channel_files).astype(np.uint8), ct.affine), str(label))
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"image": [str(p) for p in channel_files], "label": str(label)}]}))
    out = tmp_path / "run"
    rc = main(["attack", str(model_dir), str(datalist), "pgd", "-p", "eps=40", "-p", "alpha=10", "-p", "steps=3",
               "--space", "source", "-m", "folds=[0]", "-m", "use_mirroring=false", "--save-adv", "--out", str(out),
               "--quiet", "--set", "evaluate.figures=false", "--set", "evaluate.sanity_checks=false",
               "--set", "evaluate.source_bounds=[-1024, 3071]"])  # the MR-like channel has no absolute units
    assert rc == 0
    written = sorted((out / "adversarial").iterdir())
    assert [p.name[-12:] for p in written] == ["_0000.nii.gz", "_0001.nii.gz"]
    assert [nib.load(str(p)).header.get_data_dtype() for p in written] == [np.int16, np.float32]
    res = json.loads((out / "results.json").read_text())
    (row,) = res["cases"][0]["attacks"].values()
    lab = torch.as_tensor(np.asarray(nib.load(str(label)).dataobj, dtype=np.int64))[None, None]
    seg = torch.as_tensor(nnunet_seg(written).astype(np.int64))[None, None]
    assert res["cases"][0]["clean"]["dice"] == pytest.approx(1.0, abs=1e-3)  # the label is the clean prediction
    assert row["dice"] < 0.99  # the attack changed the segmentation, so the comparison below can fail
    assert float(mean_foreground_dice(seg, lab, 5)[0]) == pytest.approx(row["dice"], abs=0.005)
