"""Drivers: the boundary between SkyShift and the systems clusters run on (DESIGN.md §5).

`get_driver` imports a driver's module only when a cluster needs it, so heavy libraries
(paramiko, kubernetes, libcloud) load only where they are used. The contract is in base.py.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Dict

from skyshift.drivers.base import NotSupportedError

if TYPE_CHECKING:
    from skyshift.config import Settings
    from skyshift.drivers.base import Driver
    from skyshift.v1 import objects_pb2 as pb

#: Cluster `spec.manager` -> "module:class" of its driver.
DRIVERS: Dict[str, str] = {
    "local": "skyshift.drivers.local:LocalDriver",
    "sim": "skyshift.drivers.sim:SimDriver",
    "ssh": "skyshift.drivers.ssh:SSHDriver",
}


def get_driver(manager_name: str, cluster: "pb.Cluster", settings: "Settings") -> "Driver":
    """A new driver for `cluster`, whose `spec.manager` is `manager_name`."""
    target = DRIVERS.get(manager_name)
    if target is None:
        raise NotSupportedError(f"no driver for cluster manager {manager_name!r} "
                                f"(available: {', '.join(sorted(DRIVERS))})")
    module_name, _, class_name = target.partition(":")
    driver_class = getattr(importlib.import_module(module_name), class_name)
    return driver_class(cluster, settings)
