"""Coffer's benchmark suite: each cost of Coffer measured against the raw engine, in one run.

Run ``python -m bench`` (full mode) or ``python -m bench --quick`` (what CI runs); see
``docs/benchmarks.md`` for what each benchmark measures and its baseline.
"""
