"""Shoal waypoint."""
