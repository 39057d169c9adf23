"""A small bootable demo VM (Debian kernel + busybox root) for the demo, the tests and the benchmarks."""
