"""The ``nnunet`` model source against nnU-Net v2 itself: a model folder planned by nnU-Net's own
planner on tiny phantoms (two folds, random weights), volattack's deployed pipeline compared with
``nnUNetPredictor`` on a NIfTI file, the exact input gradient, the resampling operator against
nnU-Net's resampling function, and every bad-input path."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (pip install 'volattack[nnunet]')")

from volattack.data.source import read_scan  # noqa: E402
from volattack.models.sources import load_model  # noqa: E402

DATASET_ID = 987
NAME = f"Dataset{DATASET_ID}_VolattackTest"
SPACINGS = [(1.5, 1.5, 3.0), (1.4, 1.4, 3.3), (1.6, 1.6, 2.8)]


def _write_nifti(path: Path, array: np.ndarray, spacing, dtype) -> None:
    import nibabel as nib

    aff = np.diag([*spacing, 1.0])
    img = nib.Nifti1Image(array.astype(dtype), aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    nib.save(img, str(path))


def _fingerprint(raw: Path, out: Path, channels: int = 1) -> None:
    """nnU-Net's per-case fingerprint (``DatasetFingerprintExtractor.analyze_case``) in this process
    (its ``run`` spawns a worker pool, which costs more than the tiny cases) and the per-channel
    dataset statistics ``run`` derives from it; images ``c{i}_{channel:04d}.nii.gz``."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    res = [DatasetFingerprintExtractor.analyze_case([str(raw / "imagesTr" / f"c{i}_{c:04d}.nii.gz") for c in range(channels)],
                                                    str(raw / "labelsTr" / f"c{i}.nii.gz"), SimpleITKIO, 10000)
           for i in range(len(SPACINGS))]
    props = {}
    for c in range(channels):
        fg = np.concatenate([r[2][c] for r in res])
        lo, med, hi = np.percentile(fg, (0.5, 50.0, 99.5))
        props[str(c)] = {"mean": float(fg.mean()), "median": float(med), "std": float(fg.std()),
                         "min": float(fg.min()), "max": float(fg.max()), "percentile_99_5": float(hi),
                         "percentile_00_5": float(lo)}
    out.mkdir(parents=True)
    (out / "dataset_fingerprint.json").write_text(json.dumps({
        "spacings": [[float(v) for v in r[1]] for r in res], "shapes_after_crop": [[int(v) for v in r[0]] for r in res],
        "foreground_intensity_properties_per_channel": props,
        "median_relative_size_after_cropping": float(np.median([r[4] for r in res]))}))


def _plan(root: Path) -> dict:
    """Raw dataset of 3 tiny phantoms, nnU-Net's fingerprint and planner; plans with widths 4-32."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiments

    from volattack.data.phantoms import generate_phantom

    raw = root / "raw" / NAME
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for i, sp in enumerate(SPACINGS):
        ph = generate_phantom(i, size=(20, 20, 16), spacing=sp)
        _write_nifti(raw / "imagesTr" / f"c{i}_0000.nii.gz", np.round(ph.image), sp, np.int16)
        _write_nifti(raw / "labelsTr" / f"c{i}.nii.gz", ph.label, sp, np.uint8)
    ds = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3,
                                                   "kidney_right": 4}, "numTraining": 3, "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(ds))
    _fingerprint(raw, root / "pre" / NAME)
    plan_experiments([DATASET_ID])
    plans = json.loads((root / "pre" / NAME / "nnUNetPlans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [min(4 * 2 ** s, 32) for s in range(len(arch["features_per_stage"]))]
    return plans


def _checkpoint(plans: dict, ds: dict, fold: int, seed: int, mirror=(0, 2), in_channels: int = 1) -> dict:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    a = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(seed)
    net = get_network_from_plans(a["network_class_name"], a["arch_kwargs"], a["_kw_requires_import"], in_channels, 5,
                                 allow_init=True, deep_supervision=False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return {"network_weights": net.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
            "logging": {"ema_fg_dice": [np.float32(0.5)], "mean_fg_dice": [np.float64(0.4)]},
            "_best_ema": np.float32(0.5), "current_epoch": 1,
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold, "dataset_json": ds,
                          "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": mirror}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: the many small network passes slow down by an order of
    magnitude when two threads share an oversubscribed CPU (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("nnunet")
    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res"), "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield root


@pytest.fixture(scope="module")
def model_dir(nnunet_env: Path) -> Path:
    """A model folder as nnU-Net writes it: dataset.json, plans.json, fold_0 and fold_1."""
    plans = _plan(nnunet_env)
    ds = json.loads((nnunet_env / "raw" / NAME / "dataset.json").read_text())
    folder = nnunet_env / "res" / NAME / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    for f in (0, 1):
        (folder / f"fold_{f}").mkdir(parents=True)
        torch.save(_checkpoint(plans, ds, f, seed=10 + f), folder / f"fold_{f}" / "checkpoint_final.pth")
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(ds))
    return folder


@pytest.fixture(scope="module")
def scan_file(nnunet_env: Path) -> Path:
    """A held-out CT (int16 HU) on another spacing, with a zero border (nnU-Net crops it)."""
    from volattack.data.phantoms import generate_phantom

    ph = generate_phantom(7, size=(26, 24, 22), spacing=(1.3, 1.45, 3.1))
    img = np.round(ph.image)
    img[:2] = 0
    img[:, :, -3:] = 0
    path = nnunet_env / "case_0000.nii.gz"
    _write_nifti(path, img, (1.3, 1.45, 3.1), np.int16)
    return path


def _nnunet_predict(folder: Path, path: Path, folds=None, step=0.5, mirroring=True):
    """nnUNetPredictor's segmentation and probabilities, moved to the scan's (i, j, k) order."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pred = nnUNetPredictor(tile_step_size=step, use_gaussian=True, use_mirroring=mirroring,
                           perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(folder), use_folds=folds)
    img, props = SimpleITKIO().read_images([str(path)])
    seg, probs = pred.predict_single_npy_array(img, props, None, None, True)
    return seg.transpose(2, 1, 0), probs.transpose(0, 3, 2, 1)


@pytest.fixture(scope="module")
def reference(model_dir: Path, scan_file: Path):
    return _nnunet_predict(model_dir, scan_file)


@pytest.mark.parametrize("fp16", [True, False])
def test_clean_segmentation_matches_nnunet_predictor(model_dir, scan_file, reference, fp16):
    loaded = load_model(model_dir, fp16_accumulation=fp16)
    assert loaded.info["folds"] == [0, 1] and loaded.info["mirror_axes"] == [0, 2]
    scan = read_scan(scan_file)
    pipe = loaded.deploy(scan).to("cpu").eval()  # as the evaluation moves it
    x = torch.from_numpy(scan.array)[None]
    probs = pipe.probabilities(x)[0].numpy()
    seg_ref, probs_ref = reference
    assert probs.shape == probs_ref.shape
    # float32 accumulation differs where nnU-Net's float16 gaussian weights underflow (the corners of
    # a window that no other window covers: here the one window is the whole volume)
    diff = np.abs(probs - probs_ref)
    assert (probs.argmax(0) == seg_ref).mean() >= (0.999 if fp16 else 0.99)
    assert (diff.max() <= 1e-3) if fp16 else (np.mean(diff <= 5e-3) >= 0.99)
    assert len(np.unique(seg_ref)) > 1  # the comparison is not trivially all background
    assert pipe.head.num_windows > 1 and len(pipe.head.flips) == 4 and pipe.describe()["crop"] != [[0, 0, 0], [22, 24, 26]]
    assert pipe.units == "HU" and torch.equal(pipe.predict(x)[0, 0], torch.from_numpy(probs.argmax(0)))


def test_one_fold_no_mirroring_step_one(model_dir, scan_file):
    seg_ref, probs_ref = _nnunet_predict(model_dir, scan_file, folds=(1,), step=1.0, mirroring=False)
    pipe = load_model(model_dir, folds=[1], use_mirroring=False, tile_step_size=1.0).deploy(read_scan(scan_file))
    probs = pipe.probabilities(torch.from_numpy(read_scan(scan_file).array)[None])[0].numpy()
    assert np.abs(probs - probs_ref).max() <= 1e-3
    assert pipe.head.flips == [()] and len(pipe.head.networks) == 1


def _reference_head(head, x):
    """Plain autograd through the same computation (float32 accumulation)."""
    r = head._pad(head.resize_in(x).float())
    count = head._count_map(torch.float32)
    g = head.gauss16.float()
    total = 0
    for net in head.networks:
        acc = torch.zeros((1, 5) + tuple(r.shape[2:]))
        for sl in head._layout["slicers"]:
            idx = (slice(None), slice(None)) + sl
            pad = [v for d in reversed(range(3)) for v in (sl[d].start, r.shape[2 + d] - sl[d].stop)]
            acc = acc + torch.nn.functional.pad(head._mirrored(net, r[idx]) * g, pad)
        total = total + acc / count
    logits = head.resize_out(head._unpad(total / len(head.networks))).float()
    return torch.softmax(logits, dim=1)


def test_input_gradient_is_exact(model_dir, scan_file):
    """The window/flip/fold-wise VJP equals plain autograd through the same computation (float32
    finite differences of these rough random networks are too noisy to be a test)."""
    scan = read_scan(scan_file)
    pipe = load_model(model_dir, fp16_accumulation=False).deploy(scan)
    x0 = torch.from_numpy(scan.array)[None]
    w = torch.randn((1, 5) + tuple(x0.shape[2:]), generator=torch.Generator().manual_seed(0))
    x = x0.clone().requires_grad_(True)
    (pipe(x) * w).sum().backward()
    xr = x0.clone().requires_grad_(True)
    p_ref = pipe.to_source(_reference_head(pipe.head, pipe.to_model(xr)))
    (torch.log(p_ref.clamp_min(1e-12)) * w).sum().backward()
    assert x.grad.abs().max() > 0
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-3, atol=1e-5 * float(xr.grad.abs().max()))


def _grad(pipe, x0, w):
    x = x0.clone().requires_grad_(True)
    (pipe(x) * w).sum().backward()
    return x.grad


def test_kept_activations_give_the_same_gradient(model_dir, scan_file):
    """Keeping every pass's graph, some of them, or none (every pass recomputed) gives the same
    input gradient, and the budget decides how many passes are kept."""
    scan = read_scan(scan_file)
    x0 = torch.from_numpy(scan.array)[None]
    w = torch.randn((1, 5) + tuple(x0.shape[2:]), generator=torch.Generator().manual_seed(1))
    full = load_model(model_dir, fp16_accumulation=False).deploy(scan)
    g_all = _grad(full, x0, w)
    passes = full.head.network_passes()
    assert full.head.last_kept == passes and full.head.last_pass_bytes > 0
    per_pass_mb = full.head.last_pass_bytes / 2 ** 20
    part = load_model(model_dir, fp16_accumulation=False, keep_activations_mb=2.5 * per_pass_mb).deploy(scan)
    g_part = _grad(part, x0, w)
    assert part.head.last_kept == 2
    none = load_model(model_dir, fp16_accumulation=False, keep_activations_mb="0").deploy(scan)
    g_none = _grad(none, x0, w)
    assert none.head.last_kept == 0 and none.head.last_pass_bytes is None
    assert g_all.abs().max() > 0
    torch.testing.assert_close(g_part, g_all, rtol=1e-5, atol=1e-7 * float(g_all.abs().max()))
    torch.testing.assert_close(g_none, g_all, rtol=1e-5, atol=1e-7 * float(g_all.abs().max()))
    # a second step starts from an empty cache (the graphs of the first were released)
    torch.testing.assert_close(_grad(full, x0, w), g_all, rtol=1e-5, atol=1e-7 * float(g_all.abs().max()))
    assert "keep_activations_mb" not in full.describe()["head"]  # the result does not depend on it


@pytest.mark.parametrize("bad", [-1, "many", float("nan"), True])
def test_bad_keep_activations_is_named(model_dir, bad):
    with pytest.raises(ValueError, match="keep_activations_mb"):
        load_model(model_dir, keep_activations_mb=bad)


@pytest.mark.parametrize("bad, match", [(-1, "mmap_threshold_mb must be >= 0, got -1"),
                                        (64, "mmap_threshold_mb must be <= 32, got 64"), ("x", "mmap_threshold_mb")])
def test_bad_mmap_threshold_is_named(model_dir, bad, match):
    with pytest.raises(ValueError, match=match):
        load_model(model_dir, mmap_threshold_mb=bad)


def test_deploying_sets_the_mmap_threshold_once_when_asked(model_dir, scan_file, monkeypatch):
    import volattack.models.nnunet_deploy as nd
    import volattack.utils

    calls = []
    monkeypatch.setattr(volattack.utils, "set_mmap_threshold", lambda n: calls.append(n) or True)
    monkeypatch.setattr(nd, "_HEAP_SET", [])
    scan = read_scan(scan_file)
    load_model(model_dir, mmap_threshold_mb=0).deploy(scan)
    assert calls == []  # 0 leaves the C allocator alone
    loaded = load_model(model_dir, mmap_threshold_mb=2)
    loaded.deploy(scan)
    loaded.deploy(scan)
    assert calls == [2 * 2 ** 20] and loaded.info["mmap_threshold_mb"] == 2.0  # once per process and value
    default = load_model(model_dir)
    default.deploy(scan)
    assert calls == [2 * 2 ** 20, 2 ** 20] and default.info["mmap_threshold_mb"] == 1.0  # the default: 1 MiB


def test_set_mmap_threshold_reports_whether_glibc_took_it(monkeypatch):
    import platform

    import volattack.utils as vu

    if platform.libc_ver()[0] == "glibc":
        assert vu.set_mmap_threshold(32 * 2 ** 20) is True  # glibc's own dynamic ceiling: what a process has anyway
    monkeypatch.setattr(vu, "_LIBC", [None])  # another C library
    assert vu.set_mmap_threshold(2 ** 20) is False


def test_the_kept_passes_arena_is_reused_by_the_next_step_and_never_shared(model_dir, scan_file):
    """After a backward the head keeps the arena for the next forward (its pages stay resident);
    two forwards alive at once never share it; the gradients are those of a fresh head."""
    scan = read_scan(scan_file)
    x0 = torch.from_numpy(scan.array)[None]
    w = torch.randn((1, 5) + tuple(x0.shape[2:]), generator=torch.Generator().manual_seed(2))
    pipe = load_model(model_dir, fp16_accumulation=False).deploy(scan)
    ref = _grad(load_model(model_dir, fp16_accumulation=False).deploy(scan), x0, w)
    assert pipe.head._spare_arena is None
    g1 = _grad(pipe, x0, w)
    arena = pipe.head._spare_arena
    assert arena is not None and pipe.head.last_kept == pipe.head.network_passes()
    g2 = _grad(pipe, x0 * 0.5, w)  # a different input through the reused arena
    assert pipe.head._spare_arena.data_ptr() == arena.data_ptr()
    torch.testing.assert_close(g1, ref)
    torch.testing.assert_close(g2, _grad(load_model(model_dir, fp16_accumulation=False).deploy(scan), x0 * 0.5, w))
    xa, xb = x0.clone().requires_grad_(True), (x0 * 0.5).requires_grad_(True)
    la, lb = (pipe(xa) * w).sum(), (pipe(xb) * w).sum()  # both alive: the second got its own arena
    assert pipe.head._spare_arena is None
    lb.backward()
    la.backward()
    torch.testing.assert_close(xa.grad, ref)
    torch.testing.assert_close(xb.grad, g2)


class _FakeLibc:
    """Records ``mallopt`` calls (``(param, value)``)."""

    def __init__(self) -> None:
        self.calls: list = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_heap_allocations_lifts_the_threshold_inside_and_restores_it(monkeypatch):
    import volattack.utils as vu

    lib = _FakeLibc()
    monkeypatch.setattr(vu, "_LIBC", [lib])
    monkeypatch.setattr(vu, "_THRESHOLD", [])
    with vu.heap_allocations():
        pass
    assert lib.calls == []  # nothing set: glibc's defaults are left alone
    assert vu.set_mmap_threshold(2 ** 20) and lib.calls == [(-3, 2 ** 20), (-1, 64 * 2 ** 20)]  # trim: glibc's max
    del lib.calls[:]
    with pytest.raises(RuntimeError, match="inside"):
        with vu.heap_allocations():
            assert lib.calls[-1] == (-3, 32 * 2 ** 20)  # the heap again, up to glibc's ceiling
            raise RuntimeError("inside")
    assert lib.calls == [(-3, 32 * 2 ** 20), (-3, 2 ** 20)]  # restored, also after an error
    vu.set_mmap_threshold(32 * 2 ** 20)
    with vu.heap_allocations():
        pass
    assert len(lib.calls) == 4  # a threshold at the ceiling: nothing to lift


def test_every_network_pass_and_its_backward_run_on_the_heap(model_dir, scan_file, monkeypatch):
    """With a low mmap threshold only the volume-sized buffers are mapped: each window's network
    passes (forward, kept or recomputed, and backward) run inside ``heap_allocations``."""
    import contextlib

    import volattack.inference.nnunet_head as nh

    depth = [0]
    seen = {"forward": 0, "backward": 0, "outside": 0}

    @contextlib.contextmanager
    def bracket():
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    def check(kind):
        seen[kind if depth[0] > 0 else "outside"] += 1

    class Watched(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            check("forward")
            y = self.net(x)
            if y.requires_grad:
                y.register_hook(lambda g: check("backward"))
            return y

    monkeypatch.setattr(nh, "heap_allocations", bracket)
    scan = read_scan(scan_file)
    x0 = torch.from_numpy(scan.array)[None]
    full = load_model(model_dir, fp16_accumulation=False).deploy(scan)
    for keep in (None, 0.0):  # every pass kept; then every pass recomputed in the backward
        kw = {} if keep is None else {"keep_activations_mb": keep}
        pipe = full if keep is None else load_model(model_dir, fp16_accumulation=False, **kw).deploy(scan)
        pipe.head.networks = torch.nn.ModuleList([Watched(n) for n in pipe.head.networks])
        x = x0.clone().requires_grad_(True)
        pipe(x).sum().backward()
    passes = full.head.network_passes()
    assert full.head.last_kept == passes  # the first run kept every pass: one forward each
    # kept: 1 forward per pass; recomputed: the forward without grad and the recomputation
    assert seen == {"forward": 3 * passes, "backward": 2 * passes, "outside": 0}


@pytest.mark.parametrize("spacings", [((1.5, 1.5, 3.0), (1.2, 1.4, 2.5)), ((4.5, 1.0, 1.0), (1.5, 1.2, 0.8))])
def test_resampling_operator_is_nnunets(spacings):
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, resample_data_or_seg_to_shape

    from volattack.inference.nnunet_steps import NnunetResize

    cur, new = spacings
    x = np.random.default_rng(0).normal(size=(1, 11, 14, 9)).astype(np.float32)
    shape = tuple(int(v) for v in compute_new_shape(x.shape[1:], cur, new))
    ref = resample_data_or_seg_to_shape(x, shape, cur, new, is_seg=False, order=3, order_z=0, force_separate_z=None)
    op = NnunetResize.plan(x.shape[1:], shape, cur, new, order=3, order_z=0)
    assert (op.separate_axis is not None) == (max(cur) / min(cur) > 3)
    np.testing.assert_array_equal(op(torch.from_numpy(x)[None]).float().numpy()[0], ref)
    g = torch.randn((1, 1) + shape, dtype=torch.float64)
    xt = torch.from_numpy(x)[None].double().requires_grad_(True)
    lin = NnunetResize.plan(x.shape[1:], shape, cur, new, order=1, order_z=0)
    (lin(xt) * g).sum().backward()  # order 1 never clips: the adjoint is the exact transpose
    torch.testing.assert_close(lin.adjoint(g), xt.grad)


@pytest.mark.parametrize("reader", ["SimpleITKIO", "NibabelIO", "NibabelIOWithReorient"])
@pytest.mark.parametrize("tf", [[0, 1, 2], [2, 0, 1], [1, 2, 0]])
def test_reader_axis_order(reader, tf):
    from volattack.models.nnunet_deploy import reader_steps

    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    aff = np.diag([-1.0, 2.0, 3.0, 1.0]) if reader == "NibabelIOWithReorient" else np.diag([1.0, 2.0, 3.0, 1.0])
    steps, shape, _, spacing = reader_steps(reader, tf, a.shape, aff, (1.0, 2.0, 3.0))
    x = torch.from_numpy(a)[None, None]
    for s in steps:
        x = s(x)
    ref = (a[::-1] if reader == "NibabelIOWithReorient" else a).transpose(2, 1, 0).transpose(tf)  # RAS, then nnU-Net
    np.testing.assert_array_equal(x[0, 0].numpy(), ref)
    assert shape == ref.shape and spacing == [[3.0, 2.0, 1.0][t] for t in tf]
    with pytest.raises(ValueError, match="image_reader_writer 'Tiff3DIO' of the plans is not supported"):
        reader_steps("Tiff3DIO", tf, a.shape, aff, (1.0, 2.0, 3.0))


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / model_dir.name
    shutil.copytree(model_dir, dst)
    return dst


@pytest.mark.parametrize("missing", ["plans.json", "dataset.json"])
def test_missing_json_is_named(model_dir, tmp_path, missing):
    folder = _copy(model_dir, tmp_path)
    os.remove(folder / missing)
    with pytest.raises(ValueError, match=f"has no {missing}"):
        load_model(folder)


def test_missing_fold_is_named(model_dir):
    with pytest.raises(ValueError, match=r"fold 3 requested .*folds with checkpoint_final.pth: \['fold_0', 'fold_1'\]"):
        load_model(model_dir, folds=[3])
    with pytest.raises(ValueError, match="folds must be"):
        load_model(model_dir, folds="zero")


def test_disallowed_global_is_refused(model_dir, tmp_path):
    folder = _copy(model_dir, tmp_path)
    path = folder / "fold_1" / "checkpoint_final.pth"
    ck = torch.load(path, weights_only=False)
    ck["init_args"]["output"] = pathlib.PurePosixPath("/tmp/x")
    torch.save(ck, path)
    with pytest.raises(ValueError, match=r"fold_1/checkpoint_final.pth' needs the global 'pathlib.PurePosixPath'"):
        load_model(folder)


def test_unsupported_normalization_is_named(model_dir, tmp_path):
    folder = _copy(model_dir, tmp_path)
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["HistogramMatchingNormalization"]
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ValueError, match="'HistogramMatchingNormalization' of the plans is not supported"):
        load_model(folder)


def test_unknown_configuration_lists_available(model_dir):
    with pytest.raises(ValueError, match=r"configuration '3d_hires' does not exist .*available: .*3d_fullres"):
        load_model(model_dir, configuration="3d_hires")
    with pytest.raises(ValueError, match="has no option 'fold'"):
        load_model(model_dir, fold=0)


def test_dataset_folder_and_digest(model_dir):
    a = load_model(model_dir.parent)  # nnU-Net's dataset results folder holding one model folder
    b = load_model(model_dir, folds=[0])
    assert a.info["path"] == str(model_dir) and a.num_classes == 5 and a.class_names[1] == "liver"
    assert a.digest != b.digest and a.info["source"] == "nnunet"


def test_make_nnunet_model_script_writes_nnunet_raw_layout(tmp_path):
    import importlib.util

    import nibabel as nib

    path = Path(__file__).resolve().parents[2] / "data_scripts" / "make_nnunet_model.py"
    spec = importlib.util.spec_from_file_location("volattack_make_nnunet_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = mod.write_raw_dataset(tmp_path, 502, n_train=2, n_test=1, size=(16, 16, 16), seed=0)
    ds = json.loads((root / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT"} and ds["labels"]["liver"] == 1 and ds["numTraining"] == 2
    img = nib.load(str(root / "imagesTr" / "case_000_0000.nii.gz"))
    assert img.get_data_dtype() == np.int16 and (root / "labelsTs" / "case_002.nii.gz").is_file()
    assert json.loads((root / "datalist.json").read_text())["test"][0]["image"] == "imagesTs/case_002_0000.nii.gz"
    ns: dict = {}
    exec(compile(mod.TRAINER_SOURCE, "trainer", "exec"), ns)  # the trainer module nnU-Net imports
    assert issubclass(ns["nnUNetTrainer_volattack"], ns["nnUNetTrainer"])
    assert mod.main(["--trainer-dir"]) == 0 and mod.trainer_path().parent.name == "nnUNetTrainer"


def test_cli_and_yaml_set_the_sources_options(model_dir, scan_file, reference, tmp_path, capsys):
    # every load_model option is reachable from a run: -m KEY=VALUE on `volattack attack`,
    # evaluate.model_options in YAML; the results record them and the pipeline uses them
    import nibabel as nib

    from volattack.cli import main

    src = nib.load(str(scan_file))
    nib.save(nib.Nifti1Image(reference[0].astype(np.uint8), src.affine), str(tmp_path / "case.nii.gz"))
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"image": str(scan_file), "label": str(tmp_path / "case.nii.gz")}]}))
    out = tmp_path / "run"
    rc = main(["attack", str(model_dir), str(datalist), "pgd", "-p", "eps=8", "-p", "steps=1", "--space", "source",
               "-m", "folds=[0]", "-m", "use_mirroring=false", "-m", "keep_activations_mb=0", "--out", str(out),
               "--quiet"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["options"] == {"folds": [0], "use_mirroring": False, "keep_activations_mb": 0}
    one_fold = load_model(model_dir, folds=[0], use_mirroring=False)
    pred = one_fold.deploy(read_scan(scan_file)).predict(torch.as_tensor(read_scan(scan_file).array)[None])
    from volattack.metrics import mean_foreground_dice

    label = torch.as_tensor(reference[0].astype(np.int64))[None, None]
    k = int(one_fold.num_classes)
    assert res["cases"][0]["clean"]["dice"] == pytest.approx(float(mean_foreground_dice(pred, label, k)[0]), abs=1e-6)
    both = load_model(model_dir).deploy(read_scan(scan_file)).predict(torch.as_tensor(read_scan(scan_file).array)[None])
    assert not torch.equal(both, pred)  # the options change the segmentation, so the check above can fail
    capsys.readouterr()
    rc = main(["attack", str(model_dir), str(datalist), "pgd", "-p", "eps=8", "--space", "source", "-m", "fold=0",
               "--out", str(tmp_path / "bad"), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and "evaluate.model_options" in err and "fold" in err and "folds" in err
    assert not (tmp_path / "bad" / "results.json").exists()
