"""Throughput and memory benchmarks, their results, and the regression check."""
