"""The skylet's hook into the Service data plane (skyshift/gateway).

agent.py makes one `GatewayHook(skylet)`, runs `hook.run()` beside its other tasks, and starts
every replica as `driver.start(await hook.prepare(replica))`:

* `run()`: the gateways of the skylet's clusters (skyshift.gateway.sync.GatewaySync), until
  cancelled. Skylets of simulated clusters run none (those clusters run nothing).
* `prepare(replica)`: a copy of the replica whose job variables include
  `<NAME>_SERVICE_HOST` / `<NAME>_SERVICE_PORT` for the Services of its namespace, pointing
  at its cluster's gateway. Variables the job sets itself win.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Optional

from skyshift.gateway.sync import NO_GATEWAY_MANAGERS, GatewaySync
from skyshift.runtime import clone
from skyshift.v1 import objects_pb2 as pb

if TYPE_CHECKING:
    from skylet.agent import Skylet


class GatewayHook:
    def __init__(self, skylet: "Skylet"):
        self.sync: Optional[GatewaySync] = None
        if skylet.selection.manager not in NO_GATEWAY_MANAGERS:
            self.sync = GatewaySync(skylet.client, skylet.informers, skylet.settings, serves=skylet.selection.serves)

    async def run(self) -> None:
        if self.sync is None:
            await asyncio.get_running_loop().create_future()  # nothing to do until the skylet stops
        await self.sync.run()

    async def prepare(self, replica: pb.Replica) -> pb.Replica:
        if self.sync is None:
            return replica
        variables = await self.sync.service_env(replica)
        missing = {name: value for name, value in variables.items() if name not in replica.spec.template.envs}
        if not missing:
            return replica
        prepared = clone(replica)
        prepared.spec.template.envs.update(missing)
        return prepared
