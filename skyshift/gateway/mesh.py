"""Gateway-to-gateway connections over a Link (the mesh).

Every gateway listens on a mesh port. To forward a client's connection to an endpoint on a
linked cluster, a gateway opens a connection to that cluster's gateway, which connects to the
endpoint and then carries the bytes. Both sides first prove they hold the Link's shared secret
with an HMAC-SHA256 challenge-response over fresh nonces (no replay), and the remote side only
ever connects to endpoints of its own cluster:

    client -> server   SKYMESH/1 <link> <client nonce>\\n
    server -> client   <server nonce> <server mac>\\n               (or ERR <reason>\\n)
    client -> server   <client mac> <verb> <address> <port> <path or ->\\n
    server -> client   OK\\n  or  ERR <reason>\\n
    then, after OK to CONNECT, the connection's bytes in both directions.

    server mac = HMAC(secret, "server" | link | client nonce | server nonce)
    client mac = HMAC(secret, "client" | link | client nonce | server nonce | request)

Verbs: CONNECT (forward to the endpoint), PROBE (is that endpoint healthy? the server probes it
as its own health checker does: HTTP probes of remote endpoints run next to them), PING (does
the gateway answer and know the Link? the Link controller's probe).

This authenticates gateways but does not encrypt the bytes, and the secret is kept in the
Link object. The next step is mTLS between gateways with per-cluster certificates, and the
secret moving to a Secret kind.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import secrets
from typing import Awaitable, Callable, Optional, Tuple

import structlog

from skyshift.gateway.addresses import split_host_port
from skyshift.gateway.proxy import Sessions, Streams, splice

log = structlog.get_logger(__name__)

PROTOCOL = "SKYMESH/1"
CONNECT, PROBE, PING = "CONNECT", "PROBE", "PING"
VERBS = (CONNECT, PROBE, PING)
#: Longest handshake line accepted (a line holds at most a link name, a nonce and a request).
MAX_LINE = 1024
NONCE_BYTES = 16


class MeshError(ConnectionError):
    """A remote gateway refused a request or failed the handshake."""


@dataclasses.dataclass(frozen=True)
class Route:
    """How to reach a linked cluster's gateway: the Link's name, the remote mesh "host:port"
    and the Link's shared secret."""

    link: str
    mesh_address: str
    secret: bytes = dataclasses.field(repr=False)


def new_secret() -> str:
    """A fresh Link secret (hex)."""
    return secrets.token_hex(32)


def _mac(secret: bytes, *parts: str) -> str:
    return hmac.new(secret, "\0".join(parts).encode(), hashlib.sha256).hexdigest()


async def _read_line(reader: asyncio.StreamReader) -> str:
    line = await reader.readline()
    if not line.endswith(b"\n"):
        raise MeshError("the connection closed during the mesh handshake")
    if len(line) > MAX_LINE:
        raise MeshError("mesh handshake line too long")
    return line.decode("ascii", errors="replace").rstrip("\n")


def _refusal(line: str) -> Optional[str]:
    return line[4:] if line.startswith("ERR ") else None


async def open_tunnel(route: Route, verb: str, address: str = "-", port: int = 0, path: str = "",
                      timeout: float = 5.0, buffer_size: int = 65536) -> Streams:
    """Authenticate to the remote gateway of `route` and send one request. For CONNECT the
    returned streams carry the endpoint's bytes; for PROBE and PING the answer was OK (close
    them). MeshError when the gateway refuses, OSError or TimeoutError when it cannot be reached."""
    host, mesh_port = split_host_port(route.mesh_address)

    async def handshake() -> Streams:
        reader, writer = await asyncio.open_connection(host, mesh_port, limit=buffer_size)
        try:
            client_nonce = secrets.token_hex(NONCE_BYTES)
            writer.write(f"{PROTOCOL} {route.link} {client_nonce}\n".encode())
            line = await _read_line(reader)
            refusal = _refusal(line)
            if refusal is not None:
                raise MeshError(f"the gateway at {route.mesh_address} refused: {refusal}")
            server_nonce, _, server_mac = line.partition(" ")
            expected = _mac(route.secret, "server", route.link, client_nonce, server_nonce)
            if not hmac.compare_digest(server_mac, expected):
                raise MeshError(f"the gateway at {route.mesh_address} does not hold the secret of link {route.link}")
            request = f"{verb} {address} {port} {path or '-'}"
            client_mac = _mac(route.secret, "client", route.link, client_nonce, server_nonce, request)
            writer.write(f"{client_mac} {request}\n".encode())
            answer = await _read_line(reader)
            if answer != "OK":
                raise MeshError(_refusal(answer) or f"unexpected answer {answer[:80]!r}")
            return reader, writer
        except BaseException:
            writer.close()
            raise

    async with asyncio.timeout(timeout):
        return await handshake()


async def ping(route: Route, timeout: float) -> None:
    """Raise unless the remote gateway answers and knows the Link."""
    _, writer = await open_tunnel(route, PING, timeout=timeout)
    writer.close()


class _Refused(Exception):
    pass


class MeshServer:
    """The mesh listener of one gateway.

    secret_of(link): the secret of a Link that involves this gateway's cluster, else None.
    allowed(address, port): whether that is an endpoint of this cluster (nothing else is reachable).
    probe(address, port, path): the local health probe (raises when unhealthy)."""

    def __init__(self, secret_of: Callable[[str], Optional[bytes]], allowed: Callable[[str, int], bool],
                 probe: Callable[[str, int, str], Awaitable[None]], sessions: Sessions, connect_timeout: float,
                 buffer_size: int, idle_timeout: float):
        self.secret_of = secret_of
        self.allowed = allowed
        self.probe = probe
        self.sessions = sessions
        self.connect_timeout = connect_timeout
        self.buffer_size = buffer_size
        self.idle_timeout = idle_timeout
        self.address = ""
        self._server: Optional[asyncio.AbstractServer] = None

    async def start(self, host: str, port: int) -> str:
        """Listen; returns the bound "host:port"."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=self.buffer_size, reuse_address=True)
        bound = self._server.sockets[0].getsockname()
        self.address = f"{bound[0]}:{bound[1]}"
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _authenticate(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> Tuple[str, str, str, int, str]:
        fields = (await _read_line(reader)).split(" ")
        if len(fields) != 3 or fields[0] != PROTOCOL:
            raise _Refused("not a mesh handshake")
        _, link, client_nonce = fields
        secret = self.secret_of(link)
        if secret is None:
            raise _Refused(f"no link {link!r} with this cluster")
        server_nonce = secrets.token_hex(NONCE_BYTES)
        writer.write(f"{server_nonce} {_mac(secret, 'server', link, client_nonce, server_nonce)}\n".encode())
        client_mac, _, request = (await _read_line(reader)).partition(" ")
        if not hmac.compare_digest(client_mac, _mac(secret, "client", link, client_nonce, server_nonce, request)):
            raise _Refused("authentication failed")
        parts = request.split(" ")
        if len(parts) != 4 or parts[0] not in VERBS or not parts[2].isdigit():
            raise _Refused("malformed request")
        verb, address, port, path = parts
        return link, verb, address, int(port), "" if path == "-" else path

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            async with asyncio.timeout(self.connect_timeout):
                link, verb, address, port, path = await self._authenticate(reader, writer)
            if verb != PING and not self.allowed(address, port):
                raise _Refused(f"{address}:{port} is not an endpoint of this cluster")
            if verb == CONNECT:
                await self._connect(link, address, port, (reader, writer))
                return
            if verb == PROBE:
                try:
                    await asyncio.wait_for(self.probe(address, port, path), self.connect_timeout)
                except Exception as error:  # whatever failed, the answer is "unhealthy"
                    raise _Refused(f"unhealthy: {error or type(error).__name__}") from None
            writer.write(b"OK\n")
        except _Refused as refusal:
            log.debug("mesh_refused", peer=str(peer), reason=str(refusal))
            writer.write(f"ERR {refusal}\n".encode())
        except (MeshError, OSError, asyncio.TimeoutError) as error:
            log.debug("mesh_handshake_failed", peer=str(peer), error=str(error) or type(error).__name__)
        except asyncio.CancelledError:
            # The gateway is stopping (see proxy.Listener._serve: end quietly).
            writer.transport.abort()
            return
        writer.close()

    async def _connect(self, link: str, address: str, port: int, client: Streams) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout):
                upstream = await asyncio.open_connection(address, port, limit=self.buffer_size)
        except (OSError, asyncio.TimeoutError) as error:
            raise _Refused(f"cannot connect to {address}:{port}: {error or type(error).__name__}") from None
        client[1].write(b"OK\n")
        await splice(client, upstream, self.buffer_size, self.idle_timeout, self.sessions, link)
