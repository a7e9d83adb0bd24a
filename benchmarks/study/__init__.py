"""The Omniglot evidence study: run grid, resumable runner, statistics, report.

Used by ``benchmarks/omniglot_study.py``; every run is a plain ``nirdml.training.train``
call on a shipped preset plus ``key=value`` overrides, so any single run can be repeated
with ``nirdml train <preset> --set ...``.
"""
