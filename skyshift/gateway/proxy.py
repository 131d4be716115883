"""TCP forwarding with asyncio streams: a Service port's listener, and the byte copying both it
and the mesh use.

Data is copied in chunks of up to `buffer_size` bytes (`read(buffer_size)`, `write`, `drain`):
no per-byte work, one await per chunk and direction. End of stream is forwarded as a half-close
(`write_eof`), so protocols that shut down one direction first (HTTP/1.0 clients, `nc -N`...)
work; the connection closes once both directions have ended, or after `idle_timeout` seconds
without data in either direction, or at once when either side resets.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, Callable, Dict, Optional, Set, Tuple

import structlog

from skyshift.gateway.balancer import Backend, Balancer

log = structlog.get_logger(__name__)

Streams = Tuple[asyncio.StreamReader, asyncio.StreamWriter]
#: Opens a connection to a backend (directly, or through a remote gateway).
Dialer = Callable[[Backend], Awaitable[Streams]]


class Sessions:
    """Forwarded connections by the Link they use, so that removing a Link ends them."""

    def __init__(self) -> None:
        self._aborts: Dict[str, Set[Callable[[], None]]] = {}

    def add(self, link: str, abort: Callable[[], None]) -> None:
        self._aborts.setdefault(link, set()).add(abort)

    def discard(self, link: str, abort: Callable[[], None]) -> None:
        self._aborts.get(link, set()).discard(abort)

    def count(self, link: str) -> int:
        return len(self._aborts.get(link, ()))

    def close(self, link: str) -> None:
        for abort in self._aborts.pop(link, set()):
            abort()


class _Activity:
    """When bytes last moved; ends an idle connection with one timer per idle period (not one
    per chunk)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout: float, expire: Callable[[], None]):
        self.loop = loop
        self.idle_timeout = idle_timeout
        self.expire = expire
        self.last = loop.time()
        self._timer = loop.call_later(idle_timeout, self._check)

    def _check(self) -> None:
        if self.loop.time() - self.last >= self.idle_timeout:
            self.expire()
        else:
            self._timer = self.loop.call_at(self.last + self.idle_timeout, self._check)

    def cancel(self) -> None:
        self._timer.cancel()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, buffer_size: int,
                activity: _Activity) -> None:
    while True:
        data = await reader.read(buffer_size)
        if not data:
            break
        activity.last = activity.loop.time()
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        with contextlib.suppress(OSError):  # the other side is gone already: nothing to tell it
            writer.write_eof()


async def splice(a: Streams, b: Streams, buffer_size: int, idle_timeout: float, sessions: Optional[Sessions] = None,
                 link: str = "") -> None:
    """Copy a -> b and b -> a until both directions ended (each end of stream is passed on as
    a half-close), either side reset, nothing moved for `idle_timeout` seconds, or `link` was
    closed in `sessions`; closes both.

    One direction runs in the calling task, the other in one more task. A reset, the idle timer
    or the link's end aborts both transports, which ends both copies through their reads: no
    task is cancelled."""
    loop = asyncio.get_running_loop()

    def abort() -> None:
        a[1].transport.abort()
        b[1].transport.abort()

    def backward_done(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            abort()

    activity = _Activity(loop, idle_timeout, abort)
    backward = loop.create_task(_copy(b[0], a[1], buffer_size, activity))
    backward.add_done_callback(backward_done)
    if sessions is not None:
        sessions.add(link, abort)
    try:
        try:
            await _copy(a[0], b[1], buffer_size, activity)
        except OSError:
            abort()
        with contextlib.suppress(OSError):
            await backward
    finally:
        if sessions is not None:
            sessions.discard(link, abort)
        activity.cancel()
        backward.cancel()
        a[1].close()
        b[1].close()


async def connect_upstream(balancer: Balancer, dial: Dialer, attempts: int) -> Optional[Tuple[Backend, Streams]]:
    """A connection to one of the balancer's backends: each that fails to connect is taken out
    of rotation and the next one is tried, up to `attempts` backends. None when all failed."""
    tried: Set[Backend] = set()
    for _ in range(attempts):
        backend = balancer.choose(tried)
        if backend is None:
            return None
        tried.add(backend)
        try:
            return backend, await dial(backend)
        except (OSError, asyncio.TimeoutError, EOFError, ValueError) as error:  # ValueError: a bad address
            backend.connect_failed(str(error) or type(error).__name__)
    return None


class Listener:
    """One listening socket of a Service port; each accepted connection is forwarded to a
    backend the current `balancer` chooses (replaceable while the listener runs)."""

    def __init__(self, address: str, port: int, balancer: Balancer, dial: Dialer, attempts: int,
                 buffer_size: int, idle_timeout: float, sessions: Optional[Sessions] = None):
        self.address = address
        self.port = port
        self.balancer = balancer
        self.dial = dial
        self.attempts = attempts
        self.buffer_size = buffer_size
        self.idle_timeout = idle_timeout
        self.sessions = sessions
        self._server: Optional[asyncio.AbstractServer] = None

    async def start(self) -> None:
        """Bind and listen; OSError when the address or port cannot be used."""
        self._server = await asyncio.start_server(self._serve, self.address, self.port, limit=self.buffer_size,
                                                  reuse_address=True)

    async def close(self) -> None:
        """Stop accepting; connections being forwarded go on until they end (so this does not
        wait for them, as Server.wait_closed would on newer Pythons)."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            connected = await connect_upstream(self.balancer, self.dial, self.attempts)
            if connected is None:
                log.debug("gateway_no_backend", address=self.address, port=self.port)
                writer.close()
                return
            backend, upstream = connected
            link = backend.route.link if backend.route is not None else ""
            backend.active += 1
            try:
                await splice((reader, writer), upstream, self.buffer_size, self.idle_timeout,
                             self.sessions if link else None, link)
            finally:
                backend.active -= 1
        except asyncio.CancelledError:
            # The gateway is stopping. Python 3.11's stream server logs a cancelled handler as an
            # error, so the handler ends quietly instead.
            writer.transport.abort()
