"""Shoal's benchmark harness: scenarios run side by side, reported as medians and ratios.

See perf/README.md for the scenario interface (``shoal.perf.scenario``).
"""
