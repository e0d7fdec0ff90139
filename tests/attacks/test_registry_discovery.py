"""A new attack is one file: importing ``volattack.attacks`` imports every module of the package,
so a ``@register_attack`` class in a new module is registered without editing ``__init__``."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import textwrap


def test_every_module_of_the_attacks_package_is_imported() -> None:
    import volattack.attacks as pkg

    names = {f"volattack.attacks.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)}
    assert names and names <= set(sys.modules)


def test_a_new_attack_file_registers_itself() -> None:
    from pathlib import Path

    import volattack.attacks as pkg
    from volattack.attacks.base import ATTACKS

    new = Path(pkg.__file__).parent / "zz_test_attack.py"  # removed below, whatever happens
    new.write_text(textwrap.dedent('''
        from volattack.attacks.base import Attack, register_attack

        @register_attack("zz_identity")
        class Identity(Attack):
            """Returns the input unchanged (test only)."""

            def _attack(self, x, y, target, mask, rng):
                return x.clone(), {"steps_run": 0}
    '''))
    try:
        importlib.reload(pkg)
        import torch
        import volattack

        assert "zz_identity" in volattack.list_attacks()
        x = torch.rand(1, 1, 4, 4, 4)
        res = volattack.create_attack("zz_identity", torch.nn.Conv3d(1, 2, 1)).run(x, torch.zeros(1, 1, 4, 4, 4).long())
        assert torch.equal(res.adv, x) and res.info["linf"] == [0.0]
    finally:
        new.unlink()
        ATTACKS._items.pop("zz_identity", None)
        sys.modules.pop("volattack.attacks.zz_test_attack", None)
