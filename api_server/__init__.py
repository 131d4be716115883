"""API server role: validation, storage and watch fan-out over etcd (DESIGN.md §3)."""
