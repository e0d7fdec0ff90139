"""Imports run one way (README, "Contributing"): a module may import its own package and any layer
below its own, never one above. Checked on every import statement of the package, including
the ones inside functions, by parsing the source (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "volattack"

#: lowest first; a module's layer is that of its longest matching prefix
LAYERS: list[tuple[str, ...]] = [
    ("volattack.registry", "volattack.checks", "volattack.utils", "volattack.ops", "volattack.distributed",
     "volattack.measure", "volattack.yaml_config"),
    ("volattack.data",),
    ("volattack.inference",),
    ("volattack.models",),
    ("volattack.attacks",),
    ("volattack.metrics",),
    ("volattack.defenses",),
    ("volattack.threats",),
    ("volattack.evaluation",),
    ("volattack.training",),
    ("volattack.config", "volattack.study", "volattack.pipeline", "volattack.cli", "volattack.__main__",
     "volattack"),
]

#: light configuration modules (dataclasses, no torch) that the layers' configs compose; a
#: config module may import other config modules and the bottom layer only
CONFIGS = ("volattack.data.config", "volattack.models.config", "volattack.defenses.config",
           "volattack.threats.config", "volattack.evaluation.config", "volattack.training.config",
           "volattack.config")


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    if rank < 0:
        raise AssertionError(f"module {module} has no layer in tests/test_layering.py")
    return rank


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every ``import volattack...``/``from volattack... import``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("volattack")]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative import
                base = me.split(".")[: len(me.split(".")) - node.level + (path.name == "__init__.py")]
                mod = ".".join(base + ([mod] if mod else []))
            if not mod.startswith("volattack"):
                continue
            if mod == "volattack":  # ``from volattack import ops``: the submodules named
                out += [(node.lineno, f"volattack.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return out


def violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        mine = layer_of(me)
        own_package = ".".join(me.split(".")[:2])
        for line, mod in imports_of(path):
            if mod == own_package or mod.startswith(own_package + "."):
                continue  # inside one's own package
            if me in CONFIGS and (mod in CONFIGS or layer_of(mod) == 0):
                continue
            if me in CONFIGS and mod not in CONFIGS and layer_of(mod) != 0:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: config module {me} imports {mod}")
            elif layer_of(mod) > mine:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {me} (layer {mine}) imports {mod} "
                           f"(layer {layer_of(mod)})")
    return bad


def test_no_import_runs_backwards() -> None:
    assert violations() == []


def test_the_checker_sees_a_backward_import(tmp_path, monkeypatch) -> None:
    pkg = tmp_path / "volattack"
    (pkg / "metrics").mkdir(parents=True)
    (pkg / "metrics" / "x.py").write_text("def f():\n    from volattack.evaluation.runner import evaluate\n")
    (pkg / "data").mkdir()
    (pkg / "data" / "config.py").write_text("from volattack.models.zoo import create_model\n")
    import sys

    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    found = violations()
    assert len(found) == 2
    assert any("volattack.metrics.x (layer 5) imports volattack.evaluation.runner (layer 8)" in v for v in found)
    assert any("config module volattack.data.config imports volattack.models.zoo" in v for v in found)


@pytest.mark.parametrize("module,layer", [("volattack.attacks.voxel", 4), ("volattack.ops", 0),
                                          ("volattack.config", 10), ("volattack.evaluation.runner", 8)])
def test_layer_of(module: str, layer: int) -> None:
    assert layer_of(module) == layer
