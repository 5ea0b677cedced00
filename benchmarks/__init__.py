"""Benchmarks of ``cagrad_clip`` (not part of the installed package)."""
