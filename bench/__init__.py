"""Benchmarks, each measured side by side with an anchor in the same run; results go to docs/benchmarks.md."""
