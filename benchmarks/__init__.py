"""Benchmarks for gradclip: run ``python -m benchmarks.clip`` from the repository root."""
