"""Analyses of trained models: attention patterns, ablations with downstream probes."""
