"""How skyctl shows objects: tables for people, manifests for scripts, the describe layout, ages
and revision diffs. Pure formatting: nothing here talks to the API server.

Per-kind table columns live in `COLUMNS`, the one table-driven place to change what `skyctl get`
shows.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from google.protobuf.message import Message

from skyshift.api import convert, kinds

NONE = "<none>"
COLUMN_GAP = "   "
#: Longest cell text in a table before it is shortened with "...".
MAX_CELL = 60
#: Changed field paths named per revision in `skyctl history` before "(+N more)".
MAX_CHANGES_SHOWN = 4
#: Fields whose change says nothing to a reader of the history (they change on every write).
_HISTORY_IGNORED = {"metadata.resource_version", "metadata.generation"}


# ---------------------------------------------------------------------------- small formats

def human_duration(seconds: float) -> str:
    """A short duration the way kubectl shows ages: 45s, 3m20s, 5h, 12d, 2y30d."""
    seconds = int(seconds)
    if seconds < 0:
        return "0s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        rest = seconds % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{days}d{rest}h" if rest else f"{days}d"
    if days < 365 * 2:
        return f"{days}d"
    years, rest = divmod(days, 365)
    if days < 365 * 8 and rest:
        return f"{years}y{rest}d"
    return f"{years}y"


def is_set(timestamp) -> bool:
    return bool(timestamp.seconds or timestamp.nanos)


def age(timestamp, now: float) -> str:
    """How long ago a protobuf Timestamp was, or <none> when it is not set."""
    if not is_set(timestamp):
        return NONE
    return human_duration(now - (timestamp.seconds + timestamp.nanos / 1e9))


def time_and_age(timestamp, now: float) -> str:
    """'2024-05-01T10:00:00Z (5m ago)' for describe."""
    if not is_set(timestamp):
        return NONE
    return f"{timestamp.ToJsonString()} ({age(timestamp, now)} ago)"


def number(value: float) -> str:
    return f"{value:g}" if value != int(value) else str(int(value))


def mib(value: float) -> str:
    """A size given in MiB, in the largest unit that keeps it readable: 512Mi, 1.5Gi, 2Ti."""
    for unit, factor in (("Ti", 1024.0 ** 2), ("Gi", 1024.0)):
        if value >= factor:
            return f"{round(value / factor, 1):g}{unit}"
    return f"{round(value, 1):g}Mi"


def pairs(mapping: Mapping[str, Any], separator: str = "=") -> str:
    """'a=1,b=2' (sorted), or <none>."""
    if not mapping:
        return NONE
    return ",".join(f"{key}{separator}{value}" for key, value in sorted(mapping.items()))


def shorten(text: str, limit: int = MAX_CELL) -> str:
    text = " ".join(text.split())  # multi-line commands on one table line
    return text if len(text) <= limit else text[:limit - 3] + "..."


def reference(kind: kinds.Kind, name: str) -> str:
    """'job/train': how skyctl names one object in its messages and in `-o name`."""
    return f"{kind.name.lower()}/{name}"


# ---------------------------------------------------------------------------- tables

def render_rows(rows: Sequence[Sequence[str]], widths: Optional[List[int]] = None) -> Tuple[List[str], List[int]]:
    """Left-aligned columns; returns the lines and the column widths used (which only grow, so
    rows printed later, e.g. while watching, line up with the first ones)."""
    columns = max((len(row) for row in rows), default=0)
    widths = list(widths or [0] * columns)
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[index]) for index, cell in enumerate(row[:-1])] + list(row[-1:])
        lines.append(COLUMN_GAP.join(cells).rstrip())
    return lines, widths


@dataclasses.dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[Message, float], str]   # (object, now as epoch seconds) -> text
    wide_only: bool = False


def _phase(obj: Message, now: float) -> str:
    return obj.status.phase or NONE


def _resource_total(resource_maps: Mapping[str, Message], key: str) -> float:
    return sum(resource_map.resources.get(key, 0.0) for resource_map in resource_maps.values())


def _cluster_resource(key: str, fmt: Callable[[float], str]) -> Callable[[Message, float], str]:
    """'allocatable/total' of one resource summed over a cluster's nodes."""
    def cell(cluster: Message, now: float) -> str:
        total = _resource_total(cluster.status.capacity, key)
        if not total:
            return "-"
        return f"{fmt(_resource_total(cluster.status.allocatable, key))}/{fmt(total)}"
    return cell


def _cluster_accelerators(cluster: Message, now: float) -> str:
    standard = {"cpus", "memory", "gpus", "disk"}
    totals: Dict[str, float] = {}
    for resource_map in cluster.status.capacity.values():
        for name, amount in resource_map.resources.items():
            if name not in standard:
                totals[name] = totals.get(name, 0.0) + amount
    return pairs({name: number(amount) for name, amount in totals.items()}, ":")


def _job_replicas(job: Message, now: float) -> str:
    """'running/desired'."""
    running = sum(counts.counts.get("RUNNING", 0) for counts in job.status.replica_status.values())
    desired = job.spec.replicas if job.spec.HasField("replicas") else 1
    return f"{running}/{desired}"


def _resources(resources: Mapping[str, float]) -> str:
    shown = {name: mib(amount) if name in ("memory", "disk") else number(amount)
             for name, amount in resources.items()}
    return pairs(shown)


def _replica_exit(replica: Message, now: float) -> str:
    return str(replica.status.exit_code) if replica.status.phase in ("SUCCEEDED", "FAILED") else ""


def _service_ports(service: Message, now: float) -> str:
    ports = [f"{p.port}:{p.target_port or p.port}/{p.protocol or 'TCP'}" for p in service.spec.ports]
    return ",".join(ports) or NONE


def _endpoint_addresses(endpoints: Message, now: float) -> str:
    addresses = [f"{e.address}:{e.port}" for cluster in sorted(endpoints.spec.endpoints)
                 for e in endpoints.spec.endpoints[cluster].endpoints]
    if len(addresses) > 3:
        return ",".join(addresses[:3]) + f" + {len(addresses) - 3} more"
    return ",".join(addresses) or NONE


def _event_last_seen(event: Message, now: float) -> str:
    spec = event.spec
    stamp = spec.last_time if is_set(spec.last_time) else event.metadata.creation_timestamp
    return age(stamp, now)


def _text(get: Callable[[Message], Any]) -> Callable[[Message, float], str]:
    """A cell showing one field as text (<none> when empty), shortened to fit a table."""
    def cell(obj: Message, now: float) -> str:
        value = get(obj)
        return shorten(str(value)) if value not in ("", None) else NONE
    return cell


NAME = Column("NAME", lambda obj, now: obj.metadata.name)
NAMESPACE = Column("NAMESPACE", lambda obj, now: obj.metadata.namespace)
AGE = Column("AGE", lambda obj, now: age(obj.metadata.creation_timestamp, now))
LABELS = Column("LABELS", lambda obj, now: pairs(obj.metadata.labels), wide_only=True)
PHASE = Column("PHASE", _phase)

#: Table columns per kind (by Kind.name). NAMESPACE is added in front with -A, LABELS at the end
#: with -o wide. Kinds not listed show NAME and AGE.
COLUMNS: Dict[str, List[Column]] = {
    "Namespace": [NAME, PHASE, AGE],
    "Job": [
        NAME, Column("REPLICAS", _job_replicas), PHASE,
        Column("RESTARTS", lambda job, now: str(job.status.restarts)), AGE,
        Column("IMAGE", _text(lambda job: job.spec.image), wide_only=True),
        Column("RESOURCES", lambda job, now: _resources(job.spec.resources), wide_only=True),
        Column("CLUSTERS", lambda job, now: ",".join(sorted(job.status.replica_status)) or NONE, wide_only=True),
        Column("RUN", _text(lambda job: job.spec.run), wide_only=True),
    ],
    "Cluster": [
        NAME, Column("MANAGER", _text(lambda cluster: cluster.spec.manager)), PHASE,
        Column("NODES", lambda cluster, now: str(len(cluster.status.capacity))),
        Column("CPUS", _cluster_resource("cpus", number)),
        Column("MEMORY", _cluster_resource("memory", mib)),
        Column("GPUS", _cluster_resource("gpus", number)), AGE,
        Column("ACCELERATORS", _cluster_accelerators, wide_only=True),
        Column("HEARTBEAT", lambda cluster, now: age(cluster.status.heartbeat_time, now), wide_only=True),
        Column("MESSAGE", _text(lambda cluster: cluster.status.message), wide_only=True),
    ],
    "Replica": [
        NAME, Column("JOB", lambda replica, now: replica.spec.job_name),
        Column("CLUSTER", _text(lambda replica: replica.spec.cluster)),
        Column("NODE", _text(lambda replica: replica.spec.node)), PHASE,
        Column("EXIT", _replica_exit), AGE,
        Column("RANK", lambda replica, now: str(replica.spec.rank), wide_only=True),
        Column("RESTARTS", lambda replica, now: str(replica.status.restarts), wide_only=True),
        Column("ENDPOINTS", lambda replica, now: ",".join(f"{e.address}:{e.port}" for e in replica.status.endpoints)
               or NONE, wide_only=True),
        Column("MESSAGE", _text(lambda replica: replica.status.message), wide_only=True),
    ],
    "Service": [
        NAME, Column("TYPE", lambda service, now: service.spec.type),
        Column("CLUSTER-IP", _text(lambda service: service.spec.cluster_ip)),
        Column("EXTERNAL-IP", _text(lambda service: service.status.external_ip)),
        Column("PORTS", _service_ports),
        Column("PRIMARY", _text(lambda service: service.spec.primary_cluster)), AGE,
        Column("SELECTOR", lambda service, now: pairs(service.spec.selector), wide_only=True),
    ],
    "Endpoints": [
        NAME, Column("ENDPOINTS", _endpoint_addresses), AGE,
        Column("CLUSTERS", lambda ep, now: ",".join(sorted(ep.spec.endpoints)) or NONE, wide_only=True),
        Column("PRIMARY", _text(lambda ep: ep.spec.primary_cluster), wide_only=True),
    ],
    "Link": [
        NAME, Column("SOURCE", lambda link, now: link.spec.source_cluster),
        Column("TARGET", lambda link, now: link.spec.target_cluster), PHASE, AGE,
        Column("MESSAGE", _text(lambda link: link.status.message), wide_only=True),
    ],
    "FilterPolicy": [
        NAME, Column("INCLUDE", lambda fp, now: ",".join(fp.spec.cluster_filter.include) or NONE),
        Column("EXCLUDE", lambda fp, now: ",".join(fp.spec.cluster_filter.exclude) or NONE),
        Column("SELECTOR", lambda fp, now: pairs(fp.spec.labels_selector)), AGE,
    ],
    "Event": [
        Column("LAST SEEN", _event_last_seen), Column("TYPE", _text(lambda event: event.spec.type)),
        Column("REASON", _text(lambda event: event.spec.reason)),
        Column("OBJECT", lambda event, now: f"{event.spec.involved_kind.lower()}/{event.spec.involved_name}"),
        Column("MESSAGE", lambda event, now: event.spec.message), NAME,
    ],
    "Lease": [NAME, Column("HOLDER", _text(lambda lease: lease.spec.holder_identity)), AGE],
    "RoleBinding": [
        NAME, Column("ROLE", lambda binding, now: binding.spec.role),
        Column("USERS", lambda binding, now: ",".join(binding.spec.users) or NONE), AGE,
    ],
}


def columns_for(kind: kinds.Kind, wide: bool = False, all_namespaces: bool = False) -> List[Column]:
    columns = [c for c in COLUMNS.get(kind.name, [NAME, AGE]) if wide or not c.wide_only]
    if all_namespaces and kind.namespaced:
        columns.insert(0, NAMESPACE)
    if wide:
        columns.append(LABELS)
    return columns


class Table:
    """The table of one kind; `lines()` can be called again for more rows (watch) and keeps
    the columns aligned with what was printed before."""

    def __init__(self, kind: kinds.Kind, wide: bool = False, all_namespaces: bool = False,
                 exclude: Iterable[str] = ()):
        excluded = set(exclude)
        self.columns = [c for c in columns_for(kind, wide, all_namespaces) if c.header not in excluded]
        self._widths: Optional[List[int]] = None

    def row(self, obj: Message, now: float) -> List[str]:
        return [column.cell(obj, now) for column in self.columns]

    def lines(self, objects: Iterable[Message], now: float) -> List[str]:
        """The rows of `objects`, after the header on the first call."""
        rows = [[c.header for c in self.columns]] if self._widths is None else []
        rows.extend(self.row(obj, now) for obj in objects)
        lines, self._widths = render_rows(rows, self._widths)
        return lines


# ---------------------------------------------------------------------------- manifests

def _yaml_dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        """Block style for multi-line strings (run/setup scripts stay readable)."""

    def represent_str(dumper, value):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, represent_str)
    return Dumper


def dump(data: Any, fmt: str) -> str:
    """Plain data as YAML or JSON text (ending with a newline)."""
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    import yaml

    return yaml.dump(data, Dumper=_yaml_dumper(), sort_keys=False, default_flow_style=False, allow_unicode=True)


def manifests(objects: Sequence[Message], as_list: bool) -> Any:
    """One manifest, or `kind: List` with `items` for several (or for any list query)."""
    documents = [convert.to_manifest(obj) for obj in objects]
    if not as_list and len(documents) == 1:
        return documents[0]
    return {"kind": "List", "items": documents}


# ---------------------------------------------------------------------------- describe

@dataclasses.dataclass
class Section:
    """A titled table at the end of `skyctl describe` (conditions, events, related objects)."""
    title: str
    headers: List[str]
    rows: List[List[str]]

    def lines(self) -> List[str]:
        if not self.rows:
            return [f"{self.title}:  {NONE}"]
        table, _ = render_rows([self.headers] + self.rows)
        return [f"{self.title}:"] + ["  " + line for line in table]


def objects_section(title: str, kind: kinds.Kind, objects: Sequence[Message], now: float,
                    exclude: Iterable[str] = ()) -> Section:
    """A describe section listing related objects with their `skyctl get` columns."""
    table = Table(kind, exclude=exclude)
    return Section(title, [c.header for c in table.columns], [table.row(obj, now) for obj in objects])


def events_section(events: Sequence[Message], now: float) -> Section:
    """Events newest last, kubectl style ('3m (x4 over 10m)' when an event repeated)."""
    def when(event: Message) -> str:
        spec = event.spec
        last = spec.last_time if is_set(spec.last_time) else event.metadata.creation_timestamp
        text = age(last, now)
        if spec.count > 1 and is_set(spec.first_time):
            text += f" (x{spec.count} over {age(spec.first_time, now)})"
        return text

    rows = [[e.spec.type or "Normal", e.spec.reason or NONE, when(e), e.spec.source or NONE, e.spec.message]
            for e in events]
    return Section("Events", ["TYPE", "REASON", "AGE", "FROM", "MESSAGE"], rows)


def conditions_section(conditions: Sequence[Message], now: float) -> Section:
    rows = [[c.type, c.status, c.reason or NONE, age(c.last_transition_time, now), c.message]
            for c in conditions]
    return Section("Conditions", ["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"], rows)


@dataclasses.dataclass
class _Node:
    """One line of the describe tree: `label: value`, children indented below it."""
    label: str
    value: str = ""
    children: List["_Node"] = dataclasses.field(default_factory=list)


#: Messages that only wrap a map, shown inline: message name -> its map field.
_INLINE_MAPS = {"skyshift.v1.ResourceMap": "resources", "skyshift.v1.PhaseCounts": "counts"}


def _title(field_name: str) -> str:
    return " ".join(word.capitalize() for word in field_name.split("_"))


def _scalar_text(descriptor, value: Any) -> str:
    if descriptor.enum_type is not None:
        return descriptor.enum_type.values_by_number[value].name
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return number(value)
    return str(value)


def _value_node(label: str, descriptor, value: Any, now: float) -> _Node:
    """A node for one value: a message becomes a subtree, a string with newlines a block."""
    if descriptor.message_type is None:
        text = _scalar_text(descriptor, value)
        if "\n" in text:
            return _Node(label, "|", [_Node(line) for line in text.rstrip("\n").split("\n")])
        return _Node(label, text)
    name = descriptor.message_type.full_name
    if name == "google.protobuf.Timestamp":
        return _Node(label, time_and_age(value, now))
    if name in _INLINE_MAPS:  # small maps read best on one line: "cpus=4,memory=8192"
        mapping = getattr(value, _INLINE_MAPS[name])
        return _Node(label, pairs({k: number(v) for k, v in mapping.items()}))
    return _Node(label, "", _message_nodes(value, now))


def _message_nodes(message: Message, now: float, skip: Iterable[str] = ()) -> List[_Node]:
    """The tree of every set field of a message (field names titled, map keys kept as they are)."""
    nodes = []
    skipped = set(skip)
    for descriptor, value in message.ListFields():
        if descriptor.name in skipped:
            continue
        label = _title(descriptor.name)
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            value_descriptor = descriptor.message_type.fields_by_name["value"]
            nodes.append(_Node(label, "", [_value_node(str(key), value_descriptor, value[key], now)
                                           for key in sorted(value)]))
        elif descriptor.is_repeated and descriptor.message_type is not None:
            nodes.append(_Node(label, "", [_value_node(f"[{index}]", descriptor, item, now)
                                           for index, item in enumerate(value)]))
        elif descriptor.is_repeated:
            nodes.append(_Node(label, ", ".join(_scalar_text(descriptor, item) for item in value)))
        else:
            nodes.append(_value_node(label, descriptor, value, now))
    return nodes


def _render_nodes(nodes: Sequence[_Node], indent: int = 0) -> List[str]:
    """Siblings' values start in one column, like kubectl describe."""
    width = max((len(node.label) for node in nodes if node.value), default=0) + 2
    lines = []
    for node in nodes:
        prefix = " " * indent
        if node.value:
            lines.append(f"{prefix}{(node.label + ':').ljust(width)}{node.value}".rstrip())
        elif node.children:
            lines.append(f"{prefix}{node.label}:")
        else:
            lines.append(f"{prefix}{node.label}")
        lines.extend(_render_nodes(node.children, indent + 2))
    return lines


def _metadata_nodes(kind: kinds.Kind, obj: Message, now: float) -> List[_Node]:
    meta = obj.metadata

    def listing(mapping: Mapping[str, str]) -> List[_Node]:
        return [_Node(f"{key}={value}") for key, value in sorted(mapping.items())]

    nodes = [_Node("Name", meta.name)]
    if kind.namespaced:
        nodes.append(_Node("Namespace", meta.namespace or NONE))
    nodes.append(_Node("Kind", kind.name))
    nodes.append(_Node("Labels", "" if meta.labels else NONE, listing(meta.labels)))
    nodes.append(_Node("Annotations", "" if meta.annotations else NONE, listing(meta.annotations)))
    nodes.append(_Node("UID", meta.uid or NONE))
    nodes.append(_Node("Resource Version", str(meta.resource_version)))
    nodes.append(_Node("Generation", str(meta.generation)))
    nodes.append(_Node("Created", time_and_age(meta.creation_timestamp, now)))
    if is_set(meta.deletion_timestamp):
        nodes.append(_Node("Deletion Requested", time_and_age(meta.deletion_timestamp, now)))
    if meta.finalizers:
        nodes.append(_Node("Finalizers", ", ".join(meta.finalizers)))
    if meta.owner_references:
        nodes.append(_Node("Owners", ", ".join(f"{o.kind}/{o.name}" for o in meta.owner_references)))
    return nodes


def describe(obj: Message, related: Sequence[Section], now: float) -> str:
    """The describe page: metadata, spec, status (conditions as a table), then the related
    sections the caller gathered (e.g. replicas, events)."""
    kind = kinds.kind_of(obj)
    nodes = _metadata_nodes(kind, obj, now)
    spec = _message_nodes(obj.spec, now)
    status = _message_nodes(obj.status, now, skip=("conditions",))
    nodes.append(_Node("Spec", "" if spec else NONE, spec))
    nodes.append(_Node("Status", "" if status else NONE, status))
    lines = _render_nodes(nodes)
    sections = list(related)
    conditions = getattr(obj.status, "conditions", None)
    if conditions is not None:
        sections.insert(0, conditions_section(conditions, now))
    for section in sections:
        lines.extend(section.lines())
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- history

def _flatten(data: Any, prefix: str = "") -> Dict[str, Any]:
    """{'spec.replicas': 2, 'metadata.labels.app': 'x', 'spec.ports': [80]} (lists are leaves)."""
    if not isinstance(data, dict) or (prefix and not data):
        return {prefix: data}
    flat: Dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changed_paths(before: Message, after: Message) -> List[str]:
    """The field paths whose value differs between two revisions of an object, sorted."""
    old = _flatten(convert.to_manifest(before))
    new = _flatten(convert.to_manifest(after))
    return sorted(path for path in set(old) | set(new)
                  if path not in _HISTORY_IGNORED and old.get(path) != new.get(path))


def change_summary(paths: Sequence[str]) -> str:
    if not paths:
        return "no field changes"
    shown = ", ".join(paths[:MAX_CHANGES_SHOWN])
    more = len(paths) - MAX_CHANGES_SHOWN
    return f"{shown} (+{more} more)" if more > 0 else shown


def history_lines(revisions: Sequence[Message]) -> List[str]:
    """REVISION GENERATION CHANGES, oldest first; `revisions` come newest first (as the API
    returns them). The API keeps no modification times, so revisions are told apart by number."""
    ordered = list(reversed(revisions))
    rows = [["REVISION", "GENERATION", "CHANGES"]]
    for index, revision in enumerate(ordered):
        meta = revision.metadata
        if index == 0:
            summary = "(oldest shown)"
        else:
            summary = change_summary(changed_paths(ordered[index - 1], revision))
        rows.append([str(meta.resource_version), str(meta.generation), summary])
    return render_rows(rows)[0]


def now_seconds() -> float:
    return datetime.datetime.now(datetime.timezone.utc).timestamp()
