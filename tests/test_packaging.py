"""pyproject.toml states the real minimum versions of what the code uses."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: torch APIs used by volattack -> the first torch release that has them
TORCH_APIS = {
    r"torch\.get_autocast_dtype\(": (2, 4),
    r"torch\.is_autocast_enabled\(\w": (2, 4),  # with a device argument
    r"torch\.amp\.GradScaler\(": (2, 3),
}


def _torch_minimum() -> tuple[int, ...]:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'"torch>=(\d+)\.(\d+)', text)
    assert m, "pyproject.toml must state a torch minimum as torch>=X.Y"
    return int(m.group(1)), int(m.group(2))


def test_torch_minimum_covers_every_api_the_code_uses() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "volattack").rglob("*.py"))
    used = {api: v for api, v in TORCH_APIS.items() if re.search(api, source)}
    assert used, "the table of version-dependent APIs matches nothing: update it"
    needed = max(used.values())
    assert _torch_minimum() >= needed, f"pyproject says torch>={_torch_minimum()}, the code needs {needed}: {used}"


def test_version_is_one_number() -> None:
    import volattack

    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == volattack.__version__
