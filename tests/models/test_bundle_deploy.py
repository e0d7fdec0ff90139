"""MONAI bundles as deployed (volattack.models.sources.bundle_deploy): a bundle in the MONAI
model-zoo layout (configs/metadata.json, configs/inference.json with its own transforms and a
SlidingWindowInferer, models/model.pt with random weights of a tiny MONAI UNet) gives the same
segmentation through volattack's deployed pipeline as through MONAI's own bundle runner
(``monai.bundle.ConfigWorkflow`` running the bundle's ``run`` entry on the same file)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from volattack.data.source import read_scan
from volattack.inference.deployed import DeployedPipeline
from volattack.models.sources import load_model
from volattack.models.sources.bundle_deploy import BundleDeployment
from volattack.models.sources.bundle_steps import ImageZScore, LinearIntensity, PadCrop

UNET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "strides": [2],
             "num_res_units": 0}

PREPROCESSING = [
    {"_target_": "LoadImaged", "keys": "image"},
    {"_target_": "EnsureChannelFirstd", "keys": "image"},
    {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
    {"_target_": "Spacingd", "keys": "image", "pixdim": "$[1.5, 1.5, @slice_mm]", "mode": "bilinear"},
    {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": "@window#lo", "a_max": "@window#hi",
     "b_min": 0.0, "b_max": 1.0, "clip": True},
    {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "margin": 1},
    {"_target_": "EnsureTyped", "keys": "image"},
]

CONFIG = {
    "imports": ["$import torch"],
    "bundle_root": ".",
    "output_dir": "$@bundle_root + '/eval'",
    "datalist": [],
    "device": "$torch.device('cpu')",
    "slice_mm": 2.0,
    "window": {"lo": -57, "hi": 164},
    "network_def": {"_target_": "UNet", **UNET_ARGS},
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": PREPROCESSING},
    "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 2, "overlap": 0.25},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
         "separate_folder": False, "resample": False},
    ]},
    # the model zoo loads the weights with an ignite CheckpointLoader handler and runs a
    # SupervisedEvaluator; without pytorch-ignite the same steps as plain expressions:
    "initialize": ["$@network.load_state_dict(torch.load(@bundle_root + '/models/model.pt', weights_only=True))",
                   "$@network.eval()"],
    "run": ["$[@postprocessing({**d, 'pred': @inferer(d['image'][None].to(@device), @network)[0]}) "
            "for d in @dataset]"],
}

META = {
    "version": "0.1.0", "monai_version": "1.6.1", "pytorch_version": "2.13.0", "numpy_version": "2.4.6",
    "name": "tiny_spleen_liver", "task": "segmentation",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                             "spatial_shape": [16, 16, 16], "dtype": "float32", "value_range": [0, 1],
                             "is_patch_data": True, "channel_def": {"0": "image"}}},
        "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3,
                             "spatial_shape": [16, 16, 16], "dtype": "float32", "value_range": [0, 1, 2],
                             "is_patch_data": True, "channel_def": {"0": "background", "1": "spleen", "2": "liver"}}},
    },
}


def _bundle(root: Path, edit=None) -> Path:
    from monai.networks.nets import UNet

    torch.manual_seed(1)
    net = UNet(**UNET_ARGS).eval()
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    cfg = copy.deepcopy(CONFIG)
    if edit is not None:
        edit(cfg)
    (root / "configs" / "inference.json").write_text(json.dumps(cfg, indent=1))
    (root / "configs" / "metadata.json").write_text(json.dumps(META, indent=1))
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def _scan(path: Path) -> Path:
    """An int16 CT in HU: air around an elliptic body with an organ, rotated LPS-like affine
    (oblique: 0.25 rad about z), anisotropic spacing 0.9 x 1.1 x 2.5 mm."""
    rng = np.random.default_rng(0)
    shape = (26, 22, 12)
    i, j, k = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    body = ((i - 13) / 10) ** 2 + ((j - 11) / 8) ** 2 < 1
    organ = ((i - 10) / 4) ** 2 + ((j - 9) / 3) ** 2 + ((k - 6) / 3) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0) + np.where(organ, 80.0, 0.0) + rng.normal(0, 20, shape)
    c, s = np.cos(0.25), np.sin(0.25)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[-c, s, 0], [-s, -c, 0], [0, 0, 1.0]]) @ np.diag([0.9, 1.1, 2.5])
    aff[:3, 3] = [20.0, -15.0, 30.0]
    img = nib.Nifti1Image(np.round(hu).astype(np.int16), aff)
    img.set_sform(aff, 1)
    img.set_qform(aff, 1)
    nib.save(img, str(path))
    return path


def _monai_run(bundle: Path, scan: Path, out: Path, **override) -> np.ndarray:
    """MONAI's own bundle runner on ``scan``; the saved output (``(I, J, K)`` or ``(I, J, K, 3)``)."""
    from monai.bundle import ConfigWorkflow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI deprecation warnings of the bundle's transforms
        wf = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"),
                            meta_file=str(bundle / "configs" / "metadata.json"), workflow_type="infer",
                            bundle_root=str(bundle), datalist=[str(scan)], output_dir=str(out), **override)
        wf.initialize()
        wf.run()
        wf.finalize()
    return np.asarray(nib.load(str(out / "scan_seg.nii.gz")).dataobj)


def _kind(step: dict) -> str:
    """A step's kind (an intensity step's: its model's, e.g. ``"window"``)."""
    return step["model"]["kind"] if step["kind"] == "intensity" else step["kind"]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    bundle, path = _bundle(root / "b"), _scan(root / "scan.nii.gz")
    loaded = load_model(bundle, trust_bundle=True)
    scan = read_scan(path)
    return bundle, path, loaded, scan, loaded.deploy(scan)


def test_segmentation_equals_the_bundle_runner(deployed, tmp_path):
    bundle, path, loaded, scan, pipe = deployed
    assert isinstance(pipe, DeployedPipeline) and pipe.units == "HU"
    assert [_kind(s) for s in pipe.describe()["steps"]] == ["orient", "resample", "window", "pad_crop"]
    seg = _monai_run(bundle, path, tmp_path / "seg")
    # the same run without AsDiscreted saves MONAI's probabilities on the source grid (after Invertd)
    probs = _monai_run(bundle, path, tmp_path / "prob", **{"postprocessing#transforms#2#_disabled_": True})
    x = torch.as_tensor(scan.array)[None]
    ours = pipe.predict(x)[0, 0].numpy()
    with torch.no_grad():
        p_ours = pipe.probabilities(x)[0].numpy()
    assert seg.shape == ours.shape == scan.shape and probs.shape == scan.shape + (3,)
    p_monai = np.moveaxis(probs, -1, 0)
    np.testing.assert_allclose(p_ours, p_monai, atol=1e-5)
    # Invertd pads the cropped-away region with probability 0 for every class: there MONAI's argmax
    # is taken over interpolation round-off (< 1e-8) and volattack's is background
    defined = p_monai.max(0) > 1e-6
    assert defined.mean() > 0.6 and p_monai.max(0)[~defined].max() < 1e-6 and np.all(ours[~defined] == 0)
    assert (ours[defined] == seg[defined]).mean() >= 0.999
    assert len(np.unique(seg[defined])) == 3  # all three classes occur


def _model_grid_check(bundle: Path, path: Path, loaded, pipe) -> None:
    """The model input of volattack's steps equals the bundle's own preprocessing output (values,
    shape, affine), and the head's argmax equals the bundle's own inferer's."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = parser.get_parsed_content("preprocessing")({"image": str(path)})["image"]
    scan = read_scan(path)
    with torch.no_grad():
        model_in = pipe.to_model(torch.as_tensor(scan.array)[None])
        logits = parser.get_parsed_content("inferer")(image[None], loaded.module)
        ours = pipe.head(model_in)
    assert tuple(model_in.shape[1:]) == tuple(image.shape)
    np.testing.assert_allclose(model_in[0].numpy(), image.numpy(), atol=1e-4, rtol=1e-5)
    last = next(s.out_affine for s in reversed(pipe.steps) if s.out_affine is not None)
    np.testing.assert_allclose(last, image.affine.numpy(), atol=1e-5)
    assert (ours.argmax(1) == torch.as_tensor(logits).argmax(1)).float().mean() >= 0.999


def test_model_grid_equals_the_bundles_own_transforms_and_inferer(deployed):
    bundle, path, loaded, _, pipe = deployed
    _model_grid_check(bundle, path, loaded, pipe)


@pytest.mark.parametrize("index, transform, kind", [
    (4, {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True}, "image_zscore"),
    (4, {"_target_": "NormalizeIntensityd", "keys": "image", "subtrahend": 40.0, "divisor": 200.0}, "zscore"),
    (4, {"_target_": "ScaleIntensityRangePercentilesd", "keys": "image", "lower": 5, "upper": 95, "b_min": 0.0,
         "b_max": 1.0, "clip": True}, "percentile"),
    (4, {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0.0, "b_max": 1.0},
     "linear_intensity"),
    (4, {"_target_": "ScaleIntensityd", "keys": "image", "minv": -1.0, "maxv": 1.0}, "image_minmax"),
    (4, {"_target_": "ScaleIntensityd", "keys": "image", "minv": None, "maxv": None, "factor": -0.995},
     "linear_intensity"),
    (6, {"_target_": "DivisiblePadd", "keys": "image", "k": 8}, "pad_crop"),
    (6, {"_target_": "SpatialPadd", "keys": "image", "spatial_size": [20, 12, 18], "method": "end"}, "pad_crop"),
    (5, {"_target_": "CropForegroundd", "keys": "image", "source_key": "image", "k_divisible": 8,
         "select_fn": "$lambda x: x > 0.2"}, "pad_crop"),
])
def test_other_transforms_equal_the_bundles_own(tmp_path, index, transform, kind):
    bundle = _bundle(tmp_path / "b", _replace(index, transform))
    path = _scan(tmp_path / "scan.nii.gz")
    loaded = load_model(bundle, trust_bundle=True)
    pipe = loaded.deploy(read_scan(path))
    assert kind in [_kind(s) for s in pipe.describe()["steps"]]
    _model_grid_check(bundle, path, loaded, pipe)


def test_gradient_wrt_the_source_is_finite(deployed):
    _, _, _, scan, pipe = deployed
    x = torch.as_tensor(scan.array)[None].requires_grad_(True)
    loss = pipe(x)[:, 1].mean()
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert pipe.bounds == (float(scan.array.min()), float(scan.array.max()))


def test_untrusted_bundle_is_refused(tmp_path):
    bundle = _bundle(tmp_path / "b")
    with pytest.raises(ValueError, match=r"trust_bundle is False .*--trust-bundle"):
        load_model(bundle)
    with pytest.raises(ValueError, match=r"trust_bundle is False for bundle '.*b'"):
        BundleDeployment(bundle, bundle / "configs" / "inference.json", torch.nn.Identity())


def _replace(index: int, transform: dict):
    def edit(cfg):
        cfg["preprocessing"]["transforms"][index] = transform
    return edit


@pytest.mark.parametrize("edit, message", [
    (_replace(4, {"_target_": "HistogramNormalized", "keys": "image"}),
     r"bundle '.*b': transform HistogramNormalized \(preprocessing#transforms#4\) \(monai.transforms.*\) has no "
     r"differentiable equivalent"),
    (_replace(6, {"_target_": "torch.nn.Identity"}),  # a class of a known name, not MONAI's
     r"transform Identity \(preprocessing#transforms#6\) \(torch.nn.Identity\) has no differentiable equivalent"),
    (_replace(3, {"_target_": "Spacingd", "keys": "image", "pixdim": [2, 2, 2], "mode": "nearest"}),
     r"transform Spacingd \(preprocessing#transforms#3\): options \{'mode': 'nearest'\} have no differentiable"),
    (lambda cfg: cfg["postprocessing"]["transforms"].insert(3, {"_target_": "KeepLargestConnectedComponentd",
                                                                "keys": "pred"}),
     r"transform KeepLargestConnectedComponentd \(postprocessing#transforms#3\) in the postprocessing changes"),
    (lambda cfg: cfg.update(inferer={"_target_": "SliceInferer", "roi_size": [16, 16]}),
     r"inferer SliceInferer has no differentiable equivalent in volattack"),
])
def test_untranslatable_bundle_is_named(tmp_path, edit, message):
    bundle = _bundle(tmp_path / "b", edit)
    loaded = load_model(bundle, trust_bundle=True)  # still loads for space: model
    scan = read_scan(_scan(tmp_path / "scan.nii.gz"))
    with pytest.raises(ValueError, match=message):
        loaded.deploy(scan)


def test_image_zscore_is_monai_normalize_intensity():
    from monai.transforms import NormalizeIntensity

    x = torch.randn(1, 2, 5, 4, 3, generator=torch.Generator().manual_seed(0))
    x[:, :, 0] = 0.0
    for kw in ({}, {"nonzero": True}, {"channel_wise": True}, {"nonzero": True, "channel_wise": True},
               {"subtrahend": 1.0}):
        ref = NormalizeIntensity(**kw)(x[0])
        torch.testing.assert_close(ImageZScore(**kw)(x)[0], torch.as_tensor(ref), atol=1e-6, rtol=1e-5)


def test_linear_intensity_and_pad_crop():
    from monai.transforms import ScaleIntensityRange

    x = torch.linspace(-300, 300, 60).reshape(1, 1, 5, 4, 3)
    ref = ScaleIntensityRange(-100.0, 200.0, -1.0, 1.0, clip=False)(x[0])
    torch.testing.assert_close(LinearIntensity(-100.0, 200.0, -1.0, 1.0)(x)[0], torch.as_tensor(ref))
    with pytest.raises(ValueError, match="a_max must differ from a_min"):
        LinearIntensity(1.0, 1.0, 0.0, 1.0)
    step = PadCrop([-1, 1, 0], [4, 4, 5], (5, 4, 3), np.eye(4), value=-7.0)
    y = step(x)
    assert y.shape == (1, 1, 5, 3, 5) and torch.all(y[:, :, 0] == -7.0) and torch.all(y[:, :, :, :, 3:] == -7.0)
    torch.testing.assert_close(y[:, :, 1:, :, :3], x[:, :, :4, 1:4, :])
    np.testing.assert_array_equal(step.out_affine[:3, 3], [-1, 1, 0])
    p = torch.full((1, 2) + y.shape[2:], 0.5)
    back = step.invert(p)
    assert back.shape == (1, 2, 5, 4, 3) and torch.all(back[:, 0, :, 0] == 1.0) and torch.all(back[:, 1, :, 0] == 0.0)
    assert torch.all(PadCrop([-1, 1, 0], [4, 4, 5], (5, 4, 3), fill="zero").invert(p)[:, :, :, 0] == 0.0)
    with pytest.raises(ValueError, match="fill must be 'background' or 'zero'"):
        PadCrop([0, 0, 0], [1, 1, 1], (5, 4, 3), fill="nan")
    with pytest.raises(ValueError, match="start/end must be a box overlapping the grid"):
        PadCrop([6, 0, 0], [8, 1, 1], (5, 4, 3))


def _as_dicom(nifti: Path, folder: Path) -> Path:
    """The NIfTI phantom as a CT DICOM series (int16 stored, RescaleIntercept -1024), as scanners write it."""
    import SimpleITK as sitk

    img = nib.load(str(nifti))
    hu = np.asarray(img.dataobj).astype(np.float64)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    vol = sitk.GetImageFromArray(np.ascontiguousarray(hu.T))  # (I, J, K) -> (z, y, x)
    vol.SetSpacing(spacing.tolist())
    vol.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    vol.SetOrigin(lps[:3, 3].tolist())
    d = np.asarray(vol.GetDirection()).reshape(3, 3)
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(hu.shape[2]):
        sl = vol[:, :, k]
        tags = {"0008|0060": "CT", "0020|000e": "1.2.826.0.1.3680043.2.1125.9", "0008|0018": f"1.2.826.0.1.3680043.2.1125.9.{k}",
                "0008|103e": "phantom", "0020|0013": str(k + 1), "0028|1052": "-1024", "0028|1053": "1",
                "0028|0100": "16", "0028|0101": "16", "0028|0102": "15", "0028|0103": "1",
                "0020|0037": "\\".join(f"{v:.12f}" for v in (*d[:, 0], *d[:, 1])),
                "0020|0032": "\\".join(f"{v:.9f}" for v in vol.TransformIndexToPhysicalPoint((0, 0, k)))}
        for key, v in tags.items():
            sl.SetMetaData(key, v)
        writer.SetFileName(str(folder / f"IM{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


def test_dicom_round_trip_through_the_deployed_bundle(tmp_path):
    """A CT DICOM series through the bundle's deployed pipeline, attacked in HU, written back as
    DICOM and read again: the source's shape, geometry and dtype, the quantised values, and the
    Dice of the file read back equal to the Dice of the array the attack reported."""
    from volattack.attacks import create_attack
    from volattack.data.source import write_scan
    from volattack.evaluation.source_passes import quantize_adv
    from volattack.metrics.segmentation import mean_foreground_dice

    bundle, nifti = _bundle(tmp_path / "b"), _scan(tmp_path / "scan.nii.gz")
    scan = read_scan(_as_dicom(nifti, tmp_path / "dicom"))
    ref = read_scan(nifti)
    assert scan.format == "dicom" and scan.shape == ref.shape
    np.testing.assert_array_equal(scan.array, ref.array)
    np.testing.assert_allclose(scan.affine, ref.affine, atol=1e-6)
    loaded = load_model(bundle, trust_bundle=True)
    pipe = loaded.deploy(scan)
    x = torch.as_tensor(scan.array)[None]
    clean = pipe.predict(x)
    atk = create_attack("pgd", pipe, inferer=None, bounds=pipe.bounds, unit_scale=1.0, eps=30.0, alpha=10.0,
                        steps=3, seed=0)
    q = quantize_adv(scan, atk.run(x, clean).adv, x, pipe.bounds, 30.0)
    reported = float(mean_foreground_dice(pipe.predict(torch.as_tensor(q)[None]), clean, 3))
    written = write_scan(scan, q, tmp_path / "adv", description="volattack adversarial: pgd")
    back = read_scan(written)
    assert back.format == "dicom" and back.shape == scan.shape and back.dtype == scan.dtype
    np.testing.assert_allclose(back.affine, scan.affine, atol=1e-6)
    np.testing.assert_array_equal(back.array, q)
    assert 0 < np.abs(back.array - scan.array).max() <= 30.0
    from_disk = float(mean_foreground_dice(loaded.deploy(back).predict(torch.as_tensor(back.array)[None]), clean, 3))
    assert abs(from_disk - reported) <= 0.005 and reported < 1.0


@pytest.mark.parametrize("minv, maxv", [(-1.0, 1.0), (0.0, 1.0), (2.0, None)])
def test_image_minmax_equals_monais_scale_intensity_also_on_a_constant_image(minv, maxv):
    from monai.transforms import ScaleIntensity

    from volattack.models.sources.bundle_steps import ImageMinMax

    step = ImageMinMax(minv, maxv)
    varied = torch.linspace(-3.0, 5.0, 2 * 4 * 4 * 4).reshape(1, 2, 4, 4, 4)
    constant = torch.full((1, 1, 4, 4, 4), 7.0)
    for x in (varied, constant):
        expected = torch.as_tensor(ScaleIntensity(minv=minv, maxv=maxv)(x[0]))[None]
        torch.testing.assert_close(step(x), expected)


@pytest.mark.parametrize("factor", [None, 0.5, -0.25])
def test_scale_intensity_without_bounds_equals_monais_factor_form(factor):
    from monai.transforms import ScaleIntensity

    from volattack.models.sources.bundle_steps import factor_step

    x = torch.linspace(-3.0, 5.0, 2 * 4 * 4 * 4).reshape(1, 2, 4, 4, 4)
    expected = torch.as_tensor(ScaleIntensity(minv=None, maxv=None, factor=factor)(x[0]))[None]
    step = factor_step(factor)
    torch.testing.assert_close(x if step is None else step(x), expected)
    if factor is None:
        assert step is None
        torch.testing.assert_close(expected, x)
