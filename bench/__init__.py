"""Benchmarks (DESIGN.md §8): run from the repository root, e.g. `python -m bench.run_all`."""
