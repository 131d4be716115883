"""The whole control plane with authentication and TLS on: launch_server.py, launch_manager.py
(acting as the manager identity) and the local cluster's skylet (acting as skylet:local with a
token the cluster controller issued), driven by skyctl with the admin token of config.yaml."""
from __future__ import annotations

import json

import pytest

from skyshift import config, tokens
from skyshift.client import Client
from tests.conftest import wait_for
from tests.e2e.control_plane import ControlPlane

pytestmark = pytest.mark.slow


class SecurePlane(ControlPlane):
    def ping(self) -> bool:
        # The server writes the admin token and its CA to config.yaml as it starts: read them again.
        self.settings = config.load(self.home, env={})
        return super().ping()


@pytest.fixture
def plane(tmp_path):
    control_plane = SecurePlane(tmp_path / "home", extra_settings={"auth": {"enabled": True},
                                                                   "tls": {"enabled": True},
                                                                   "audit": {"flush_interval": 0.05}})
    try:
        control_plane.start_server()
        control_plane.start_manager()
        yield control_plane
    finally:
        control_plane.stop()


def audit_identities(path) -> set:
    if not path.exists():
        return set()
    return {(line["identity"], line["method"], line["kind"]) for line in map(json.loads, path.read_text().splitlines())}


def test_jobs_run_with_least_privileged_manager_and_skylet_identities(plane):
    settings = config.load(plane.home, env={})  # now with the admin token and the CA the server wrote
    assert settings.client.token and settings.client.ca_file
    result = plane.skyctl("create", "job", "secure", "--cpus", "0.1", "--wait", "--run", "echo over-tls")
    assert result.returncode == 0, result.stderr
    assert "[secure-0] over-tls" in result.stdout or "over-tls" in result.stdout

    with Client(endpoint=plane.endpoint, settings=settings) as admin:
        skylet_user = admin.get("users", "skylet-local")
        assert skylet_user.metadata.labels[tokens.CLUSTER_LABEL] == "local"
        pid = plane.skylet_pid()
        assert pid is not None
        with open(f"/proc/{pid}/environ", "rb") as handle:
            environ = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
        assert tokens.has_token(skylet_user, environ[b"SKYSHIFT_TOKEN"].decode())  # its own token, not admin's

    def recorded() -> bool:
        seen = audit_identities(settings.audit_log_file)
        return (("skylet:local", "UpdateStatus", "replicas") in seen
                or ("skylet:local", "BatchUpdate", "replicas") in seen) and ("manager", "BatchCreate", "replicas") in seen
    wait_for(recorded, timeout=10, message="the skylet's and the manager's writes in the audit log")
    lines = [json.loads(line) for line in settings.audit_log_file.read_text().splitlines()]
    refused = [line for line in lines if line["code"] in ("PERMISSION_DENIED", "UNAUTHENTICATED")]
    assert refused == [], "a component was refused something it needs"
