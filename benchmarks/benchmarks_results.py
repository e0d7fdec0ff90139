"""Replace one '## ' section of benchmarks/RESULTS.md, keeping the others."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEach section is written by the script it names; ratios are measured side by side in one run.\n\n"


def replace_section(title_prefix: str, text: str) -> None:
    """Replace the section whose heading starts with ``## title_prefix`` by ``text`` (or append it)."""
    body = RESULTS.read_text() if RESULTS.exists() else HEADER
    parts = body.split("\n## ")
    head, sections = parts[0], ["## " + p for p in parts[1:]]
    new = text.rstrip("\n") + "\n"
    for i, s in enumerate(sections):
        if s.startswith("## " + title_prefix):
            sections[i] = new
            break
    else:
        sections.append(new)
    out = head.rstrip("\n") + "\n\n" + "\n".join(s.rstrip("\n") + "\n" for s in sections)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(out)
    tmp.replace(RESULTS)
