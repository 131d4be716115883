"""Real servers on loopback for the gateway's tests: each says its name, then echoes."""
from __future__ import annotations

import asyncio
import socket
from typing import List, Optional, Tuple


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


class NamedEchoServer:
    """Sends `name + "\\n"` to each new connection, then echoes what it receives; on EOF from
    the client it answers "bye\\n" and closes (so half-close can be observed)."""

    def __init__(self, name: str, address: str = "127.0.0.1", port: int = 0):
        self.name = name
        self.address = address
        self.port = port
        self.connections = 0
        self.open_connections: List[asyncio.StreamWriter] = []
        self._server: Optional[asyncio.AbstractServer] = None

    async def start(self) -> "NamedEchoServer":
        self._server = await asyncio.start_server(self._serve, self.address, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """The replica dies: stop listening and reset its open connections."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in self.open_connections:
            writer.transport.abort()
        self.open_connections.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections.append(writer)
        try:
            writer.write(f"{self.name}\n".encode())
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write(b"bye\n")
            await writer.drain()
        except (OSError, asyncio.CancelledError):  # reset, or the test ends (a cancelled handler logs an error)
            pass
        finally:
            if writer in self.open_connections:
                self.open_connections.remove(writer)
            writer.close()


async def ask_name(address: str, port: int, timeout: float = 5.0) -> str:
    """Connect, read the server's name line, close; "" when the connection was closed at once."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
        return line.decode().strip()
    finally:
        writer.close()


async def open_named(address: str, port: int, timeout: float = 5.0) -> Tuple[str, asyncio.StreamReader,
                                                                              asyncio.StreamWriter]:
    """Connect and keep the connection: (server name, reader, writer)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    line = await asyncio.wait_for(reader.readline(), timeout)
    return line.decode().strip(), reader, writer
