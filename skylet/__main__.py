"""Run a skylet (normally started and supervised by the cluster controller).

    python -m skylet --cluster NAME [--cluster NAME2 ...] --server HOST:PORT --home DIR
    python -m skylet --manager sim --server HOST:PORT --home DIR     # every sim cluster

It stops on SIGTERM or SIGINT; the replicas it started keep running, and the next skylet of
the cluster adopts them.
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

log = structlog.get_logger("skylet")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m skylet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    serves = parser.add_mutually_exclusive_group(required=True)
    serves.add_argument("--cluster", action="append", default=[], metavar="NAME",
                        help="a cluster to serve (repeatable)")
    serves.add_argument("--manager", metavar="MANAGER",
                        help="serve every cluster with this spec.manager, as they come and go (e.g. sim)")
    parser.add_argument("--server", help="API server HOST:PORT (default: from the settings of --home)")
    parser.add_argument("--home", help="instance directory (default $SKYSHIFT_HOME or ~/.skyshift)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines instead of text")
    return parser.parse_args(argv)


async def run(settings: config.Settings, selection, server: str) -> None:
    from skyshift.client import AsyncClient

    from skylet.agent import Skylet

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    async with AsyncClient(endpoint=server or None, settings=settings) as client:
        try:
            await Skylet(client, selection, settings).run()
        except asyncio.CancelledError:
            log.info("skylet_stopping")


def main(argv=None) -> int:
    from skyshift.api.errors import SkyShiftError

    from skylet.agent import ApiLostError, Selection

    args = parse_args(argv)
    settings = config.load(pathlib.Path(os.path.expanduser(args.home)) if args.home else None)
    skyshift_logging.configure(args.log_level, json=args.log_json)
    try:
        selection = Selection(names=tuple(dict.fromkeys(args.cluster)), manager=args.manager or "")
        asyncio.run(run(settings, selection, args.server))
    except (OSError, ValueError, ApiLostError) as error:
        log.error("skylet_failed", error=str(error))
        return 1
    except SkyShiftError as error:
        log.error("skylet_failed", error=error.message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
