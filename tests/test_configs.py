"""Typed YAML configs: unknown keys with suggestions, type errors, --set overrides, fractions."""

from __future__ import annotations

import pytest

from volattack.config import ConfigError, apply_overrides, dump_yaml, from_dict, load_yaml
from volattack.checks import parse_number
from volattack.config import RunConfig
from volattack.evaluation.config import AttackSpec, EvalConfig, format_number


def test_unknown_key_with_suggestion():
    with pytest.raises(ConfigError, match=r"Unknown config key 'train.epoch'. Did you mean 'epochs'\?"):
        from_dict(RunConfig, {"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"Unknown config key 'modle'. Did you mean 'model'\?"):
        from_dict(RunConfig, {"modle": {}})


def test_types_are_checked():
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer, got 'ten'"):
        from_dict(RunConfig, {"train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match=r"data.preprocess.roi_size: expected a list, got 32"):
        from_dict(RunConfig, {"data": {"preprocess": {"roi_size": 32}}})
    with pytest.raises(ConfigError, match=r"evaluate.save_adv: expected true/false, got 'yes please'"):
        from_dict(RunConfig, {"evaluate": {"save_adv": "yes please"}})


def test_validation_in_post_init():
    with pytest.raises(ConfigError, match=r"fooling_threshold must be in \(0, 1\], got 1.5"):
        from_dict(RunConfig, {"evaluate": {"fooling_threshold": 1.5}})
    with pytest.raises(ConfigError, match=r"sw_overlap must be in \[0, 1\), got 1.0"):
        from_dict(EvalConfig, {"sw_overlap": 1.0})


def test_overrides_apply_last_and_parse_values():
    raw = {"train": {"epochs": 3}, "seed": 1}
    out = apply_overrides(raw, ["train.epochs=7", "seed=5", "train.lr=1e-3", "data.preprocess.roi_size=[16, 16, 16]"])
    cfg = from_dict(RunConfig, out)
    assert cfg.train.epochs == 7 and cfg.seed == 5 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.preprocess.roi_size == [16, 16, 16]
    assert from_dict(RunConfig, {"train": {"lr": "8/255"}}).train.lr == pytest.approx(8 / 255)
    assert raw == {"train": {"epochs": 3}, "seed": 1}  # input not modified
    with pytest.raises(ConfigError, match="--set expects key=value, got 'train.epochs'"):
        apply_overrides(raw, ["train.epochs"])
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        apply_overrides(raw, ["seed.x=1"])


def test_fractions_are_parsed_never_evaluated():
    assert parse_number("8/255") == pytest.approx(8 / 255)
    assert parse_number(0.5) == 0.5
    with pytest.raises(ValueError, match=r"eps must be a number or a fraction like '8/255', got .*__import__"):
        parse_number("__import__('os')/1", "eps")
    spec = from_dict(AttackSpec, {"name": "pgd", "params": {"steps": 5}, "sweep": {"eps": ["2/255", "8/255"]}})
    assert [lbl for lbl, _ in spec.expand()] == ["pgd(eps=2/255)", "pgd(eps=8/255)"]
    assert spec.expand()[1][1] == {"steps": 5, "eps": pytest.approx(8 / 255)}
    assert format_number(4 / 255) == "4/255" and format_number(0.3) == "0.3"
    assert format_number(0.4, "rho") == "0.4" and format_number(0.2, "l_dc") == "0.2"  # 102/255, 51/255
    assert format_number(8 / 255, "eps") == "8/255"
    assert AttackSpec(name="sa2", sweep={"rho": [0.4]}).expand()[0][0] == "sa2(rho=0.4)"
    with pytest.raises(ConfigError, match="sweep lists must have equal lengths"):
        from_dict(AttackSpec, {"sweep": {"eps": [1, 2], "steps": [1]}})


def test_yaml_round_trip(tmp_path):
    cfg = from_dict(RunConfig, {"seed": 3, "evaluate": {"attacks": [{"name": "pgd", "sweep": {"eps": ["4/255"]}}]}})
    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml(cfg))
    again = from_dict(RunConfig, load_yaml(p))
    assert again == cfg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="Config file not found"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping, got list"):
        load_yaml(lst)
    # yaml.safe_load: python tags are refused, never executed
    evil = tmp_path / "evil.yaml"
    evil.write_text("seed: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_yaml(evil)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"targeted": True}, r"params.targeted=True cannot be set in a config: set by evaluate.goal.target .*remove"),
        ({"target_labels": [[0]]}, r"params.target_labels=.* evaluate.goal.target .*target_labels=\.\.\."),
        ({"mask": [1, 0]}, r"params.mask=\[1, 0\] cannot be set in a config: set by evaluate.goal.mask \(body"),
        ({"inferer": "sliding"}, r"params.inferer='sliding' .* Python-only: the evaluation runs every attack"),
        ({"bounds": [0, 1]}, r"params.bounds=\[0, 1\] cannot be set in a config: set by the evaluation"),
        ({"seed": 3}, r"params.seed=3 cannot be set in a config: set by the evaluation from the run's seed"),
    ],
)
def test_python_only_attack_options_are_rejected_at_load(params, match):
    """Defect 4 (config side): options that validation used to accept and that then failed every case."""
    with pytest.raises(ConfigError, match=match):
        from_dict(RunConfig, {"evaluate": {"attacks": [{"name": "pgd", "params": params}]}})
    with pytest.raises(ValueError, match="cannot be set in a config"):
        AttackSpec(name="pgd", sweep={k: [v] for k, v in params.items()})
    assert AttackSpec(name="pgd", params={"targeted": False}).params == {"targeted": False}


def test_data_test_key_selects_the_evaluated_split(tmp_path):
    """Defect 2: ``data.test_key`` was accepted and ignored; ``evaluate.split`` now defaults to it."""
    from volattack.pipeline import evaluation_split, load_run_config

    def cfg(**sections):
        p = tmp_path / "c.yaml"
        p.write_text(dump_yaml(sections))
        return load_run_config(str(p))

    assert evaluation_split(cfg()) == "test"
    assert evaluation_split(cfg(data={"test_key": "holdout"})) == "holdout"
    assert evaluation_split(cfg(evaluate={"split": "validation"})) == "validation"
    assert evaluation_split(cfg(data={"test_key": "holdout"}, evaluate={"split": "holdout"})) == "holdout"
    with pytest.raises(ConfigError, match=r"evaluate.split='test' and data.test_key='holdout' name different splits"):
        cfg(data={"test_key": "holdout"}, evaluate={"split": "test"})
