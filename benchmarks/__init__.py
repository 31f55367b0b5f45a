"""Benchmarks: throughput, quality and planner sweeps, each writing JSON and a table."""
