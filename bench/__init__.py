"""Benchmarks, run from the repository root as `python -m bench <name>`.

A plain folder, not part of the installed package: benchmarks start servers, brokers
and load generators, which the service itself must never depend on.
"""
