#!/usr/bin/env python3
"""Write the bundled synthetic data of all three phases, and (by default) build their shards.

    python tools/make_synthetic_data.py [--out outputs/data] [--n 256] [--seed 0] [--no-shards]

Writes OUT/raw/phase{1,2,3}.jsonl with images under OUT/raw/images/, and shards under
OUT/phase{1,2,3} (the paths recipes/tiny/phase*.yaml read). Same seed: identical files.
"""
from __future__ import annotations

import argparse
import sys

from megammr.data.synthetic import write_all


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/data", help="output root (default: outputs/data)")
    p.add_argument("--n", type=int, default=256, help="records per phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phases", type=int, nargs="+", default=[1, 2, 3], choices=(1, 2, 3))
    p.add_argument("--no-shards", action="store_true", help="only write the JSONL and images")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error("--n must be >= 1")
    res = write_all(a.out, n=a.n, seed=a.seed, phases=tuple(a.phases), build=not a.no_shards,
                    progress=not a.no_progress)
    for phase, r in res.items():
        print(f"phase {phase}: {a.n} records -> {r['jsonl']}" + (f", shards {r['shards']}" if r["shards"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
