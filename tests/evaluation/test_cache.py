"""The per-case cache is keyed on what produced each case (weights and data digests, every
result-affecting option, the schema) and the log says why a case is recomputed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import volattack
from volattack.evaluation.cache import EXCLUDED_OPTIONS, CacheKey, CaseCache, path_digest, run_key_parts
from volattack.evaluation.config import EvalConfig
from volattack.models.config import ModelConfig
from volattack.pipeline import load_run_config, run_evaluate
from volattack.yaml_config import to_dict

ARCH = ModelConfig(name="unet", in_channels=1, out_channels=5,
                   kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 0})


@pytest.fixture
def env(tmp_path):
    """Two test phantoms, a checkpoint writer (same path, chosen weights) and an evaluation runner."""
    datalist = volattack.make_phantom_dataset(tmp_path / "ph", n=1, size=(20, 20, 16), seed=0, n_val=0, n_test=2,
                                              progress=False)
    ckpt = tmp_path / "best.pt"

    def save_weights(seed: int) -> None:
        torch.manual_seed(seed)
        model = volattack.create_model(ARCH.name, ARCH.in_channels, ARCH.out_channels, **ARCH.kwargs)
        volattack.save_checkpoint(ckpt, model, ARCH)

    def run(*overrides: str) -> dict:
        cfg_path = tmp_path / "cfg.json"
        cfg_path.write_text(json.dumps({
            "seed": 0, "data": {"datalist": str(datalist), "preprocess": {"roi_size": [16, 16, 16],
                                                                           "crop_foreground": False}},
            "model": {"out_channels": 5},
            "evaluate": {"checkpoint": str(ckpt), "figures": False, "sanity_checks": False,
                         "attacks": [{"name": "fgsm", "params": {"eps": "4/255"}}]},
        }))
        return run_evaluate(load_run_config(str(cfg_path), list(overrides)), tmp_path / "run", progress=False)

    save_weights(0)
    return tmp_path, datalist, save_weights, run


def _stamps(run: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((run / "cases").glob("*.json"))}


def _recomputed(caplog) -> list[str]:
    return [m for m in caplog.messages if "recomputed" in m]


def test_replaced_weights_at_the_same_path_are_recomputed_and_the_log_says_why(env, caplog):
    root, _, save_weights, run = env
    first = run()
    before = _stamps(root / "run")
    save_weights(1)  # another model, same file name
    with caplog.at_level(logging.INFO):
        second = run()
    assert sorted(_recomputed(caplog)) == [f"case {n[:-5]} recomputed: weights changed" for n in before]
    after = _stamps(root / "run")
    assert all(after[n] != t for n, t in before.items())
    assert [c["key_parts"]["weights"] for c in first["cases"]] != [c["key_parts"]["weights"] for c in second["cases"]]
    from volattack.ops import module_digest

    assert second["cases"][0]["key_parts"]["weights"] == module_digest(volattack.load_checkpoint(root / "best.pt")[0])


def test_a_rewritten_image_is_recomputed_the_other_case_reused(env, caplog):
    root, datalist, _, run = env
    run()
    before = _stamps(root / "run")
    entry = json.loads(datalist.read_text())["test"][1]
    image = datalist.parent / entry["image"]
    img = nib.load(str(image))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32) + 20.0, img.affine, img.header), str(image))
    with caplog.at_level(logging.INFO):
        run()
    after = _stamps(root / "run")
    names = list(before)
    assert _recomputed(caplog) == [f"case {names[1][:-5]} recomputed: data changed"]
    assert after[names[0]] == before[names[0]] and after[names[1]] != before[names[1]]


def test_excluded_options_reuse_every_case_and_included_ones_do_not(env, caplog):
    root, _, _, run = env
    run()
    before = _stamps(root / "run")
    with caplog.at_level(logging.INFO):
        res = run("evaluate.fooling_threshold=0.3", "evaluate.device=cpu", "data.preprocess.units=a.u.",
                  "evaluate.max_cases=5", "data.preprocess.num_samples=4")
    assert _stamps(root / "run") == before and not _recomputed(caplog)
    assert res["fooling_threshold"] == 0.3 and res["intensity_units"] == "a.u."
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run("evaluate.sw_overlap=0.5", "evaluate.attacks=[{name: fgsm, params: {eps: 2/255}}]")
    assert {m.split(": ", 1)[1] for m in _recomputed(caplog)} == {"attacks, evaluate changed"}
    # asking for files a reused case never wrote recomputes it
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run("evaluate.sw_overlap=0.5", "evaluate.attacks=[{name: fgsm, params: {eps: 2/255}}]", "evaluate.save_pred=true")
    msgs = _recomputed(caplog)
    assert len(msgs) == 2 and all("requested outputs missing (predictions/" in m for m in msgs)
    assert len(list((root / "run" / "predictions").glob("*.nii.gz"))) == 4


def test_key_components_unit():
    parts = run_key_parts(eval_options=to_dict(EvalConfig()), preprocess={"a_min": 0, "units": "HU"}, attacks=[],
                          seed=0, num_classes=5, weights="w1")
    assert set(parts) == {"schema", "weights", "model", "preprocess", "attacks", "defense", "evaluate", "seed",
                          "num_classes"}
    same = run_key_parts(eval_options={**to_dict(EvalConfig()), **{k: "x" for k in EXCLUDED_OPTIONS}},
                         preprocess={"a_min": 0, "units": "a.u."}, attacks=[], seed=0, num_classes=5, weights="w1")
    assert same == parts
    other = CacheKey({**parts, "weights": "w2", "seed": "s"})
    assert other.changed(parts) == ["weights", "seed"] and other.value != CacheKey(parts).value
    assert CacheKey({**parts, "surrogate": "s"}).changed(parts) == ["surrogate"]


def test_path_digest_and_unreadable_case_files(tmp_path):
    f = tmp_path / "a.nii.gz"
    f.write_bytes(b"abc")
    d = path_digest(f)
    f.write_bytes(b"abd")
    assert path_digest(f) != d and path_digest(tmp_path / "nope") == "missing"
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "1.dcm").write_bytes(b"x")
    assert len(path_digest(tmp_path / "dicom")) == 16
    g = tmp_path / "b.nii.gz"  # channel files: a digest of the files' digests, in channel order
    g.write_bytes(b"xyz")
    both = path_digest([f, g])
    assert both != path_digest([g, f]) and len(both) == 16
    g.write_bytes(b"xyw")
    assert path_digest([f, g]) != both
    cache = CaseCache(tmp_path / "cases")
    key = CacheKey({"weights": "w"})
    assert cache.lookup("0000_a", key) == (None, "not computed yet")
    (tmp_path / "cases").mkdir()
    cache.path("0000_a").write_text("{trunc")
    rec, why = cache.lookup("0000_a", key)
    assert rec is None and why.startswith("its file 0000_a.json is unreadable")
    cache.path("0000_a").write_text(json.dumps({"case": "0000_a", "clean": {}, "key": "k"}))
    assert cache.lookup("0000_a", key) == (None, "written by an earlier volattack (no key components)")
