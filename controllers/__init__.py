"""Controller manager role: runs the controllers (DESIGN.md §4)."""
