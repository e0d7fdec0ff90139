"""The README's command-line tour is consistent: every checkpoint a later command reads is the one
the tour's ``volattack train`` writes (``<--out or output_dir>/best.pt``)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def tour_lines() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    tour = [b for b in blocks if "volattack train " in b and "volattack attack " in b]
    assert len(tour) == 1, "the README has one command-line tour with train and attack"
    return [shlex.split(line, comments=True) for line in tour[0].splitlines() if line.strip()]


def test_tour_reads_the_checkpoint_that_its_train_command_writes() -> None:
    lines = tour_lines()
    train = next(a for a in lines if a[:2] == ["volattack", "train"])
    out = train[train.index("--out") + 1] if "--out" in train else yaml.safe_load(
        (ROOT / train[2]).read_text())["output_dir"]
    written = f"{out}/best.pt"
    read = [tok for a in lines if a[1] in ("attack", "evaluate") for tok in a if tok.endswith(".pt")]
    assert read, "the tour's attack/evaluate commands name a checkpoint"
    assert set(read) == {written}, f"train writes {written}; the tour reads {sorted(set(read))}"


def test_tour_configs_exist() -> None:
    for a in tour_lines():
        for tok in a:
            if tok.endswith((".yaml", ".yml")):
                assert (ROOT / tok).is_file(), tok
