"""Where gateways and replicas can be reached: a cluster's gateway address, its published mesh
address, and the address of a node (for replicas that report no endpoints).

Shared by the skylet (which runs the gateways) and the controllers (which report external
addresses and probe Links), so both sides compute the same answer.
"""
from __future__ import annotations

import hashlib
import ipaddress
from typing import Optional, Tuple

from skyshift import config
from skyshift.v1 import objects_pb2 as pb

#: Cluster annotation a user may set to choose the address of the cluster's gateway.
ADDRESS_ANNOTATION = "gateway.skyshift.dev/address"
#: Cluster annotation where the skylet publishes "host:port" of the cluster's mesh listener.
MESH_ANNOTATION = "gateway.skyshift.dev/mesh"
#: The default cluster (skyctl's local mode) keeps its gateway on settings.gateway.local_address.
LOCAL_CLUSTER = "local"
LOCAL_ADDRESS = "127.0.0.1"


def gateway_address(cluster: pb.Cluster, settings: config.GatewaySettings) -> str:
    """The address a cluster's gateway listens on (Service ports and its mesh port)."""
    chosen = cluster.metadata.annotations.get(ADDRESS_ANNOTATION)
    if chosen:
        return chosen
    name = cluster.metadata.name
    if name == LOCAL_CLUSTER:
        return settings.local_address
    # A stable address per cluster name, so gateways of several clusters on one machine never
    # bind the same address; the network's first and last addresses are skipped.
    network = ipaddress.ip_network(settings.address_network)
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return str(network[1 + digest % (network.num_addresses - 2)])


def mesh_address(cluster: pb.Cluster) -> str:
    """The published "host:port" of the cluster's mesh listener ("" until its skylet runs one)."""
    return cluster.metadata.annotations.get(MESH_ANNOTATION, "")


def split_host_port(text: str) -> Tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port")
    return host, int(port)


def node_address(cluster: pb.Cluster, node: str) -> Optional[str]:
    """The address of a cluster's node: the ssh host it names, loopback for a local cluster,
    or the node name itself when it is an IP address; None when unknown."""
    spec = cluster.spec
    if spec.manager == "local":
        return LOCAL_ADDRESS
    for host in spec.hosts:
        if node in (host.host, f"{host.host}:{host.port}"):
            return host.host
    access_host = spec.access_config.get("host")
    if access_host and node in (access_host, ""):
        return access_host
    try:
        return str(ipaddress.ip_address(node.rpartition(":")[0] if node.count(":") == 1 else node))
    except ValueError:
        return None
