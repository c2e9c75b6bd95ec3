"""Benchmarks: speed, load and quality, measured side by side in one run."""
