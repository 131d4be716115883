"""Scheduler role: binds pending Replicas to clusters (DESIGN.md §4)."""
