"""data_scripts/prepare_brain.py: logic on fake atlases shaped like mricron-data's, and one
run on the real package files (skipped when mricron-data is not installed)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volattack.data.datalist import load_datalist

REAL = Path("/usr/share/mricron/templates")
SPLITS = ("training", "validation", "test")

# (name, rule) for each hemisphere; evaluated in order, later rules win.
REGIONS = ["Frontal_Sup", "Precentral", "Postcentral", "Parietal_Sup", "Occipital_Mid", "Temporal_Mid",
           "Cingulum_Mid", "Thalamus", "Cerebelum_6"]


@pytest.fixture(scope="module")
def brain(load_script):
    return load_script("prepare_brain")


def _coords(shape, affine):
    idx = np.indices(shape).reshape(3, -1).astype(float)
    w = affine[:3, :3] @ idx + affine[:3, 3:4]
    return [c.reshape(shape) for c in w]


def _save(arr, affine, path: Path, dtype=np.uint8) -> None:
    img = nib.Nifti1Image(np.asarray(arr, dtype=dtype), affine)
    img.set_sform(affine, 1)
    nib.save(img, str(path))


def fake_head(shape=(56, 64, 56), spacing=2.0, scale=1.0, marker=True):
    """A T1-like head: scalp, dark skull, CSF rim, brain; symmetric but for one bright marker at x=+30."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-(shape[0] // 2) * spacing, -(shape[1] // 2) * spacing, -(shape[2] // 2) * spacing]
    x, y, z = _coords(shape, affine)
    r = np.sqrt((x / 50) ** 2 + (y / 58) ** 2 + (z / 50) ** 2)
    t1 = np.where(r < 1.0, 150.0, 0.0)
    t1[(r >= 0.85) & (r < 0.95)] = 20.0
    t1[(r >= 0.8) & (r < 0.85)] = 40.0
    brain = r < 0.8
    t1[brain] = 100 + 15 * np.cos(np.abs(x[brain]) / 4)
    if marker:
        t1[(x - 30) ** 2 + y ** 2 + (z - 16) ** 2 < 36] = 250.0
    return (t1 * scale).astype(np.float32), brain, affine, (x, y, z)


def fake_aal(brain, xyz):
    """AAL-like indices on the brain: odd = _L, even = _R, Vermis_6 last; right temporal region larger."""
    x, y, z = xyz
    names = {}
    aal = np.zeros(brain.shape, np.uint8)
    k = 1
    for reg in REGIONS:
        for side in ("L", "R"):
            names[k] = f"{reg}_{side}"
            hemi = (x < 0) if side == "L" else (x >= 0)
            ax = np.abs(x)
            rule = {
                "Frontal_Sup": y > 15,
                "Precentral": (y > 5) & (y <= 15),
                "Postcentral": (y > -5) & (y <= 5) & (z > 0),
                "Parietal_Sup": (y <= -5) & (z > 5),
                "Occipital_Mid": (y < -30) & (z <= 5),
                "Temporal_Mid": (ax > (20 if side == "L" else 12)) & (y >= -30) & (y <= 5) & (z <= 0),
                "Cingulum_Mid": (ax < 6) & (z > 10),
                "Thalamus": (ax < 10) & (np.abs(y) < 8) & (np.abs(z) < 8),
                "Cerebelum_6": (z < -20) & (y < -10),
            }[reg]
            aal[brain & hemi & rule & (np.sqrt(x**2 + y**2 + z**2) > 12) | (brain & hemi & rule & (reg == "Thalamus"))] = k
            k += 1
    names[k] = "Vermis_6"
    aal[brain & (np.abs(x) < 4) & (z < -20) & (y < -10)] = k
    return aal, names


@pytest.fixture(scope="module")
def fake_mricron(tmp_path_factory):
    d = tmp_path_factory.mktemp("mricron")
    t1, brain_mask, affine, xyz = fake_head()
    _save(t1, affine, d / "ch2.nii.gz")
    bet = np.where(brain_mask, t1, 0)
    bet[2:4, 30:32, 30:32] = 90  # a speck outside the brain: not the largest component
    _save(bet, affine, d / "ch2bet.nii.gz")
    aal, names = fake_aal(brain_mask, xyz)
    _save(aal, affine, d / "aal.nii.gz")
    (d / "aal.nii.txt").write_text("".join(f"{k} {v} {2000 + k}\n" for k, v in names.items()))
    return d, brain_mask, aal, names


def _fake_mni_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    t1, mask, affine, _ = fake_head(shape=(50, 60, 50), spacing=2.0, scale=40.0, marker=False)
    _save(t1, affine, folder / "tpl-MNI152NLin6Asym_res-01_T1w.nii.gz", dtype=np.int16)
    _save(mask, affine, folder / "tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz")


def _run(brain, out: Path, mricron: Path, *extra: str) -> int:
    return brain.main([str(out), "--mricron-dir", str(mricron), "--spacing", "4", "--n-train", "2",
                       "--n-val", "1", "--n-test", "2", *extra])


# --------------------------------------------------------------------------- pure logic


def test_lobes_midline_and_masks(brain):
    assert [brain.lobe_of(n) for n in ("Frontal_Sup_L", "Paracentral_Lobule_R", "Precuneus_L", "Fusiform_R",
                                       "Calcarine_L", "Insula_R", "Thalamus_L", "Cerebelum_Crus1_R", "Vermis_6")] \
        == [1, 1, 2, 3, 4, 5, 6, 7, 7]
    with pytest.raises(ValueError, match="AAL region name 'Nucleus_X_L' matches no lobe"):
        brain.lobe_of("Nucleus_X_L")
    left = np.zeros((10, 3, 3), bool)
    right = np.zeros_like(left)
    left[:7] = True
    right[7:] = True
    right[5, 0, 0], left[5, 0, 0] = True, False  # one stray voxel does not move the plane
    assert brain.find_midline(left, right) == 7
    with pytest.raises(ValueError, match="not in RAS order"):
        brain.find_midline(right, left)
    with pytest.raises(ValueError, match="must be non-empty"):
        brain.find_midline(left, np.zeros_like(left))
    bet = np.zeros((12, 12, 12))
    bet[2:9, 2:9, 2:9] = 5
    bet[5, 5, 5] = 0  # hole
    bet[11, 11, 11] = 7  # speck
    m = brain.brain_mask_from_bet(bet)
    assert m.sum() == 7**3 and m[5, 5, 5] and not m[11, 11, 11]
    img = np.zeros(1000)
    img[:800] = np.linspace(1, 200, 800)
    out, scale = brain.normalise_intensity(img)
    head = img[img > 0.1 * np.percentile(img[img > 0], 99)]
    assert np.percentile(out[img > 0.1 * np.percentile(img[img > 0], 99)], 99.5) == pytest.approx(100, rel=1e-5)
    assert scale == pytest.approx(100 / np.percentile(head, 99.5))


def test_geometry_helpers(brain):
    shape, aff = brain.grid(np.array([0.0, 0, 0]), np.array([9.0, 3, 0]), 3.0)
    assert shape == (4, 2, 1) and np.allclose(np.diag(aff), [3, 3, 3, 1]) and np.allclose(aff[:3, 3], [0, 0, 0])
    p = np.array([5.0, -2.0, 7.0, 1.0])
    assert np.allclose(brain.sampling_map(None, np.zeros(3), None) @ p, p)
    assert np.allclose(brain.sampling_map(None, np.zeros(3), 1.5) @ p, [-2.0, -2.0, 7.0, 1.0])  # x -> 2*1.5 - x
    aug = {"rotation_deg": [0, 0, 90], "scale": [1, 1, 1], "translation_mm": [1, 2, 3]}
    c = np.array([1.0, 1.0, 0.0])
    # p - c = (4, -3, 7); rotating 90 deg about z gives (3, 4, 7); + c + t = (5, 7, 10)
    assert np.allclose(brain.sampling_map(aug, c, None) @ p, [5.0, 7.0, 10.0, 1.0])
    lo, hi = brain.world_bbox(np.pad(np.ones((2, 3, 1), bool), 1), np.diag([2.0, 2.0, 2.0, 1.0]))
    assert np.allclose(lo, [2, 2, 2]) and np.allclose(hi, [4, 6, 2])
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    a = brain.sample_augmentation(rng1, brain.AUG_RANGES["extraction"])
    assert a == brain.sample_augmentation(rng2, brain.AUG_RANGES["extraction"])
    assert all(abs(v) <= 10 for v in a["rotation_deg"]) and 0.8 <= a["gamma"] <= 1.25


# --------------------------------------------------------------------------- fake atlases end to end


def test_fake_atlases_both_tasks(brain, fake_mricron, tmp_path, capsys):
    d, brain_mask, aal, names = fake_mricron
    out = tmp_path / "brain"
    assert _run(brain, out, d, "--no-mni", "--seed", "1") == 0
    paths = [Path(p) for p in capsys.readouterr().out.split()]
    assert paths == [out / "brain_extraction" / "dataset.json", out / "brain_parcellation" / "dataset.json"]

    ext = json.loads(paths[0].read_text())
    assert ext["labels"] == {"0": "background", "1": "brain"}
    assert {k: len(ext[k]) for k in SPLITS} == {"training": 2, "validation": 1, "test": 2}
    assert "NOT an independent subject" in ext["split"]["method"]
    for k in SPLITS:
        assert len(load_datalist(paths[0], key=k)) == len(ext[k])
    first = ext["training"][0]
    assert ext["case_info"]["colin27_train000"]["augmentation"] is None
    assert ext["case_info"]["colin27_train001"]["augmentation"]["gamma"] > 0
    assert set(first) == {"image", "label", "subject"}  # entries collate in a DataLoader
    lbl = nib.load(out / "brain_extraction" / first["label"])
    assert np.allclose(np.abs(np.diag(lbl.affine))[:3], 4.0)
    expected = brain_mask.sum() * 8 / 64  # 2 mm source voxels -> 4 mm output voxels
    assert np.asarray(lbl.dataobj).sum() == pytest.approx(expected, rel=0.1)
    img = np.asarray(nib.load(out / "brain_extraction" / first["image"]).dataobj)
    lab = np.asarray(lbl.dataobj)
    t1 = np.asarray(nib.load(d / "ch2.nii.gz").dataobj, dtype=float)
    scale = ext["sources"]["colin27"]["intensity_scale"]
    assert scale == pytest.approx(100 / 150, rel=0.01)  # the 99.5th head percentile is the 150 scalp
    assert np.median(img[lab == 1]) == pytest.approx(np.median(t1[brain_mask]) * scale, rel=0.05)
    assert img.min() >= 0

    par = json.loads(paths[1].read_text())
    assert par["labels"]["1"] == "frontal" and par["labels"]["7"] == "cerebellum" and len(par["labels"]) == 8
    assert {c["hemisphere"] for c in par["training"] + par["validation"]} == {"left"}
    assert {c["hemisphere"] for c in par["test"]} == {"right"}
    assert {c["subject"] for c in par["training"]} == {"colin27_left"} and {c["subject"] for c in par["test"]} == {"colin27_right"}
    assert par["midline_x_mm"] == pytest.approx(-1.0)
    assert par["case_info"]["colin27_right_mirrored_test000"]["mirrored"] is True
    tr = out / "brain_parcellation" / par["training"][0]["label"]
    te = out / "brain_parcellation" / par["test"][0]["label"]
    tr_l, te_l = np.asarray(nib.load(tr).dataobj), np.asarray(nib.load(te).dataobj)
    assert tr_l.shape == te_l.shape and set(np.unique(tr_l)) <= set(range(8))
    # the right temporal region of the fake atlas is larger: the (mirrored) test crop shows it
    src_ratio = (aal == 12).sum() / (aal == 11).sum()  # Temporal_Mid_R / Temporal_Mid_L voxels
    assert (te_l == 3).sum() / (tr_l == 3).sum() == pytest.approx(src_ratio, rel=0.2) and src_ratio > 1.3
    # mirroring: the bright marker at x = +30 mm (right) appears at x = -32 mm (= 2 * -1 - 30) in the test crop
    te_img = nib.load(out / "brain_parcellation" / par["test"][0]["image"])
    ijk = np.unravel_index(np.argmax(np.asarray(te_img.dataobj)), te_img.shape)
    assert (te_img.affine @ np.array([*ijk, 1.0]))[0] == pytest.approx(-32, abs=4)
    tr_img = np.asarray(nib.load(out / "brain_parcellation" / par["training"][0]["image"]).dataobj)
    assert tr_img.max() < 0.8 * np.asarray(te_img.dataobj).max()  # the left hemisphere has no marker


def test_same_seed_same_files(brain, fake_mricron, tmp_path):
    d = fake_mricron[0]
    for name in ("a", "b"):
        assert _run(brain, tmp_path / name, d, "--no-mni", "--task", "parcellation", "--seed", "2") == 0
    ja = (tmp_path / "a" / "brain_parcellation" / "dataset.json").read_text()
    assert ja == (tmp_path / "b" / "brain_parcellation" / "dataset.json").read_text()
    f = "brain_parcellation/images/colin27_left_val000.nii.gz"
    assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert _run(brain, tmp_path / "c", d, "--no-mni", "--task", "parcellation", "--seed", "3") == 0
    assert (tmp_path / "c" / f).read_bytes() != (tmp_path / "a" / f).read_bytes()


@pytest.mark.parametrize("as_wheel", [False, True])
def test_mni_head_becomes_the_test_subject(brain, fake_mricron, tmp_path, as_wheel):
    templates = tmp_path / "site" / "nimare" / "resources" / "templates"
    _fake_mni_files(templates)
    src = tmp_path / "site"
    if as_wheel:
        src = tmp_path / "nimare-0.0-py3-none-any.whl"
        with zipfile.ZipFile(src, "w") as z:
            for f in templates.iterdir():
                z.write(f, f"nimare/resources/templates/{f.name}")
    out = tmp_path / "o"
    assert _run(brain, out, fake_mricron[0], "--task", "extraction", "--nimare", str(src)) == 0
    meta = json.loads((out / "brain_extraction" / "dataset.json").read_text())
    assert {c["subject"] for c in meta["test"]} == {"mni152"} and {c["subject"] for c in meta["training"]} == {"colin27"}
    assert "never seen in training" in meta["split"]["method"]
    assert meta["sources"]["mni152"]["intensity_scale"] == pytest.approx(meta["sources"]["colin27"]["intensity_scale"] / 40, rel=0.05)
    img = np.asarray(nib.load(out / "brain_extraction" / meta["test"][0]["image"]).dataobj)
    assert 80 < np.percentile(img[img > 10], 99.5) < 120  # int16 x40 intensities rescaled like Colin27's


def test_errors_and_install_hint(brain, fake_mricron, tmp_path, capsys):
    assert _run(brain, tmp_path / "o", tmp_path / "no_such_dir") == 1
    assert "apt-get install mricron-data" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "ch2.nii.gz").write_bytes((fake_mricron[0] / "ch2.nii.gz").read_bytes())
    assert _run(brain, tmp_path / "o", partial) == 1
    err = capsys.readouterr().err
    assert "apt-get install mricron-data" in err and "aal.nii.gz" in err and "ch2.nii.gz'" not in err.split("[")[1].split("]")[0]
    assert _run(brain, tmp_path / "o", fake_mricron[0], "--spacing", "0.5") == 1
    assert "spacing must be in [1, 8] mm, got 0.5" in capsys.readouterr().err
    assert _run(brain, tmp_path / "o", fake_mricron[0], "--n-train", "0") == 1
    assert "n_train must be an integer >= 1, got 0" in capsys.readouterr().err
    assert _run(brain, tmp_path / "o", fake_mricron[0], "--nimare", str(tmp_path)) == 1
    assert "holds no MNI152 templates" in capsys.readouterr().err
    repo = Path(__file__).resolve().parents[2]
    if (repo / ".git").exists():
        assert _run(brain, repo / "volattack" / "brain_out", fake_mricron[0]) == 1
        assert "inside the volattack repository" in capsys.readouterr().err
        assert not (repo / "volattack" / "brain_out").exists()
    bad = tmp_path / "badnames"
    bad.mkdir()
    for f in fake_mricron[0].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "aal.nii.txt").write_text((bad / "aal.nii.txt").read_text().replace("Thalamus_L", "Nucleus_X_L"))
    assert _run(brain, tmp_path / "o", bad) == 1
    assert "'Nucleus_X_L' matches no lobe" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real package


@pytest.mark.skipif(not (REAL / "ch2.nii.gz").is_file(),
                    reason="mricron-data is not installed (apt-get install -y mricron-data)")
def test_real_mricron_data(brain, tmp_path):
    out = tmp_path / "real"
    rc = brain.main([str(out), "--spacing", "4", "--n-train", "1", "--n-val", "1", "--n-test", "1", "--no-mni"])
    assert rc == 0
    ext = json.loads((out / "brain_extraction" / "dataset.json").read_text())
    lbl = nib.load(out / "brain_extraction" / ext["training"][0]["label"])
    bet = np.asarray(nib.load(REAL / "ch2bet.nii.gz").dataobj)
    expected = brain.brain_mask_from_bet(bet).sum() / 64  # 1 mm -> 4 mm voxels
    assert np.asarray(lbl.dataobj).sum() == pytest.approx(expected, rel=0.05)
    par = json.loads((out / "brain_parcellation" / "dataset.json").read_text())
    assert -5 < par["midline_x_mm"] < 5  # Colin27 sits in MNI space: midline near x = 0
    for split in ("training", "test"):
        lab = np.asarray(nib.load(out / "brain_parcellation" / par[split][0]["label"]).dataobj)
        assert set(np.unique(lab)) == set(range(8))  # every lobe present in each hemisphere crop
    img = np.asarray(nib.load(out / "brain_parcellation" / par["training"][0]["image"]).dataobj)
    assert 80 < np.percentile(img[img > 10], 99.5) < 115


def test_brain_configs_match_the_script(brain):
    from volattack.pipeline import load_run_config

    repo = Path(__file__).resolve().parents[2]
    for name, labels in (("brain_extraction", {0: "background", 1: "brain"}),
                         ("brain_parcellation", brain.PARCELLATION_LABELS)):
        cfg = load_run_config(str(repo / "configs" / f"{name}.yaml"))
        assert cfg.data.datalist == f"data/brain/{name}/dataset.json"
        assert cfg.model.out_channels == len(labels) and cfg.model.in_channels == 1
        pre = cfg.data.preprocess
        assert pre.spacing == [3.0, 3.0, 3.0] and (pre.a_min, pre.a_max) == (0.0, 100.0)
        stride = int(np.prod(cfg.model.kwargs["strides"]))
        assert all(s % stride == 0 for s in pre.roi_size)
        assert [a.name for a in cfg.evaluate.attacks][0] == "pgd"
        assert cfg.evaluate.attacks[0].sweep["eps"] == pytest.approx([2 / 255, 4 / 255, 8 / 255])
