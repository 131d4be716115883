"""etcd access. Only api_server (and tests) import this package (DESIGN.md §7)."""
