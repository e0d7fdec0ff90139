"""Replace one '## ' section of benchmarks/RESULTS.md, keeping the others."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEach section is written by the script it names; ratios are measured side by side in one run.\n\n"


def replace_section(title_prefix: str, text: str, results: Path | str | None = None) -> None:
    """Replace the section whose heading starts with ``## title_prefix`` by ``text`` (or append it)
    in ``results`` (default: benchmarks/RESULTS.md), atomically."""
    path = Path(results) if results is not None else RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    body = path.read_text() if path.exists() else HEADER
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
    tmp = path.with_suffix(".tmp")
    tmp.write_text(out)
    tmp.replace(path)
    print(f"wrote section '{title_prefix}' of {path}")


def add_results_args(ap) -> None:
    """``--quick``, ``--write`` and ``--results PATH`` options shared by the benchmark scripts."""
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (timings meaningless)")
    ap.add_argument("--write", action="store_true", help="replace the section of --results")
    ap.add_argument("--results", default=str(RESULTS), help="RESULTS.md to update with --write")


def refuse_quick_write(ap, args) -> None:
    """A ``--quick`` smoke run may write only to a results file other than benchmarks/RESULTS.md."""
    if args.quick and args.write and Path(args.results).resolve() == RESULTS.resolve():
        ap.error("--quick timings are meaningless: pass --results PATH (not benchmarks/RESULTS.md) with --write.")


def emit(section: str, lines: list[str], args) -> None:
    """Print the section's text and, with ``--write``, replace it in ``--results``."""
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        replace_section(section, text, getattr(args, "results", None))


def add_quickstart_args(ap) -> None:
    """Options of the benchmarks that attack the quickstart model on its test phantoms."""
    ap.add_argument("--checkpoint", default="runs/quickstart/train/best.pt")
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--eps", default="4/255")
    ap.add_argument("--steps", type=int, default=10)


def load_quickstart(args):
    """``(run config, model, number of classes K, [(image, label), ...] test volumes)`` of the
    quickstart run named by ``--config`` / ``--checkpoint`` (eval preprocessing, whole volumes)."""
    import volattack
    from volattack.data.datalist import load_datalist
    from volattack.data.transforms import build_transforms
    from volattack.evaluation.cases import load_case
    from volattack.pipeline import load_run_config

    cfg = load_run_config(args.config)
    model, meta = volattack.load_checkpoint(args.checkpoint)
    datalist = cfg.data.datalist or f"{cfg.phantoms.out}/dataset.json"
    tf = build_transforms(cfg.data.preprocess, mode="eval")
    vols = [load_case(c, tf)[:2] for c in load_datalist(datalist, key="test")]
    return cfg, model, int(meta["model"]["out_channels"]), vols
