"""TLS end to end: a CA and server certificate made on first start, trusted through the client
config; an untrusted certificate (or plaintext) fails; optional mutual TLS."""
from __future__ import annotations

import stat

import pytest

from api_server import tls
from skyshift import config
from skyshift.api.errors import UnavailableError
from skyshift.client import Client

from tests.conftest import ServerThread, make_settings
from tests.integration.auth_helpers import admin_token, auth_server


def client(server: ServerThread, **client_settings) -> Client:
    """A client with this home's settings (which trust the generated CA), changed as given."""
    settings = config.load(server.settings.home_path, env={})
    settings.client.retry_attempts = 2
    settings.client.call_timeout = 5.0
    for key, value in client_settings.items():
        setattr(settings.client, key, value)
    return Client(endpoint=server.endpoint, settings=settings)


def fails(client_: Client) -> bool:
    with client_:
        try:
            client_.get("namespaces", "default")
        except UnavailableError:
            return True
    return False


@pytest.fixture
def other_ca(tmp_path):
    """A CA the server does not know: its certificate file, and one of its client certificates."""
    ca_cert, ca_key = tls.make_ca("untrusted", 1)
    (tmp_path / "other-ca.pem").write_bytes(ca_cert)
    cert, key = tls.issue_certificate(ca_cert, ca_key, "mallory", client=True)
    (tmp_path / "mallory.pem").write_bytes(cert)
    (tmp_path / "mallory-key.pem").write_bytes(key)
    return tmp_path


def test_tls_with_a_generated_ca_works_end_to_end(etcd, tmp_path, other_ca):
    home = tmp_path / "home"
    with auth_server(etcd, home, tls={"enabled": True}) as server:
        files = home / "tls"
        for name, mode in (("ca.pem", 0o644), ("ca-key.pem", 0o600), ("server.pem", 0o644),
                           ("server-key.pem", 0o600)):
            assert stat.S_IMODE((files / name).stat().st_mode) == mode, name
        assert config.load(home, env={}).client.ca_file == str(files / "ca.pem")
        with client(server, token=admin_token(server)) as trusted:
            assert trusted.get("namespaces", "default").metadata.name == "default"
            assert trusted.can_i("delete", "users").allowed
        assert fails(client(server, ca_file=""))  # plaintext against a TLS server
        assert fails(client(server, ca_file=str(other_ca / "other-ca.pem")))  # untrusted server certificate
        ca_before = (files / "ca.pem").read_bytes()
        cert_before = (files / "server.pem").read_bytes()
        names = server.settings.auth
    with auth_server(etcd, home, tls={"enabled": True},
                     auth={"admin_user": names.admin_user, "manager_user": names.manager_user}) as again:
        assert (files / "ca.pem").read_bytes() == ca_before  # made once, kept
        assert (files / "server.pem").read_bytes() == cert_before
        with client(again, token=admin_token(again)) as trusted:
            trusted.get("namespaces", "default")


def test_mutual_tls_requires_a_client_certificate_from_the_ca(etcd, tmp_path, other_ca):
    home = tmp_path / "home"
    settings = make_settings(home, tls={"enabled": True, "client_auth": True})
    server = ServerThread(settings, etcd.endpoint).start()
    try:
        files = home / "tls"
        cert, key = tls.issue_certificate((files / "ca.pem").read_bytes(), (files / "ca-key.pem").read_bytes(),
                                          "alice", client=True)
        (tmp_path / "alice.pem").write_bytes(cert)
        (tmp_path / "alice-key.pem").write_bytes(key)
        with client(server, cert_file=str(tmp_path / "alice.pem"), key_file=str(tmp_path / "alice-key.pem")) as alice:
            assert alice.get("namespaces", "default").metadata.name == "default"
        assert fails(client(server))  # no client certificate
        assert fails(client(server, cert_file=str(other_ca / "mallory.pem"),
                            key_file=str(other_ca / "mallory-key.pem")))
    finally:
        server.stop()


def test_configured_certificates_are_served_as_given(etcd, tmp_path):
    ca_cert, ca_key = tls.make_ca("corporate", 1)
    cert, key = tls.issue_certificate(ca_cert, ca_key, "api", ["127.0.0.1"])
    for name, data in (("ca.pem", ca_cert), ("api.pem", cert), ("api-key.pem", key)):
        (tmp_path / name).write_bytes(data)
    settings = make_settings(tmp_path / "home", tls={"enabled": True, "cert_file": str(tmp_path / "api.pem"),
                                                     "key_file": str(tmp_path / "api-key.pem")})
    server = ServerThread(settings, etcd.endpoint).start()
    try:
        assert not (tmp_path / "home" / "tls").exists()
        with client(server, ca_file=str(tmp_path / "ca.pem")) as trusted:
            trusted.get("namespaces", "default")
        assert fails(client(server))  # the home's config names no CA for it
    finally:
        server.stop()
