"""Benchmarks run by `caption-worker bench`; each prints ratios measured in one run."""
