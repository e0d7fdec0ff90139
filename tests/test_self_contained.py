"""The project speaks for itself: code, tests, configs, scripts and docs point to papers, README
sections or docstrings, never to design documents that a clone does not have."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"REFERENCE\.md|DESIGN\.md|\bshared/|/work/|\bREFERENCE:")


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / f for f in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every text file
        files = [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts]
    return [f for f in files if f.suffix in (".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".json", "")
            and f.is_file() and f != Path(__file__).resolve()]


def test_no_file_points_outside_the_repository() -> None:
    hits = []
    for f in tracked_files():
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                 if OUTSIDE.search(line)]
    assert hits == []
