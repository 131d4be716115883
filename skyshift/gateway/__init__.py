"""The Service data plane (DESIGN.md §4), run by skylets: one gateway per cluster.

* `addresses`: where a cluster's gateway listens, its published mesh address, node addresses.
* `plan`: from Services, Endpoints, Links and Clusters to what one gateway serves (pure).
* `balancer`: backends, round robin / least connections, health checks (TCP or HTTP probes).
* `proxy`: Service port listeners and the byte copying (asyncio streams, half-close aware).
* `mesh`: gateway-to-gateway connections over a Link, authenticated by the Link's secret.
* `gateway`: one cluster's gateway, brought in line with a plan.
* `sync`: keeps the gateways of a skylet's clusters in line with the API objects.

Settings: `skyshift.config.GatewaySettings` (`settings.gateway`).
"""
