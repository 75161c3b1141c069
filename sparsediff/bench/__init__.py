"""Benchmarks: `sparsediff bench kernel|predict|e2e`."""
