"""TLS for the API server (settings.tls).

With `tls.enabled` and no `tls.cert_file`, the server makes its own certificates on first start,
under $SKYSHIFT_HOME/tls/ (keys mode 0600):

    ca.pem, ca-key.pem          a CA (EC P-256, `tls.ca_days`) made once and kept
    server.pem, server-key.pem  the server's certificate, signed by that CA, for localhost,
                                127.0.0.1, ::1, this host's name, the listen address and
                                `tls.hosts`; made again when missing, near expiry or missing a name

and records the CA in the local client config (client.ca_file), so the local skyctl, the
manager and the skylets trust it; remote clients get ca.pem by hand (`skyctl login --ca-file`).
With `tls.cert_file`/`tls.key_file` those are served instead. `tls.client_auth` makes it mutual:
clients must present a certificate signed by `tls.client_ca_file` (default: the CA above), set
as client.cert_file/client.key_file; `issue_certificate` makes them. Identity still comes from
the bearer token; the client certificate only admits the connection.
"""
from __future__ import annotations

import dataclasses
import hashlib
import datetime
import ipaddress
import os
import pathlib
import socket
from typing import Iterable, List, Optional, Tuple

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from skyshift import config

log = structlog.get_logger(__name__)

#: A server certificate is made again when it expires within this many days.
RENEW_BEFORE_DAYS = 30


@dataclasses.dataclass(frozen=True)
class ServerFiles:
    cert: pathlib.Path
    key: pathlib.Path
    #: The CA clients must trust (None when the certificate was given, not made here).
    ca: Optional[pathlib.Path]


def _write(path: pathlib.Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SkyShift"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=days))


def make_ca(common_name: str, days: int) -> Tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a new self-signed CA."""
    key = _new_key()
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True))
    cert = _validity(builder, days).sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _san(hosts: Iterable[str]) -> List[x509.GeneralName]:
    names: List[x509.GeneralName] = []
    for host in dict.fromkeys(h for h in hosts if h):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue_certificate(ca_cert_pem: bytes, ca_key_pem: bytes, common_name: str, hosts: Iterable[str] = (),
                      client: bool = False, days: int = 365) -> Tuple[bytes, bytes]:
    """(certificate PEM, key PEM) signed by the CA: a server certificate for `hosts`, or with
    `client` a client certificate (mutual TLS)."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = _new_key()
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    names = _san(hosts)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = _validity(builder, days).sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def server_hosts(settings: config.Settings) -> List[str]:
    listen_host = settings.api.listen.rpartition(":")[0].strip("[]")
    hosts = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *settings.tls.hosts]
    if listen_host and listen_host not in ("0.0.0.0", "::"):
        hosts.append(listen_host)
    return hosts


def _needs_new(cert_path: pathlib.Path, hosts: List[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (FileNotFoundError, ValueError):
        return True
    expires = cert.not_valid_after_utc
    if expires - datetime.datetime.now(datetime.timezone.utc) < datetime.timedelta(days=RENEW_BEFORE_DAYS):
        return True
    try:
        present = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    return any(name not in present for name in _san(hosts))


def ensure_server_files(settings: config.Settings) -> ServerFiles:
    """The certificate and key to serve (made under $SKYSHIFT_HOME/tls/ unless configured)."""
    tls = settings.tls
    if tls.cert_file or tls.key_file:
        if not (tls.cert_file and tls.key_file):
            raise ValueError("tls.cert_file and tls.key_file go together")
        return ServerFiles(pathlib.Path(tls.cert_file), pathlib.Path(tls.key_file), None)
    directory = settings.tls_dir
    ca_path, ca_key_path = directory / "ca.pem", directory / "ca-key.pem"
    cert_path, key_path = directory / "server.pem", directory / "server-key.pem"
    if not (ca_path.exists() and ca_key_path.exists()):
        # Named after its home (a CN holds at most 64 characters), so two instances' CAs differ by name too.
        instance = hashlib.sha256(str(settings.home_path.resolve()).encode()).hexdigest()[:12]
        ca_cert, ca_key = make_ca(f"SkyShift CA {instance}", tls.ca_days)
        _write(ca_key_path, ca_key, private=True)
        _write(ca_path, ca_cert, private=False)
        log.info("tls_ca_created", path=str(ca_path))
    hosts = server_hosts(settings)
    if _needs_new(cert_path, hosts):
        cert, key = issue_certificate(ca_path.read_bytes(), ca_key_path.read_bytes(), "skyshift-api-server", hosts,
                                      days=tls.cert_days)
        _write(key_path, key, private=True)
        _write(cert_path, cert, private=False)
        log.info("tls_server_certificate_created", path=str(cert_path), hosts=hosts)
    return ServerFiles(cert_path, key_path, ca_path)


def server_credentials(settings: config.Settings, files: ServerFiles) -> grpc.ServerCredentials:
    tls = settings.tls
    client_ca = None
    if tls.client_auth:
        ca_file = tls.client_ca_file or (str(files.ca) if files.ca else "")
        if not ca_file:
            raise ValueError("tls.client_auth needs tls.client_ca_file (the CA of the client certificates)")
        client_ca = pathlib.Path(ca_file).read_bytes()
    return grpc.ssl_server_credentials([(files.key.read_bytes(), files.cert.read_bytes())],
                                       root_certificates=client_ca, require_client_auth=tls.client_auth)
