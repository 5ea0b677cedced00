"""Synthetic Pareto benchmarks: ``python -m benchmarks.pareto``."""
