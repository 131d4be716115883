"""Pooled SSH connections for the ssh driver: per (host, user), re-established on failure.

Everything here blocks and runs in the driver's threads. paramiko is imported only when the
first connection opens (DESIGN.md §7).

paramiko waits without a deadline in some calls (a command request on a peer that stopped
answering never returns), so every channel use runs under a watchdog: past its deadline the
watchdog closes every connection to that host, which wakes all the waiting calls with an error.
A host that failed is then refused at once for a backoff period, so callers never queue up
behind a dead host.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import structlog

from skyshift.api.errors import UnavailableError
from skyshift.config import SSHSettings

log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where and as whom to log in."""

    host: str
    port: int
    username: str
    key_path: str

    @property
    def address(self) -> Tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"


class _Connection:
    def __init__(self, client: Any):
        self.client = client
        self.channels = 0

    @property
    def alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def close(self) -> None:
        self.client.close()


@dataclasses.dataclass
class _HostHealth:
    failures: int = 0
    retry_at: float = 0.0
    error: str = ""


class _AcceptNewHostKeys:
    """Like OpenSSH's StrictHostKeyChecking=accept-new: remember a host's key the first time,
    and (through paramiko's own check against the loaded keys) refuse a changed one."""

    def __init__(self, pool: "ConnectionPool"):
        self.pool = pool

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        self.pool._remember_host_key(hostname, key)


class ConnectionPool:
    """Up to `pool_size` connections per target, each carrying up to `channels_per_connection`
    channels at once."""

    def __init__(self, settings: SSHSettings, known_hosts_path: Optional[str] = None):
        self.settings = settings
        self.known_hosts_path = known_hosts_path
        self._lock = threading.Condition()
        self._connections: Dict[Target, List[_Connection]] = {}
        self._opening: Dict[Target, int] = {}
        self._health: Dict[Tuple[str, int], _HostHealth] = {}
        self._host_keys: Optional[Any] = None
        self._closed = False

    # -- health

    def host_error(self, address: Tuple[str, int]) -> Optional[str]:
        """Why the host at `address` is refused right now, or None."""
        with self._lock:
            health = self._health.get(address)
            if health and health.failures and time.monotonic() < health.retry_at:
                return health.error
            return None

    def fail_host(self, address: Tuple[str, int], error: str) -> None:
        """Mark the host failed (start or extend its backoff) and drop every connection to it."""
        with self._lock:
            health = self._health.setdefault(address, _HostHealth())
            backoff = min(self.settings.retry_backoff_max,
                          self.settings.retry_backoff_initial * 2 ** health.failures)
            health.failures += 1
            health.retry_at = time.monotonic() + backoff
            health.error = error
            dropped = [conn for target, conns in self._connections.items() if target.address == address
                       for conn in conns]
            for target in [target for target in self._connections if target.address == address]:
                del self._connections[target]
            self._lock.notify_all()
        log.warning("ssh_host_failed", host=f"{address[0]}:{address[1]}", error=error, retry_in=round(backoff, 3))
        for conn in dropped:
            conn.close()

    def _host_ok(self, address: Tuple[str, int]) -> None:
        with self._lock:
            health = self._health.pop(address, None)
        if health and health.failures:
            log.info("ssh_host_recovered", host=f"{address[0]}:{address[1]}")

    # -- channels

    @contextlib.contextmanager
    def session(self, target: Target, timeout: float) -> Iterator[Any]:
        """An open session channel to `target`, closed afterwards. Fails with UnavailableError
        when the host cannot be reached; past `timeout` seconds the host is failed (see above)."""
        watchdog = threading.Timer(timeout, self.fail_host, (target.address, f"no answer within {timeout:g}s"))
        watchdog.daemon = True
        watchdog.start()
        try:
            conn, channel = self._open_session(target)
            try:
                yield channel
            finally:
                channel.close()
                self._release(conn)
        finally:
            watchdog.cancel()

    def open_channel(self, target: Target) -> Tuple[Any, Callable[[], None]]:
        """A session channel for a long stream (no watchdog): (channel, release). Call
        `release()` once done; the channel stays usable until then."""
        conn, channel = self._open_session(target)

        def release() -> None:
            channel.close()
            self._release(conn)

        return channel, release

    def _open_session(self, target: Target) -> Tuple[_Connection, Any]:
        while True:
            conn, fresh = self._acquire(target)
            try:
                return conn, conn.client.get_transport().open_session(timeout=self.settings.connect_timeout)
            except Exception as error:  # paramiko raises SSHException, EOFError or OSError here
                self._release(conn)
                if not fresh and not conn.alive:
                    # A pooled connection that broke since its last use (e.g. the server restarted
                    # or dropped it): try again on a new one. A host that is down fails the new one.
                    conn.close()
                    continue
                reason = str(error) or type(error).__name__
                self.fail_host(target.address, f"cannot open a channel: {reason}")
                raise UnavailableError(f"ssh {target}: {reason}") from error

    def _acquire(self, target: Target) -> Tuple[_Connection, bool]:
        """A connection with a free channel slot (taken), and whether it was just opened."""
        deadline = time.monotonic() + self.settings.command_timeout
        with self._lock:
            while True:
                if self._closed:
                    raise UnavailableError("the ssh driver is closed")
                error = self.host_error(target.address)
                if error is not None:
                    raise UnavailableError(f"ssh {target}: host unreachable ({error})")
                conns = self._connections.setdefault(target, [])
                for dead in [conn for conn in conns if not conn.alive]:
                    conns.remove(dead)
                    dead.close()
                free = [conn for conn in conns if conn.channels < self.settings.channels_per_connection]
                if free:
                    conn = min(free, key=lambda c: c.channels)
                    conn.channels += 1
                    return conn, False
                if len(conns) + self._opening.get(target, 0) < self.settings.pool_size:
                    self._opening[target] = self._opening.get(target, 0) + 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise UnavailableError(f"ssh {target}: all {self.settings.pool_size} connections busy")
                self._lock.wait(remaining)
        try:
            conn = self._connect(target)
        except BaseException:
            with self._lock:
                self._opening[target] -= 1
                self._lock.notify_all()
            raise
        with self._lock:
            self._opening[target] -= 1
            conn.channels = 1
            self._connections.setdefault(target, []).append(conn)
            self._lock.notify_all()
        return conn, True

    def _release(self, conn: _Connection) -> None:
        with self._lock:
            conn.channels -= 1
            self._lock.notify_all()

    def _connect(self, target: Target) -> _Connection:
        import paramiko  # lazily: only the ssh driver needs it

        client = paramiko.SSHClient()
        for hostname, keys in self._known_host_keys().items():
            for key_type, key in keys.items():
                client.get_host_keys().add(hostname, key_type, key)
        client.set_missing_host_key_policy(_AcceptNewHostKeys(self))
        timeout = self.settings.connect_timeout
        try:
            client.connect(target.host, port=target.port, username=target.username,
                           key_filename=target.key_path or None, look_for_keys=not target.key_path,
                           allow_agent=False, timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                           channel_timeout=timeout)
        except paramiko.AuthenticationException as error:
            client.close()
            # Wrong user or key: the host itself is fine, so it is not put into backoff.
            raise UnavailableError(f"ssh {target}: authentication failed ({error})") from error
        except (paramiko.SSHException, OSError, EOFError) as error:
            client.close()
            self.fail_host(target.address, str(error) or type(error).__name__)
            raise UnavailableError(f"ssh {target}: {error or type(error).__name__}") from error
        transport = client.get_transport()
        if self.settings.keepalive_interval > 0:
            transport.set_keepalive(self.settings.keepalive_interval)
        self._host_ok(target.address)
        log.debug("ssh_connected", target=str(target))
        return _Connection(client)

    # -- host keys

    def _known_host_keys(self) -> Any:
        import paramiko

        with self._lock:
            if self._host_keys is None:
                self._host_keys = paramiko.HostKeys()
                if self.known_hosts_path:
                    try:
                        self._host_keys.load(self.known_hosts_path)
                    except FileNotFoundError:
                        pass
            return self._host_keys

    def _remember_host_key(self, hostname: str, key: Any) -> None:
        with self._lock:
            self._host_keys.add(hostname, key.get_name(), key)
            if self.known_hosts_path:
                os.makedirs(os.path.dirname(self.known_hosts_path), exist_ok=True)
                self._host_keys.save(self.known_hosts_path)
        log.info("ssh_host_key_learned", host=hostname, key_type=key.get_name(),
                 fingerprint=key.get_fingerprint().hex())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [conn for conns in self._connections.values() for conn in conns]
            self._connections.clear()
            self._lock.notify_all()
        for conn in conns:
            conn.close()
