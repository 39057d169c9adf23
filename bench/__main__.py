"""Run every benchmark module (bench/bench_*.py) in turn, or those named: python -m bench repo nfsd.

Options (arguments starting with "-", e.g. --quick) are passed to every module run."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench
from bench._common import exclusive_run


def main(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")]
    options = [a for a in argv if a.startswith("-")]
    modules = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    wanted = [f"bench_{n}" if not n.startswith("bench_") else n for n in names] or modules
    unknown = sorted(set(wanted) - set(modules))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; have: {', '.join(modules)}", file=sys.stderr)
        return 2
    failed = 0
    with exclusive_run():
        for name in wanted:
            print(f"== {name}", flush=True)
            module = importlib.import_module(f"bench.{name}")
            failed += 1 if module.main(options) else 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
