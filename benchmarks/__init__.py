"""Benchmarks of oars-fast (`make bench`). Results go to benchmarks/results/."""
