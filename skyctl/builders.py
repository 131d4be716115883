"""Objects built from `skyctl create KIND NAME --flags`.

Each builder takes the flag values as keyword arguments (named like the flags) and returns the
typed object. A flag value that cannot be used raises FlagError naming the flag, which skyctl
reports as a usage error; everything else (names, ranges, required fields) is checked by the
API server, whose errors name the field.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, Optional, Sequence, Tuple

from skyshift.api import convert, kinds, validation
from skyshift.api.errors import InvalidError
from skyshift.v1 import objects_pb2 as pb

Pairs = Iterable[Tuple[str, str]]

#: Resources given in MiB that also accept a unit ("4Gi", "512M").
SIZE_RESOURCES = ("memory", "disk")
#: Name of the placement filter that `--filter` flags become.
CLI_FILTER_NAME = "cli"
_HOST = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?P<host>[^:@\s]+)(?::(?P<port>\d+))?$")


class FlagError(ValueError):
    """A flag value skyctl cannot use."""

    def __init__(self, flag: str, problem: str):
        super().__init__(problem)
        self.flag = flag
        self.problem = problem


def key_value(text: str, flag: str) -> Tuple[str, str]:
    """'KEY=VALUE' -> (KEY, VALUE)."""
    key, separator, value = text.partition("=")
    if not separator or not key.strip():
        raise FlagError(flag, f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def accelerator(text: str, flag: str = "--accelerators") -> Tuple[str, float]:
    """'V100:2' -> ('V100', 2.0); a name alone means one."""
    name, separator, count = text.partition(":")
    if not name:
        raise FlagError(flag, f"expected NAME:COUNT (e.g. V100:2), got {text!r}")
    if not separator:
        return name, 1.0
    try:
        amount = float(count)
    except ValueError:
        raise FlagError(flag, f"expected NAME:COUNT with a number as COUNT, got {text!r}") from None
    if amount < 0:
        raise FlagError(flag, f"the count must not be negative, got {text!r}")
    return name, amount


def size_mib(value: str, flag: str) -> float:
    """A size in MiB from '512', '4Gi' or '2G'."""
    try:
        return convert.parse_size_mib(value, flag)
    except InvalidError as error:
        raise FlagError(flag, error.message.partition(": ")[2] or error.message) from None


def ssh_host(text: str, username: str, ssh_key_path: str, flag: str = "--host") -> pb.SSHHost:
    """'[user@]host[:port]'; the user defaults to --username."""
    match = _HOST.match(text.strip())
    if not match:
        raise FlagError(flag, f"expected [USER@]HOST[:PORT], got {text!r}")
    return pb.SSHHost(host=match["host"], port=int(match["port"] or 0), username=match["user"] or username,
                      ssh_key_path=ssh_key_path)


def canonical(value: str, choices: Sequence[str], flag: str) -> str:
    """The choice that matches `value` ignoring case (OnFailure for onfailure)."""
    for choice in choices:
        if choice and choice.lower() == value.lower():
            return choice
    raise FlagError(flag, f"{value!r} is not one of {', '.join(c for c in choices if c)}")


def _metadata(obj, name: str, labels: Pairs, namespace: Optional[str] = None):
    obj.metadata.name = name
    obj.metadata.labels.update(dict(labels))
    if kinds.kind_of(obj).namespaced:
        obj.metadata.namespace = namespace or kinds.DEFAULT_NAMESPACE
    return obj


def _resources(resources: Pairs, flag: str) -> Dict[str, float]:
    """--resources NAME AMOUNT pairs; sizes accept units."""
    result: Dict[str, float] = {}
    for name, amount in resources:
        if name in SIZE_RESOURCES:
            result[name] = size_mib(amount, flag)
            continue
        try:
            result[name] = float(amount)
        except ValueError:
            raise FlagError(flag, f"{name}: expected a number, got {amount!r}") from None
    return result


def job(name: str, namespace: Optional[str] = None, labels: Pairs = (), image: str = "",
        image_pull_policy: str = "", resources: Pairs = (), cpus: Optional[float] = None,
        memory: Optional[str] = None, gpus: Optional[float] = None, disk: Optional[str] = None,
        accelerators: Iterable[str] = (), envs: Pairs = (), ports: Iterable[int] = (),
        replicas: Optional[int] = None, run: str = "", setup: str = "", restart_policy: str = "",
        gang: bool = False, filters: Iterable[str] = (), backoff_limit: Optional[int] = None) -> pb.Job:
    obj = _metadata(pb.Job(), name, labels, namespace)
    spec = obj.spec
    spec.image = image
    if image_pull_policy:
        spec.image_pull_policy = canonical(image_pull_policy, validation.PULL_POLICIES, "--image-pull-policy")
    spec.resources.update(_resources(resources, "--resources"))
    if cpus is not None:
        spec.resources["cpus"] = cpus
    if memory is not None:
        spec.resources["memory"] = size_mib(memory, "--memory")
    if gpus is not None:
        spec.resources["gpus"] = gpus
    if disk is not None:
        spec.resources["disk"] = size_mib(disk, "--disk")
    for text in accelerators:
        accelerator_name, count = accelerator(text)
        spec.resources[accelerator_name] = count
    spec.envs.update(dict(envs))
    spec.ports.extend(ports)
    if replicas is not None:
        spec.replicas = replicas
    spec.run = run
    spec.setup = setup
    if restart_policy:
        spec.restart_policy = canonical(restart_policy, validation.RESTART_POLICIES, "--restart-policy")
    spec.gang = gang
    match_labels = dict(key_value(text, "--filter") for text in filters)
    if match_labels:
        spec.placement.filters.add(name=CLI_FILTER_NAME, match_labels=match_labels)
    if backoff_limit is not None:
        spec.backoff_limit = backoff_limit
    return obj


def cluster(name: str, labels: Pairs = (), manager: Optional[str] = None, cloud: str = "", region: str = "",
            cpus: str = "", memory: str = "", disk_size: Optional[int] = None, accelerators: str = "",
            ports: Iterable[str] = (), num_nodes: Optional[int] = None, provision: bool = False,
            config_path: str = "", hosts: Iterable[str] = (), username: str = "", ssh_key_path: str = "",
            sim_nodes: Optional[int] = None, sim_resources: Pairs = ()) -> pb.Cluster:
    obj = _metadata(pb.Cluster(), name, labels)
    spec = obj.spec
    simulated = sim_nodes is not None or bool(sim_resources)
    spec.manager = manager or ("sim" if simulated else "")
    spec.cloud = cloud
    spec.region = region
    spec.cpus = cpus
    spec.memory = memory
    if disk_size is not None:
        spec.disk_size = disk_size
    spec.accelerators = accelerators
    spec.ports.extend(ports)
    if num_nodes is not None:
        spec.num_nodes = num_nodes
    spec.provision = provision
    spec.config_path = config_path
    spec.hosts.extend(ssh_host(text, username, ssh_key_path) for text in hosts)
    if sim_nodes is not None:
        spec.simulation.nodes = sim_nodes
    spec.simulation.node_resources.update(_resources(sim_resources, "--sim-resources"))
    return obj


def service(name: str, namespace: Optional[str] = None, labels: Pairs = (), selector: Pairs = (),
            ports: Iterable[Tuple[int, int]] = (), service_type: str = "", primary_cluster: str = "",
            balancing: str = "") -> pb.Service:
    obj = _metadata(pb.Service(), name, labels, namespace)
    spec = obj.spec
    if service_type:
        spec.type = canonical(service_type, validation.SERVICE_TYPES, "--type")
    spec.selector.update(dict(selector))
    for port, target_port in ports:
        spec.ports.add(port=port, target_port=target_port)
    spec.primary_cluster = primary_cluster
    if balancing:
        spec.balancing = canonical(balancing, validation.BALANCING, "--balancing")
    return obj


def namespace(name: str, labels: Pairs = ()) -> pb.Namespace:
    return _metadata(pb.Namespace(), name, labels)


def link(name: str, source: str, target: str, labels: Pairs = ()) -> pb.Link:
    obj = _metadata(pb.Link(), name, labels)
    obj.spec.source_cluster = source
    obj.spec.target_cluster = target
    return obj


def filter_policy(name: str, namespace: Optional[str] = None, labels: Pairs = (), include: Iterable[str] = (),
                  exclude: Iterable[str] = (), selector: Pairs = ()) -> pb.FilterPolicy:
    obj = _metadata(pb.FilterPolicy(), name, labels, namespace)
    obj.spec.cluster_filter.include.extend(include)
    obj.spec.cluster_filter.exclude.extend(exclude)
    obj.spec.labels_selector.update(dict(selector))
    return obj

