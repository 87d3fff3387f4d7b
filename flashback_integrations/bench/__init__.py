"""Benchmarks whose outputs (JSON + PNG) are committed and quoted in the docs."""
