"""The deployed pipeline on the scan's own grid: steps (orientation, resampling, intensity, crop)
against hand-built cases and MONAI's own transforms, their inverses, the pipeline's output and
gradient, and the default pipeline of a volattack checkpoint against today's model-space
preprocessing mapped back with MONAI's inverse transforms."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

import volattack
from volattack.data.config import PreprocessConfig
from volattack.data.intensity import PercentileIntensity, WindowIntensity, ZScoreIntensity
from volattack.data.source import read_scan
from volattack.inference.deployed import DeployedPipeline, SoftmaxHead
from volattack.inference.steps import Crop, Intensity, Orient, Resample, linear_matrix

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def oblique_lps(spacing=(1.4, 1.4, 3.2), angle_deg=7.0) -> np.ndarray:
    t = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-spacing[0], -spacing[1], spacing[2]])
    aff[:3, 3] = [10.0, -20.0, 30.0]
    return aff


def _monai_orient_spacing(x: torch.Tensor, affine: np.ndarray, pixdim=None):
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        o = Orientation(axcodes="RAS")(MetaTensor(x.clone(), affine=torch.as_tensor(affine)))
        return o if pixdim is None else Spacing(pixdim=pixdim, mode="bilinear")(o)


# --------------------------------------------------------------------------- Orient


def test_orient_hand_built_flip_and_permutation():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 1, 2, 3, 4)
    las = np.diag([-2.0, 1.0, 1.0, 1.0])  # i runs toward the left: RAS flips it
    o = Orient.to_codes(las, (2, 3, 4), "RAS")
    assert torch.equal(o(x), torch.flip(x, dims=[2])) and o.out_shape == (2, 3, 4)
    np.testing.assert_allclose(o.out_affine[:3, 0], [2.0, 0.0, 0.0])
    swap = np.array([[0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])  # i along y, j along x
    p = Orient.to_codes(swap, (2, 3, 4), "RAS")
    assert torch.equal(p(x), x.permute(0, 1, 3, 2, 4)) and p.out_shape == (3, 2, 4)
    for step in (o, p):
        assert torch.equal(step.invert(step(x)), x)
    ident = Orient.to_codes(np.eye(4), (2, 3, 4), "RAS")
    assert ident.is_identity and torch.equal(ident(x), x)


def test_orient_equals_monai_orientation_on_an_oblique_lps_scan():
    x = torch.randn(1, 1, 9, 8, 5, generator=torch.Generator().manual_seed(0))
    aff = oblique_lps()
    o = Orient.to_codes(aff, (9, 8, 5), "RAS")
    ref = _monai_orient_spacing(x[0], aff)
    assert torch.equal(o(x)[0], ref.as_tensor())
    np.testing.assert_allclose(o.out_affine, ref.affine.numpy(), atol=1e-6)


# --------------------------------------------------------------------------- Resample


def test_resample_from_matrices_is_the_separable_operator_and_its_adjoint_gradient():
    g = torch.Generator().manual_seed(1)
    mats = [torch.rand(n_out, n_in, generator=g, dtype=torch.float64) for n_out, n_in in ((5, 4), (3, 6), (2, 2))]
    with pytest.raises(ValueError, match="has no inverse"):
        Resample.from_matrices(mats).invert(torch.zeros(1, 1, 5, 3, 2))  # random rows: not an interpolation
    r = Resample.from_matrices(mats, inverse=[m.t() for m in mats])
    x = torch.randn(1, 2, 4, 6, 2, generator=g, requires_grad=True)
    y = r(x)
    ref = torch.einsum("ai,bj,qk,ncijk->ncabq", *[m.float() for m in mats], x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(y)
    (gx,) = torch.autograd.grad((y * w).sum(), x)
    adj = torch.einsum("ai,bj,qk,ncabq->ncijk", *[m.float() for m in mats], w)  # A^T applied per axis
    torch.testing.assert_close(gx, adj, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.invert(w), adj)  # the given inverse (here the adjoint) is what invert applies


def test_resample_linear_inverse_hand_built():
    # 2x upsampling of 3 samples at coordinates 0, .5, 1, 1.5, 2, (2.5 clamped): the inverse reads
    # the output at 0, 2, 4 (exactly the original samples)
    coords = [np.arange(6) / 2.0, np.arange(2, dtype=float), np.arange(1, dtype=float)]
    r = Resample.linear(coords, (3, 2, 1))
    x = torch.tensor([1.0, 3.0, 7.0]).reshape(1, 1, 3, 1, 1).expand(1, 1, 3, 2, 1).contiguous()
    y = r(x)
    torch.testing.assert_close(y[0, 0, :, 0, 0], torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0, 7.0]))
    torch.testing.assert_close(r.invert(y), x)
    np.testing.assert_allclose(r.matrices()[0].numpy(), linear_matrix(coords[0], 3), atol=1e-7)
    m = Resample.from_matrices([linear_matrix(c, n) for c, n in zip(coords, (3, 2, 1))])
    torch.testing.assert_close(m(x), y)
    torch.testing.assert_close(m.invert(y), x)  # default inverse: linear at each row's sampling position


@pytest.mark.parametrize("pixdim", [[1.5, 1.5, 1.5], [0.9, 2.0, 2.7]])
def test_resample_equals_monai_spacing(pixdim):
    x = torch.randn(1, 1, 12, 10, 6, generator=torch.Generator().manual_seed(2))
    aff = oblique_lps()
    o = Orient.to_codes(aff, (12, 10, 6), "RAS")
    r = Resample.like_monai_spacing(o.out_affine, o.out_shape, pixdim)
    ref = _monai_orient_spacing(x[0], aff, pixdim)
    y = r(o(x))
    assert tuple(y.shape[2:]) == tuple(ref.shape[1:])
    torch.testing.assert_close(y[0], ref.as_tensor(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(r.out_affine, ref.affine.numpy(), atol=1e-6)
    ramp = torch.arange(12.0).reshape(1, 1, 12, 1, 1).expand(1, 1, 12, 10, 6).contiguous()
    # a linear function comes back exactly where the output grid covers the input (not past its last sample)
    torch.testing.assert_close(r.invert(r(ramp))[:, :, 1:-1], ramp[:, :, 1:-1], rtol=0, atol=1e-4)


def test_resample_to_the_same_spacing_is_the_identity():
    x = torch.randn(1, 1, 5, 4, 3)
    r = Resample.like_monai_spacing(np.diag([1.4, 1.4, 3.2, 1.0]), (5, 4, 3), [1.4, 1.4, 3.2])
    assert torch.equal(r(x), x) and torch.equal(r.invert(x), x)


def test_resample_bad_inputs():
    with pytest.raises(ValueError, match="matrices must be 3 finite 2-D matrices"):
        Resample.from_matrices([np.eye(2), np.eye(2)])
    with pytest.raises(ValueError, match="inverse must be 3 matrices"):
        Resample.from_matrices([np.eye(2)] * 3, inverse=[np.eye(3)] * 3)
    with pytest.raises(ValueError, match="pixdim must be 3 positive"):
        Resample.like_monai_spacing(np.eye(4), (2, 2, 2), [1.0, -1.0, 1.0])
    shear = np.eye(4)
    shear[0, 1] = 0.5
    with pytest.raises(ValueError, match="orthogonal columns"):
        Resample.like_monai_spacing(shear, (4, 4, 4), [2.0, 2.0, 2.0])
    r = Resample.linear([np.arange(2.0)] * 3, (2, 2, 2))
    with pytest.raises(ValueError, match=r"spatial shape \(2, 2, 2\)"):
        r(torch.zeros(1, 1, 3, 2, 2))


# --------------------------------------------------------------------------- Crop and Intensity


def test_crop_inverts_with_background_probability_one():
    c = Crop([1, 0, 2], [3, 2, 4], (4, 3, 5))
    x = torch.randn(1, 1, 4, 3, 5)
    assert torch.equal(c(x), x[:, :, 1:3, 0:2, 2:4])
    p = torch.softmax(torch.randn(1, 3, 2, 2, 2), 1)
    full = c.invert(p)
    assert full.shape == (1, 3, 4, 3, 5)
    assert torch.equal(full[:, :, 1:3, 0:2, 2:4], p)
    outside = torch.ones(4, 3, 5, dtype=torch.bool)
    outside[1:3, 0:2, 2:4] = False
    assert torch.all(full[0, 0][outside] == 1) and torch.all(full[0, 1:][:, outside] == 0)
    torch.testing.assert_close(full.sum(1), torch.ones(1, 4, 3, 5))
    with pytest.raises(ValueError, match="start/end must be a box"):
        Crop([0, 0, 0], [5, 1, 1], (4, 3, 5))


@pytest.mark.parametrize("model", [WindowIntensity(-175, 250), ZScoreIntensity(40.0, 50.0, clip=(-100.0, 300.0)),
                                   PercentileIntensity(1.0, 99.0)])
def test_intensity_is_differentiable_with_zero_gradient_where_it_clips(model):
    x = torch.linspace(-400, 500, 64).reshape(1, 1, 4, 4, 4).requires_grad_(True)
    step = Intensity(model)
    y = step(x)
    torch.testing.assert_close(y, model.from_source(x.detach()))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(g).all() and (g != 0).any()
    if isinstance(model, WindowIntensity):
        inside = (x > -175) & (x < 250)
        torch.testing.assert_close(g[inside], torch.full_like(g[inside], 1 / 425))
        assert torch.all(g[~inside] == 0)
    assert step.invert(y) is y
    with pytest.raises(ValueError, match="model must be an IntensityModel"):
        Intensity("window")


# --------------------------------------------------------------------------- pipeline


class _Pointwise(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-4.0, 0.0, 4.0]).reshape(3, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([2.0, 0.0, -2.0]))

    def forward(self, x):
        return self.conv(x)


def _toy_pipeline(shape=(6, 5, 4)):
    aff = oblique_lps()
    o = Orient.to_codes(aff, shape, "RAS")
    r = Resample.like_monai_spacing(o.out_affine, o.out_shape, [2.0, 2.0, 2.0])
    steps = [o, r, Intensity(WindowIntensity(-175, 250)), Crop([0, 0, 0], list(r.out_shape[:2]) + [r.out_shape[2] - 1],
                                                              r.out_shape)]
    return DeployedPipeline(steps, SoftmaxHead(_Pointwise().eval()), bounds=(-1024.0, 3071.0), units="HU",
                            describe={"model": "pointwise"})


def test_pipeline_log_probabilities_prediction_and_input_untouched():
    pipe = _toy_pipeline()
    x = torch.linspace(-300, 400, 120).reshape(1, 1, 6, 5, 4)
    x0 = x.clone()
    lp = pipe(x)
    assert lp.shape == (1, 3, 6, 5, 4) and torch.equal(x, x0)
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(1, 6, 5, 4))
    pred = pipe.predict(x)
    assert pred.shape == (1, 1, 6, 5, 4) and pred.dtype == torch.long
    assert torch.equal(pred, lp.argmax(1, keepdim=True))
    d = pipe.describe()
    assert d["model"] == "pointwise" and [s["kind"] for s in d["steps"]] == ["orient", "resample", "intensity", "crop"]
    assert d["units"] == "HU" and d["bounds"] == [-1024.0, 3071.0]


@pytest.mark.parametrize("resample", [True, False])
def test_forward_takes_the_log_early_with_the_same_values_and_gradient(resample):
    from volattack.inference.deployed import MIN_PROB

    shape = (7, 6, 5)
    aff = oblique_lps()
    o = Orient.to_codes(aff, shape, "RAS")
    steps = [o]
    grid = o.out_shape
    if resample:
        steps.append(Resample.like_monai_spacing(o.out_affine, o.out_shape, [2.0, 2.0, 2.0]))
        grid = steps[-1].out_shape
    steps += [Intensity(WindowIntensity(-175, 250)), Crop([1, 0, 1], [grid[0] - 1, grid[1], grid[2] - 1], grid)]
    pipe = DeployedPipeline(steps, SoftmaxHead(_Pointwise().eval()), bounds=(-1024.0, 3071.0), units="HU")
    x = torch.linspace(-300, 400, 210).reshape(1, 1, *shape).requires_grad_(True)
    fast = pipe(x)
    slow = torch.log(pipe.probabilities(x).clamp_min(MIN_PROB))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(fast)
    (g_fast,) = torch.autograd.grad((fast * w).sum(), x)
    (g_slow,) = torch.autograd.grad((slow * w).sum(), x)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-5, atol=1e-7)


def test_pipeline_bad_inputs():
    head = SoftmaxHead(_Pointwise())
    with pytest.raises(ValueError, match="bounds must be"):
        DeployedPipeline([], head, bounds=(1.0, 0.0), units="HU")
    with pytest.raises(ValueError, match="units must be one of"):
        DeployedPipeline([], head, bounds=(0.0, 1.0), units="mm")
    with pytest.raises(ValueError, match="steps must be Step modules"):
        DeployedPipeline([torch.nn.Identity()], head, bounds=(0.0, 1.0), units="HU")
    with pytest.raises(ValueError, match="steps do not chain"):
        DeployedPipeline([Crop([0, 0, 0], [2, 2, 2], (4, 4, 4)), Crop([0, 0, 0], [3, 3, 3], (3, 3, 3))], head,
                         bounds=(0.0, 1.0), units="HU")
    with pytest.raises(ValueError, match="x_src must be a float"):
        _toy_pipeline()(torch.zeros(6, 5, 4))


# --------------------------------------------------------------------------- the default pipeline


@pytest.fixture(scope="module")
def checkpoint_case(tmp_path_factory):
    from volattack.data.phantoms import generate_phantom
    from volattack.models.config import ModelConfig

    root = tmp_path_factory.mktemp("deployed")
    ph = generate_phantom(0, size=(32, 28, 16), spacing=(1.4, 1.4, 3.2))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [31, 27]
    t = np.deg2rad(7)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    aff = rot @ ph.affine @ flip  # the same anatomy stored LPS, oblique
    img = nib.Nifti1Image(np.rint(ph.image[::-1, ::-1]).astype(np.int16), aff)
    img.header.set_data_dtype(np.int16)
    nib.save(img, str(root / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(ph.label[::-1, ::-1].astype(np.uint8), aff), str(root / "label.nii.gz"))
    pre = PreprocessConfig(spacing=[1.6, 1.6, 2.5], roi_size=[16, 16, 16], crop_foreground=True)
    torch.manual_seed(0)
    cfg = ModelConfig(name="unet", in_channels=1, out_channels=5,
                      kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 0})
    net = volattack.create_model(cfg.name, 1, 5, **cfg.kwargs)
    ckpt = volattack.save_checkpoint(root / "m.pt", net, cfg, preprocess=pre)
    return root, pre, ckpt


def test_default_pipeline_equals_model_space_preprocessing_mapped_back(checkpoint_case):
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from volattack.data.transforms import build_transforms
    from volattack.inference import make_inferer
    from volattack.models.deploy import build_pipeline
    from volattack.models.sources import load_model

    root, pre, ckpt = checkpoint_case
    loaded = load_model(ckpt)
    scan = read_scan(root / "ct.nii.gz")
    inferer = make_inferer(pre.roi_size, 4, 0.25, cval=0.0)
    pipe = build_pipeline(loaded, scan, inferer=inferer)
    assert [s.describe()["kind"] for s in pipe.steps] == ["orient", "resample", "intensity", "crop"]
    assert pipe.units == "HU" and pipe.bounds == (float(scan.array.min()), float(scan.array.max()))
    x = torch.as_tensor(scan.array)[None]
    x0 = x.clone()
    tf = build_transforms(pre, mode="eval")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample = tf({"image": str(root / "ct.nii.gz"), "label": str(root / "label.nii.gz")})
    xm = pipe.to_model(x)
    assert xm.shape[1:] == sample["image"].shape
    torch.testing.assert_close(xm[0], sample["image"].as_tensor(), rtol=0, atol=1e-5)
    with torch.no_grad():  # today's model-space prediction, mapped back by MONAI's own inverse transforms
        prob = torch.softmax(inferer(sample["image"].as_tensor()[None], loaded.module), 1)[0]
    sample["pred"] = MetaTensor(prob, meta=sample["image"].meta, applied_operations=sample["image"].applied_operations)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = Invertd(keys="pred", transform=tf, orig_keys="image", nearest_interp=False)(sample)["pred"].as_tensor()
    back[0] += 1 - back.sum(0)  # MONAI pads the crop with 0: give that mass to the background
    pred = pipe.predict(x)[0, 0]
    assert (pred == back.argmax(0)).float().mean() >= 0.999
    torch.testing.assert_close(pipe.probabilities(x)[0], back, rtol=0, atol=1e-5)
    assert torch.equal(x, x0)


def test_default_pipeline_gradient_is_finite_and_nonzero_inside_the_window(checkpoint_case):
    from volattack.models.deploy import build_pipeline
    from volattack.models.sources import load_model

    root, pre, ckpt = checkpoint_case
    loaded = load_model(ckpt)
    scan = read_scan(root / "ct.nii.gz")
    pipe = build_pipeline(loaded, scan)
    y = torch.as_tensor(np.rint(read_scan(root / "label.nii.gz").array)).long()
    x = torch.as_tensor(scan.array)[None].requires_grad_(True)
    loss = torch.nn.functional.nll_loss(pipe(x), y)
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all()
    inside = (x.detach() > -175) & (x.detach() < 250)
    assert (g[inside] != 0).float().mean() > 0.9
    assert not any(p.grad is not None for p in loaded.module.parameters())


def test_build_pipeline_needs_an_intensity_model(checkpoint_case, tmp_path):
    from volattack.models.deploy import build_pipeline, source_bounds
    from volattack.models.sources.base import LoadedModel

    root, pre, ckpt = checkpoint_case
    scan = read_scan(root / "ct.nii.gz")
    bare = LoadedModel.build(_Pointwise(), source="test", path=tmp_path, fmt="test", num_classes=3)
    with pytest.raises(ValueError, match="no known intensity preprocessing"):
        build_pipeline(bare, scan)
    assert source_bounds(scan, (-2000.0, 1000.0)) == (-2000.0, 1000.0)
    assert source_bounds(scan, (-1e6, 1e6)) == (-32768.0, 32767.0)  # within int16
    with pytest.raises(ValueError, match="source_bounds must be"):
        source_bounds(scan, (5.0, 1.0))
    with pytest.raises(ValueError, match="must contain the values"):
        source_bounds(scan, (0.0, 50000.0))
