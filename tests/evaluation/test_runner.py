"""Evaluation runner: threat models, failed cases, resume after kill -9, torchrun parity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import volattack
from volattack.evaluation.patchwise import attack_patchwise, tile_grid
from volattack.models.config import ModelConfig


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Phantoms (3 test cases) and an untrained tiny checkpoint, plus a config writer."""
    root = tmp_path_factory.mktemp("runner")
    datalist = volattack.make_phantom_dataset(root / "ph", n=1, size=(24, 24, 16), seed=0, n_val=0, n_test=3)
    torch.manual_seed(0)
    cfg = ModelConfig(name="unet", in_channels=1, out_channels=5,
                      kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 0})
    model = volattack.create_model(cfg.name, cfg.in_channels, cfg.out_channels, **cfg.kwargs)
    ckpt = volattack.save_checkpoint(root / "m.pt", model, cfg)

    def write_cfg(name: str, **evaluate) -> Path:
        ev = {"checkpoint": str(ckpt), "figures": False,
              "attacks": [{"name": "pgd", "params": {"steps": 2}, "sweep": {"eps": ["2/255", "4/255"]}}],
              **evaluate}
        p = root / f"{name}.yaml"
        p.write_text(json.dumps({
            "seed": 0, "output_dir": str(root / name),
            "data": {"datalist": str(datalist), "preprocess": {"roi_size": [16, 16, 16], "crop_foreground": False}},
            "model": {"out_channels": 5}, "evaluate": ev,
        }))
        return p

    return root, datalist, ckpt, write_cfg


def _cli(*args: str, env=None, **kw) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "volattack", *args], capture_output=True, text=True, env=e, **kw)


def _cases(run: Path) -> dict[str, dict]:
    """Per-case metrics without timings."""
    res = json.loads((run / "results.json").read_text())
    return {
        c["case"]: {"clean": c["clean"], "seed": c["seed"],
                    "attacks": {a: {k: v for k, v in m.items() if k != "seconds"} for a, m in c["attacks"].items()}}
        for c in res["cases"]
    }


def test_tile_grid():
    assert tile_grid(96, 96, 96) == (1, 96)
    assert tile_grid(100, 96, 96) == (2, 192)
    assert tile_grid(40, 16, 8) == (4, 40)
    assert tile_grid(10, 16, 16) == (1, 16)


def test_patchwise_equals_whole_volume_for_a_pointwise_model():
    """With a voxel-wise model and the voxel-CE objective, the sign of each voxel's gradient does not
    depend on the tiling, so tile-attack-stitch equals attacking the whole volume (also with overlap
    and a size that is not a multiple of the tile)."""
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 3, 1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 20, 18, 12, generator=g)
    y = torch.randint(0, 3, (1, 1, 20, 18, 12), generator=g)
    atk = volattack.create_attack("pgd", model, eps=4 / 255, steps=3, objective="ce", random_start=False)
    whole = atk(x, y)
    for overlap in (0.0, 0.5):
        adv, info = attack_patchwise(atk, x, y, [8, 8, 8], overlap=overlap, tile_batch=3)
        torch.testing.assert_close(adv, whole, rtol=0, atol=1e-6)
        assert info["tiles"] == (3 * 3 * 2 if overlap == 0 else 4 * 4 * 2)
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 1\), got 1.0"):
        attack_patchwise(atk, x, y, [8, 8, 8], overlap=1.0)
    with pytest.raises(ValueError, match="patch_size must be 3 positive integers"):
        attack_patchwise(atk, x, y, [8, 8])


def test_patchwise_keeps_the_budget_with_overlap():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 20, 20, 12, generator=g)
    y = torch.randint(0, 3, (1, 1, 20, 20, 12), generator=g)
    atk = volattack.create_attack("pgd", model, eps=4 / 255, steps=2)
    adv, _ = attack_patchwise(atk, x, y, [8, 8, 8], overlap=0.25)
    assert float((adv - x).abs().max()) <= 4 / 255 + 1e-6
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1


def test_evaluate_volume_and_patch(tiny_run):
    root, _, _, write_cfg = tiny_run
    for tm in ("volume", "patch"):
        cfg = write_cfg(f"tm_{tm}", threat_model=tm, patch_size=[16, 16, 16], sanity_unbounded_steps=2,
                        attacks=[{"name": "pgd", "params": {"steps": 2}, "sweep": {"eps": ["2/255", "8/255"]}},
                                 {"name": "gn", "params": {"eps": "8/255"}}])
        r = _cli("evaluate", str(cfg), "--quiet")
        assert r.returncode == 0, r.stderr
        res = json.loads((root / f"tm_{tm}" / "results.json").read_text())
        assert res["threat_model"] == tm
        assert {c["check"] for c in res["sanity"]} >= {"monotone", "unbounded", "beats_noise", "zero_gradients"}
        report = (root / f"tm_{tm}" / "report.md").read_text()
        assert f"`{tm}`" in report and "Sanity checks against gradient masking" in report
        s = res["summary"]["attacks"]["pgd(eps=8/255)"]
        assert s["linf"] <= 8 / 255 + 1e-6


def test_failed_case_is_reported_and_the_others_go_on(tiny_run, tmp_path):
    root, datalist, ckpt, write_cfg = tiny_run
    dl = json.loads(datalist.read_text())
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes((datalist.parent / dl["test"][1]["image"]).read_bytes()[:200])  # truncated
    dl["test"][1]["image"] = str(bad)
    for e in dl["test"]:
        for k in ("image", "label"):
            if not Path(e[k]).is_absolute():
                e[k] = str(datalist.parent / e[k])
    bad_list = tmp_path / "dl.json"
    bad_list.write_text(json.dumps(dl))
    cfg = write_cfg("failed")
    r = _cli("evaluate", str(cfg), "--quiet", "--set", f"data.datalist={bad_list}", "--out", str(tmp_path / "out"))
    assert r.returncode == 1
    assert "bad.nii.gz" in r.stderr
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(res["cases"]) == 2 and len(res["failed"]) == 1
    assert "bad.nii.gz" in res["failed"][0]["reason"] or "bad.nii.gz" in res["failed"][0]["image"]
    assert "Failed cases" in (tmp_path / "out" / "report.md").read_text()
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_tile_larger_than_the_volume_fails_the_case_with_the_reason(tiny_run, tmp_path):
    """Volumes are 24x24x16: a patch tile that does not fit would attack padding."""
    _, _, _, write_cfg = tiny_run
    cfg = write_cfg("toolarge")
    r = _cli("evaluate", str(cfg), "--quiet", "--set", "evaluate.threat_model=patch",
             "--set", "evaluate.patch_size=[16, 16, 20]", "--out", str(tmp_path / "out"))
    assert r.returncode == 1, r.stderr
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["cases"] == [] and len(res["failed"]) == 3
    assert all("attack tile evaluate.patch_size=[16, 16, 20] is larger than the preprocessed volume [24, 24, 16]"
               in f["reason"] for f in res["failed"])


def test_window_larger_than_the_volume_pads_with_b_min_as_training_does():
    """A volume smaller than the sliding window is scored as training sees such volumes: padded
    with b_min (here -1), not with 0."""
    from volattack.inference import make_inferer

    seen = []

    def net(w):
        seen.append(w.detach().clone())
        return torch.cat([w, -w], dim=1)

    x = torch.zeros(1, 1, 6, 8, 8)
    make_inferer([8, 8, 8], 1, 0.25, cval=-1.0)(x, net)
    assert seen and float(seen[0].min()) == -1.0 and float(seen[0].max()) == 0.0
    w = seen[0][0, 0]
    assert w.shape == (8, 8, 8) and int((w == -1.0).sum()) == 2 * 8 * 8  # one padded slab each side
    assert bool((w[0] == -1.0).all()) and bool((w[-1] == -1.0).all()) and bool((w[1:-1] == 0).all())


def test_resume_after_kill_9(tiny_run):
    """Kill -9 after the first case file appears and before the run completes (the process must die
    of the signal with cases left to do), then resume: finished cases are reused, the results equal
    an uninterrupted run's."""
    root, _, _, write_cfg = tiny_run
    slow = [{"name": "pgd", "params": {"steps": 40}, "sweep": {"eps": ["2/255", "4/255"]}}]
    cfg = write_cfg("resume", sanity_checks=False, attacks=slow)
    ref_cfg = write_cfg("reference", sanity_checks=False, attacks=slow)
    assert _cli("evaluate", str(ref_cfg), "--quiet").returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "volattack", "evaluate", str(cfg), "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cases_dir = root / "resume" / "cases"
    deadline = time.time() + 120
    while time.time() < deadline and not (cases_dir.is_dir() and list(cases_dir.glob("*.json"))):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in cases_dir.glob("*.json"))
    # the kill landed before completion: the process died of SIGKILL with cases left and no results
    assert proc.returncode == -signal.SIGKILL
    assert 1 <= len(done_before) < 3 and not (root / "resume" / "results.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in cases_dir.glob("*.json")}
    r = _cli("evaluate", str(cfg), "--quiet")
    assert r.returncode == 0, r.stderr
    # finished cases were not recomputed, and the results equal the uninterrupted run's
    assert all((cases_dir / n).stat().st_mtime_ns == t for n, t in stamps.items())
    assert len(list(cases_dir.glob("*.json"))) == 3
    assert _cases(root / "resume") == _cases(root / "reference")


def test_data_test_key_is_the_evaluated_split(tiny_run, tmp_path):
    """Defect 2: ``data.test_key`` selects the cases (it was ignored: ``evaluate.split`` was "test")."""
    root, datalist, _, write_cfg = tiny_run
    dl = json.loads(datalist.read_text())
    dl["holdout"] = [{k: str(datalist.parent / v) for k, v in dl["test"][2].items()}]
    other = tmp_path / "dl.json"
    other.write_text(json.dumps(dl))
    cfg = write_cfg("holdout", sanity_checks=False)
    r = _cli("evaluate", str(cfg), "--quiet", "--set", f"data.datalist={other}", "--set", "data.test_key=holdout",
             "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [c["image"] for c in res["cases"]] == [dl["holdout"][0]["image"]]
    r = _cli("evaluate", str(cfg), "--quiet", "--set", f"data.datalist={other}", "--set", "data.test_key=holdout",
             "--set", "evaluate.split=test", "--out", str(tmp_path / "out2"))
    assert r.returncode == 2 and "name different splits" in r.stderr


def test_torchrun_two_processes_match_one(tiny_run):
    root, _, _, write_cfg = tiny_run
    one = write_cfg("one_proc", sanity_checks=False)
    two = write_cfg("two_proc", sanity_checks=False)
    assert _cli("evaluate", str(one), "--quiet").returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "volattack", "evaluate", str(two), "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((root / "two_proc" / "results.json").read_text())
    assert res["world_size"] == 2
    assert _cases(root / "two_proc") == _cases(root / "one_proc")
