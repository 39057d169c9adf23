"""Run every benchmark module (bench/bench_*.py) in turn, or those named: python -m bench repo nfsd."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench


def main(names: list[str]) -> int:
    modules = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    wanted = [f"bench_{n}" if not n.startswith("bench_") else n for n in names] or modules
    unknown = sorted(set(wanted) - set(modules))
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; have: {', '.join(modules)}", file=sys.stderr)
        return 2
    for name in wanted:
        print(f"== {name}", flush=True)
        module = importlib.import_module(f"bench.{name}")
        module.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
