"""Shoal perf."""
