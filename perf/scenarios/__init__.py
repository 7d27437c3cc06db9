"""Scenario modules: each exports ``SCENARIO`` (see ``shoal.perf.scenario`` and perf/README.md)."""
