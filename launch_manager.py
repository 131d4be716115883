"""Start the SkyShift controller manager: the controllers, in one process, while it is the leader.

    python launch_manager.py [--home DIR] [--server HOST:PORT] [--controllers job,scheduler,...]
                             [--identity NAME] [--log-level info] [--log-json]

It waits for the API server, then competes for the leader Lease (settings.controllers.lease_*):
the leader runs the controllers; another copy waits as standby and takes over when the leader
stops renewing (it died) or releases the lease (it stopped). Writes its pid to
$SKYSHIFT_HOME/manager/pid; stops cleanly on SIGTERM or SIGINT, releasing the lease.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import pathlib
import signal
import sys
from typing import Dict, List, Optional

import structlog

from skyshift import config
from skyshift import logging as skyshift_logging

log = structlog.get_logger("launch_manager")

#: Controller name -> "module:factory". A factory is called as factory(client, informers, settings)
#: and returns an object with `async run()` (e.g. a skyshift.runtime.Controller subclass).
CONTROLLERS: Dict[str, str] = {
    "job": "controllers.job:JobController",
    "scheduler": "scheduler.scheduler:Scheduler",
    "cluster": "controllers.cluster:ClusterController",
    "namespace": "controllers.namespace:NamespaceController",
    "endpoints": "controllers.endpoints:EndpointsController",
    "service": "controllers.service:ServiceController",
    "link": "controllers.link:LinkController",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="instance directory (default $SKYSHIFT_HOME or ~/.skyshift)")
    parser.add_argument("--server", help="API server HOST:PORT (default: from the instance's config)")
    parser.add_argument("--controllers", help=f"comma-separated controllers to run (default: all of "
                                              f"{', '.join(CONTROLLERS)} that are installed)")
    parser.add_argument("--identity", help="leader election identity (default: hostname-pid-random)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines instead of text")
    return parser.parse_args(argv)


def use_manager_token(settings: config.Settings) -> None:
    """With authentication on, the API server wrote the manager's own token to
    $SKYSHIFT_HOME/manager/token: act with it rather than with config.yaml's (admin) token.
    SKYSHIFT_TOKEN, when set, still wins."""
    if os.environ.get("SKYSHIFT_TOKEN"):
        return
    try:
        token = settings.manager_token_file.read_text().strip()
    except FileNotFoundError:
        return
    if token:
        settings.client.token = token


def load_factories(names: Optional[List[str]]):
    """The factories of the named controllers (all registered when None). A controller asked for
    by name must import; when running all, one whose module is not installed is skipped."""
    factories = {}
    for name in names or CONTROLLERS:
        if name not in CONTROLLERS:
            raise ValueError(f"unknown controller {name!r} (known: {', '.join(CONTROLLERS)})")
        module_name, _, attribute = CONTROLLERS[name].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if names or error.name != module_name:
                raise
            log.warning("controller_not_installed", controller=name, module=module_name)
            continue
        factories[name] = getattr(module, attribute)
    if not factories:
        raise ValueError("no controller to run")
    return factories


async def serve(settings: config.Settings, factories, identity: str) -> None:
    from controllers.manager import ControllerManager, connect

    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, main_task.cancel)
    client = await connect(settings)
    try:
        await ControllerManager(client, factories, identity, settings).run()
    finally:
        await client.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {"client": {"endpoint": args.server}} if args.server else None
    settings = config.load(pathlib.Path(os.path.expanduser(args.home)) if args.home else None, overrides=overrides)
    use_manager_token(settings)
    skyshift_logging.configure(args.log_level, json=args.log_json)
    from skyshift.runtime import default_identity

    identity = args.identity or default_identity()
    try:
        factories = load_factories([n.strip() for n in args.controllers.split(",") if n.strip()]
                                   if args.controllers else None)
    except (ImportError, ValueError) as error:
        log.error("manager_failed", error=str(error))
        return 2
    pid_file = settings.home_path / "manager" / "pid"
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(str(os.getpid()))
    log.info("manager_starting", identity=identity, controllers=sorted(factories), pid=os.getpid())
    try:
        asyncio.run(serve(settings, factories, identity))
    except asyncio.CancelledError:
        log.info("manager_stopped", identity=identity)
    except Exception as error:
        log.error("manager_failed", error=str(error), error_type=type(error).__name__, exc_info=True)
        return 1
    finally:
        # A standby sharing this home may have written its own pid since: leave that one.
        if pid_file.exists() and pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
