"""Shoal agent."""
