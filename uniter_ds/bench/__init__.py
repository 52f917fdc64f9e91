"""Pieces of the benchmark suite that live in the package: FLOP counting and the baseline model."""
