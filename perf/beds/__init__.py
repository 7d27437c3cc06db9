"""Beds: where benchmark pods live (the local Shoal cluster, or a throwaway netns topology)."""
