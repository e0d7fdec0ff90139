"""Shared helpers have one home (README, "Contributing"): atomic writes in ``volattack.utils``,
device resolution in ``volattack.utils.resolve_device``, the first head of a deep-supervision
output in ``volattack.ops.first_head``, straight-through estimators in
``volattack.ops.straight_through``. Checked on the source text of the package."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "volattack"

#: pattern -> the only module (relative to the repository) allowed to contain it
HOMES = {
    r"\bos\.replace\(|\bmkstemp\(": "volattack/utils.py",
    r"cuda\.is_available\(\) else": "volattack/utils.py",
    r"\[0\] if isinstance\(\w+, \(tuple, list\)\)|isinstance\(out, \(tuple, list\)\):": "volattack/ops.py",
    r"\+ \(\w+ - \w+\)\.detach\(\)": "volattack/ops.py",
}


def where(pattern: str) -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(pattern, code) and not code.strip().startswith(('"', "'")):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{i}")
    return found


@pytest.mark.parametrize("pattern", sorted(HOMES))
def test_helper_lives_in_one_module(pattern: str) -> None:
    home = HOMES[pattern]
    places = where(pattern)
    assert places, f"{pattern!r} not found at all: update the test"
    assert {p.rsplit(":", 1)[0] for p in places} == {home}, places
