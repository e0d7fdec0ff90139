"""A row pass is one decorated class: its rows reach the case records, the summary and the report
like an attack's, scored through the results schema."""

from __future__ import annotations

import json

import pytest
import torch

import volattack
from volattack.data.config import PreprocessConfig
from volattack.evaluation.cases import attack_outcome, score
from volattack.evaluation.config import AttackSpec, EvalConfig
from volattack.evaluation.rows import ROW_PASSES, RowPass, register_row_pass
from volattack.evaluation.runner import evaluate

PRE = PreprocessConfig(roi_size=[16, 16, 16], crop_foreground=False)


@pytest.fixture
def flip_pass():
    @register_row_pass("zz_flip")
    class Flip(RowPass):
        """Mirrors the image along its first axis (a throwaway 'corruption')."""

        @classmethod
        def enabled(cls, eval_cfg):
            return True

        def labels(self):
            return ["flip"]

        def rows(self, data, index, case_seed, clean):
            p = self.passes
            adv = data.image.flip(2)
            pred = p.predict(adv)
            return {"flip": score(attack_outcome(pred, adv, {}, data, clean, bounds=p.bounds,
                                                 unit_scale=p.unit_scale))}

    yield Flip
    ROW_PASSES._items.pop("zz_flip")


def test_a_row_pass_adds_a_row_to_every_output(tmp_path, flip_pass):
    root = tmp_path / "ph"
    datalist = volattack.make_phantom_dataset(root, n=1, size=(20, 20, 16), seed=0, n_val=0, n_test=2,
                                              progress=False)
    from volattack.data.datalist import load_datalist

    cases = load_datalist(datalist, key="test")
    torch.manual_seed(0)
    cfg = EvalConfig(attacks=[AttackSpec("gn", {"eps": 0.0})], figures=False, sanity_checks=False)
    res = evaluate(torch.nn.Conv3d(1, 5, 3, padding=1), cases, tmp_path / "run", eval_cfg=cfg, preprocess=PRE,
                   num_classes=5, progress=False)
    per_case = [json.loads(p.read_text())["attacks"] for p in sorted((tmp_path / "run" / "cases").glob("*.json"))]
    assert all(set(a) == {"gn(eps=0)", "flip"} for a in per_case)
    assert res["summary"]["attacks"]["flip"]["adv_dice"] == pytest.approx(
        sum(a["flip"]["dice"] for a in per_case) / 2)
    # noise of size 0 changes nothing; a mirrored scan is a large change (RMS > 0)
    assert res["summary"]["attacks"]["gn(eps=0)"]["rms"] == 0
    assert res["summary"]["attacks"]["flip"]["rms"] > 0
    assert "| flip |" in (tmp_path / "run" / "report.md").read_text()
    assert res["row_passes"] == [{"name": "zz_flip"}]


def test_row_labels_must_not_repeat_attack_labels(tmp_path, flip_pass):
    from volattack.evaluation.passes import CasePasses
    from volattack.data.intensity import intensity_from_preprocess

    cfg = EvalConfig(attacks=[AttackSpec("gn", {"eps": 0.0})], figures=False, sanity_checks=False)
    flip_pass.labels = lambda self: ["gn(eps=0)"]
    with pytest.raises(ValueError, match=r"row labels must be unique, got \['gn\(eps=0\)', 'gn\(eps=0\)'\]"):
        CasePasses(torch.nn.Conv3d(1, 5, 1), None, cfg, PRE, intensity_from_preprocess(PRE), 5, 0, tmp_path,
                   torch.device("cpu"))
