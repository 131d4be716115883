"""skyctl login, create user, auth can-i / whoami / revoke against an API server with auth and TLS."""
from __future__ import annotations

import stat

import pytest
import yaml
from click.testing import CliRunner

from skyctl.main import cli

from tests.conftest import wait_for
from tests.integration.auth_helpers import admin_token, auth_server, new_namespace, client_for, unique


@pytest.fixture(scope="module")
def server(etcd, tmp_path_factory):
    with auth_server(etcd, tmp_path_factory.mktemp("cli-home"), tls={"enabled": True}) as running:
        yield running


def skyctl(home, *args):
    return CliRunner().invoke(cli, ["--home", str(home), *args])


def test_an_admin_makes_a_user_who_logs_in_elsewhere(server, tmp_path):
    admin_home = server.settings.home_path  # the server's own home: config.yaml holds the admin token + CA
    with client_for(server, admin_token(server)) as admin:
        namespace = new_namespace(admin)
    name = unique("alice")
    made = skyctl(admin_home, "--server", server.endpoint, "create", "user", name, "--role", "editor",
                  "-n", namespace)
    assert made.exit_code == 0, made.stderr
    token = made.stdout.strip()
    assert len(token) >= 43 and f"user {name} created, role editor in {namespace}" in made.stderr

    home = tmp_path / "alice"
    ca_file = admin_home / "tls" / "ca.pem"
    logged_in = skyctl(home, "login", "--server", server.endpoint, "--token", token, "--ca-file", str(ca_file))
    assert logged_in.exit_code == 0, logged_in.stderr
    assert f"as {name}" in logged_in.stdout
    config_file = home / "config.yaml"
    assert stat.S_IMODE(config_file.stat().st_mode) == 0o600
    assert yaml.safe_load(config_file.read_text())["client"] == {"endpoint": server.endpoint, "token": token,
                                                                 "ca_file": str(ca_file)}

    assert skyctl(home, "auth", "whoami").stdout.strip() == name
    allowed = skyctl(home, "auth", "can-i", "create", "jobs", "-n", namespace)
    assert (allowed.exit_code, allowed.stdout.strip()) == (0, "yes")
    assert skyctl(home, "auth", "can-i", "list", "jobs").stdout.strip() == "yes, only some of them"
    refused = skyctl(home, "auth", "can-i", "delete", "clusters")
    assert (refused.exit_code, refused.stdout.strip()) == (1, "no")
    assert f"{name} may not delete clusters" in refused.stderr
    created = skyctl(home, "create", "job", "hello", "-n", namespace, "--run", "true")
    assert created.exit_code == 0, created.stderr
    denied = skyctl(home, "get", "jobs", "-n", "default")
    assert denied.exit_code == 1 and "may not list jobs" in denied.stderr

    revoked = skyctl(admin_home, "--server", server.endpoint, "auth", "revoke", name, "--all")
    assert revoked.exit_code == 0 and "revoked 1 token(s)" in revoked.stdout

    def refused_now() -> bool:
        result = skyctl(home, "auth", "whoami")
        return result.exit_code == 1 and "revoked" in result.stderr
    wait_for(refused_now, timeout=5, message="the revoked token to be refused")


def test_login_with_a_wrong_token_saves_nothing(server, tmp_path):
    result = skyctl(tmp_path, "login", "--server", server.endpoint, "--token", "wrong",
                    "--ca-file", str(server.settings.home_path / "tls" / "ca.pem"))
    assert result.exit_code == 1 and "unknown token" in result.stderr
    assert not (tmp_path / "config.yaml").exists()
