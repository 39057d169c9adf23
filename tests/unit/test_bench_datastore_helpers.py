"""The pure helper of ``bench datastore``'s boot rounds: which boot is the best of its kind."""

from __future__ import annotations

from bench.bench_datastore import best_boot


def test_best_boot_counts_publish_and_keeps_every_run() -> None:
    """Our boots are judged on publish + first line (what a person waits for), an anchor's on its first line;
    every run stays in the record."""
    ours = [
        {"publish_s": 3.0, "first_line_s": 20.0},  # the fastest guest, but the slowest wait
        {"publish_s": 0.5, "first_line_s": 21.0},
        {"publish_s": 1.0, "first_line_s": 22.0},
    ]
    best = best_boot(ours)
    assert (best["publish_s"], best["first_line_s"]) == (0.5, 21.0)
    assert best["runs"] == ours
    anchor = [{"first_line_s": 19.5}, {"first_line_s": 19.2}, {"first_line_s": 30.0}]
    assert best_boot(anchor)["first_line_s"] == 19.2
