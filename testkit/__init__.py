"""Shared by the tests and the benchmarks: workloads, the independent oracle, real-broker helpers."""
