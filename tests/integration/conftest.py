"""Fixtures of the integration tests: fake SSH hosts (real sshd on loopback, tests/sshd.py)."""
from tests.sshd import ssh_client_key, ssh_cluster, ssh_hosts, start_ssh_hosts  # noqa: F401  (fixtures)
