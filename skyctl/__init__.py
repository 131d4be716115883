"""skyctl: the command-line interface over the Python SDK."""
