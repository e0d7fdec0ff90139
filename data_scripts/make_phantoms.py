#!/usr/bin/env python
"""Write a synthetic abdominal-CT phantom dataset (NIfTI + MSD-style dataset.json).

Stand-alone entry of ``volattack.data.phantoms.make_phantom_dataset`` (the same as
``volattack phantoms``)::

    python data_scripts/make_phantoms.py data/phantoms --n 16 --size 64 64 48 --seed 0
    python data_scripts/make_phantoms.py out --n 4 --param noise_hu=10 --param blur_sigma=0.5
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Optional, Sequence


def _parse_param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param must be KEY=VALUE, got {text!r}.")
    key, value = text.split("=", 1)
    low = value.strip().lower()
    if low in ("true", "false"):
        return key.strip(), low == "true"
    try:
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--param {key} needs a number or true/false, got {value!r}."
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (no heavy imports)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="output folder (imagesTr/, labelsTr/, dataset.json)")
    p.add_argument("--n", type=int, default=16, help="number of training cases")
    p.add_argument("--n-val", type=int, default=2, help="number of validation cases")
    p.add_argument("--n-test", type=int, default=4, help="number of test cases")
    p.add_argument("--size", type=int, nargs=3, default=(64, 64, 48), metavar=("H", "W", "D"),
                   help="grid size in voxels (each >= 16)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                   help="fixed voxel spacing in mm (default: about 1.5 1.5 3.0, jittered per case)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--param", "-p", type=_parse_param, action="append", default=[], metavar="KEY=VALUE",
                   help="generate_phantom keyword, e.g. noise_hu=15 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse arguments, generate the dataset, print the datalist path; 2 on bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from volattack.data.phantoms import make_phantom_dataset

    try:
        path = make_phantom_dataset(
            args.out, n=args.n, size=tuple(args.size), seed=args.seed, n_val=args.n_val,
            n_test=args.n_test, spacing=args.spacing, phantom_kwargs=dict(args.param),
        )
    except ValueError as e:
        parser.error(str(e))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
