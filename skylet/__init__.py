"""Skylet role: the agent of a cluster (DESIGN.md §5)."""
