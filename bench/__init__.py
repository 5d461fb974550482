"""Benchmarks: one ``bench_<op>.py`` per op, run by ``fastlm bench`` (``bench/run.py``)."""
