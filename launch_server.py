"""Start the SkyShift API server (and, with no etcd configured, the embedded etcd).

    python launch_server.py [--home DIR] [--etcd HOST:PORT[,HOST:PORT...]] [--listen HOST:PORT] [--auth] [--tls]

Writes its address to $SKYSHIFT_HOME/api/endpoint and its pid to $SKYSHIFT_HOME/api/pid, and
stops cleanly (removing both, stopping the embedded etcd) on SIGTERM or SIGINT.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import signal
import sys

import structlog

from skyshift import config
from skyshift import logging as skyshift_logging

log = structlog.get_logger("launch_server")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="instance directory (default $SKYSHIFT_HOME or ~/.skyshift)")
    parser.add_argument("--etcd", help="existing etcd members HOST:PORT[,HOST:PORT...]; default: embedded etcd")
    parser.add_argument("--listen", help="address to serve on, HOST:PORT (port 0: any free port)")
    parser.add_argument("--auth", action="store_true",
                        help="require a bearer token on every call and check access (settings.auth.enabled)")
    parser.add_argument("--tls", action="store_true",
                        help="serve TLS, with a CA and certificate made under $SKYSHIFT_HOME/tls unless "
                             "configured (settings.tls)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines instead of text")
    return parser.parse_args(argv)


def _write_atomically(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def serve(settings: config.Settings) -> None:
    from api_server.server import ApiServer
    from skyshift.store.embedded import EmbeddedEtcd

    etcd = None
    endpoints = settings.etcd.endpoints
    if not endpoints:
        etcd = EmbeddedEtcd(settings.etcd_dir / "data", client_port=settings.etcd.embedded_port,
                            log_file=settings.log_dir / "etcd.log")
        etcd.start()
        try:
            await asyncio.get_running_loop().run_in_executor(None, etcd.wait_healthy,
                                                             settings.etcd.embedded_start_timeout)
        except Exception:
            etcd.stop(kill=True)
            raise
        endpoints = etcd.endpoint
        _write_atomically(settings.etcd_dir / "endpoint", endpoints)
        log.info("embedded_etcd_started", endpoint=endpoints, pid=etcd.process.pid)
    server = ApiServer(settings, endpoints)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        endpoint = await server.start()
        _write_atomically(settings.api_dir / "pid", str(os.getpid()))
        _write_atomically(settings.api_endpoint_file, endpoint)
        await stopping.wait()
        log.info("api_server_stopping")
    finally:
        for path in (settings.api_endpoint_file, settings.api_dir / "pid"):
            path.unlink(missing_ok=True)
        await server.stop()
        if etcd is not None:
            etcd.stop()
            (settings.etcd_dir / "endpoint").unlink(missing_ok=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {}
    if args.etcd:
        overrides.setdefault("etcd", {})["endpoints"] = args.etcd
    if args.listen:
        overrides.setdefault("api", {})["listen"] = args.listen
    if args.auth:
        overrides["auth"] = {"enabled": True}
    if args.tls:
        overrides["tls"] = {"enabled": True}
    settings = config.load(pathlib.Path(os.path.expanduser(args.home)) if args.home else None, overrides=overrides)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    skyshift_logging.configure(args.log_level, json=args.log_json)
    try:
        asyncio.run(serve(settings))
    except (OSError, RuntimeError, TimeoutError, ValueError) as error:
        log.error("api_server_failed", error=str(error))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
