"""The one place that converts between protobuf objects and Python data (manifests).

Manifests are YAML/JSON mappings `{kind, metadata, spec, status}` with snake_case field names
(camelCase also accepted). Unknown fields are errors naming the field path, never dropped.
"""
from __future__ import annotations

import datetime
import re
from typing import Any, Dict, List, Optional

from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from skyshift.api import kinds
from skyshift.api.errors import InvalidError

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")
_INT_TYPES = {
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64,
}
_INT32_TYPES = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_FIXED32}
_FLOAT_TYPES = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}
_INT32_RANGE = (-(2 ** 31), 2 ** 31 - 1)
_INT64_RANGE = (-(2 ** 63), 2 ** 63 - 1)
_TOP_LEVEL = {"kind", "apiVersion", "api_version", "metadata", "spec", "status"}
# Resources given in MiB that also accept unit strings ("4Gi", "512M").
_SIZE_RESOURCES = {"memory", "disk"}
_UNITS_MIB = {
    "": 1.0, "k": 1 / 1024, "ki": 1 / 1024, "m": 1.0, "mi": 1.0, "g": 1024.0, "gi": 1024.0,
    "t": 1024.0 ** 2, "ti": 1024.0 ** 2,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?)?[bB]?\s*$")


def snake_case(name: str) -> str:
    return _CAMEL.sub("_", name).lower()


def parse_size_mib(value: Any, field: str) -> float:
    """A size in MiB from a number (already MiB) or a string with a unit ("4Gi", "512M")."""
    if isinstance(value, bool):
        raise InvalidError(field, f"expected a size, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    match = _SIZE.match(str(value))
    if not match:
        raise InvalidError(field, f"expected a size such as 512 (MiB), 4Gi or 2G, got {value!r}")
    number, unit = match.groups()
    return float(number) * _UNITS_MIB[(unit or "").lower()]


def _parse_timestamp(value: Any, field: str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    try:
        if isinstance(value, datetime.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=datetime.timezone.utc)
            stamp.FromDatetime(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            stamp.FromNanoseconds(int(value * 1e9))
        else:
            stamp.FromJsonString(str(value))
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidError(field, f"expected an RFC 3339 time, got {value!r}") from exc
    return stamp


def _scalar(descriptor: FieldDescriptor, value: Any, field: str) -> Any:
    kind = descriptor.type
    if kind == FieldDescriptor.TYPE_STRING:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `cpus: 2` as a number; strings fields accept it
        raise InvalidError(field, f"expected a string, got {type(value).__name__}")
    if kind == FieldDescriptor.TYPE_BOOL:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise InvalidError(field, f"expected true or false, got {value!r}")
    if kind in _INT_TYPES:
        if isinstance(value, bool):
            raise InvalidError(field, f"expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            value = int(value)
        if not isinstance(value, int):
            raise InvalidError(field, f"expected an integer, got {value!r}")
        low, high = _INT32_RANGE if kind in _INT32_TYPES else _INT64_RANGE
        if not low <= value <= high:
            raise InvalidError(field, f"{value} is out of range")
        return value
    if kind in _FLOAT_TYPES:
        if isinstance(value, bool):
            raise InvalidError(field, f"expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise InvalidError(field, f"expected a number, got {value!r}") from exc
        if number != number or number in (float("inf"), float("-inf")):
            raise InvalidError(field, f"expected a finite number, got {value!r}")
        return number
    if kind == FieldDescriptor.TYPE_BYTES:
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            return value.encode()
        raise InvalidError(field, f"expected bytes, got {type(value).__name__}")
    if kind == FieldDescriptor.TYPE_ENUM:
        if isinstance(value, str) and value in descriptor.enum_type.values_by_name:
            return descriptor.enum_type.values_by_name[value].number
        if isinstance(value, int) and value in descriptor.enum_type.values_by_number:
            return value
        raise InvalidError(field, f"unknown value {value!r}")
    raise InvalidError(field, "unsupported field type")


def _map_value(descriptor: FieldDescriptor, key: str, value: Any, field: str) -> Any:
    # Resources in MiB accept unit strings.
    if descriptor.message_type.fields_by_name["value"].type in _FLOAT_TYPES and key in _SIZE_RESOURCES \
            and descriptor.name in ("resources", "node_resources"):
        return parse_size_mib(value, field)
    return _scalar(descriptor.message_type.fields_by_name["value"], value, field)


def fill(message: Message, data: Any, path: str) -> None:
    """Fill `message` from a mapping, naming the path of the first bad field."""
    if data is None:
        return
    if message.DESCRIPTOR.full_name == "google.protobuf.Timestamp":
        message.CopyFrom(_parse_timestamp(data, path))
        return
    if not isinstance(data, dict):
        raise InvalidError(path, f"expected a mapping, got {type(data).__name__}")
    fields = message.DESCRIPTOR.fields_by_name
    for raw_key, value in data.items():
        key = str(raw_key)
        name = key if key in fields else snake_case(key)
        descriptor = fields.get(name)
        if descriptor is None:
            # Name the field as the manifest spells it, so the user can find it.
            raise InvalidError(f"{path}.{key}" if path else key, "unknown field")
        field = f"{path}.{name}" if path else name
        if value is None:
            continue
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            if not isinstance(value, dict):
                raise InvalidError(field, f"expected a mapping, got {type(value).__name__}")
            target = getattr(message, name)
            value_descriptor = descriptor.message_type.fields_by_name["value"]
            for map_key, map_value in value.items():
                entry_field = f"{field}.{map_key}"
                if not isinstance(map_key, (str, int)) or isinstance(map_key, bool):
                    raise InvalidError(field, f"keys must be strings, got {map_key!r}")
                map_key = str(map_key)
                if value_descriptor.message_type is not None:
                    fill(target[map_key], map_value, entry_field)
                elif map_value is None:
                    raise InvalidError(entry_field, "expected a value, got null")
                else:
                    target[map_key] = _map_value(descriptor, map_key, map_value, entry_field)
        elif descriptor.is_repeated:
            if not isinstance(value, list):
                raise InvalidError(field, f"expected a list, got {type(value).__name__}")
            target = getattr(message, name)
            for index, item in enumerate(value):
                item_field = f"{field}[{index}]"
                if descriptor.message_type is not None:
                    fill(target.add(), item, item_field)
                else:
                    if item is None:
                        raise InvalidError(item_field, "expected a value, got null")
                    target.append(_scalar(descriptor, item, item_field))
        elif descriptor.message_type is not None:
            fill(getattr(message, name), value, field)
        else:
            setattr(message, name, _scalar(descriptor, value, field))


def from_manifest(data: Any, default_namespace: Optional[str] = None) -> Message:
    """A typed object from a manifest mapping ({kind, metadata, spec[, status]})."""
    if not isinstance(data, dict):
        raise InvalidError("", f"a manifest must be a mapping, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in _TOP_LEVEL)
    if unknown:
        raise InvalidError(unknown[0], "unknown field")
    if "kind" not in data:
        raise InvalidError("kind", "required")
    kind = kinds.resolve(str(data["kind"]))
    message = kind.new()
    for section in ("metadata", "spec", "status"):
        fill(getattr(message, section), data.get(section), section)
    if kind.namespaced and default_namespace and not message.metadata.namespace:
        message.metadata.namespace = default_namespace
    return message


def _value(descriptor: FieldDescriptor, value: Any) -> Any:
    if descriptor.message_type is not None:
        return to_dict(value)
    if descriptor.type == FieldDescriptor.TYPE_ENUM:
        return descriptor.enum_type.values_by_number[value].name
    if descriptor.type in _FLOAT_TYPES and float(value).is_integer():
        return int(value)
    return value


def to_dict(message: Message) -> Any:
    """Plain data for a message: snake_case names, only fields that are set, times as RFC 3339."""
    if message.DESCRIPTOR.full_name == "google.protobuf.Timestamp":
        return message.ToJsonString()
    result: Dict[str, Any] = {}
    for descriptor, value in message.ListFields():
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            value_descriptor = descriptor.message_type.fields_by_name["value"]
            result[descriptor.name] = {k: _value(value_descriptor, v) for k, v in sorted(value.items())}
        elif descriptor.is_repeated:
            result[descriptor.name] = [_value(descriptor, item) for item in value]
        else:
            result[descriptor.name] = _value(descriptor, value)
    return result


def to_manifest(message: Message) -> Dict[str, Any]:
    """A manifest mapping for a typed object: {kind, metadata, spec, status}."""
    kind = kinds.kind_of(message)
    manifest: Dict[str, Any] = {"kind": kind.name}
    for section in ("metadata", "spec", "status"):
        manifest[section] = to_dict(getattr(message, section))
    return manifest


def load_manifests(text: str, source: str = "<input>") -> List[Dict[str, Any]]:
    """Every document in a YAML or JSON text (lists and `kind: List` items are flattened)."""
    import yaml

    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InvalidError(source, f"not valid YAML or JSON: {exc}") from exc
    manifests: List[Dict[str, Any]] = []
    for document in documents:
        if isinstance(document, list):
            manifests.extend(document)
        elif isinstance(document, dict) and document.get("kind") == "List":
            manifests.extend(document.get("items") or [])
        else:
            manifests.append(document)
    return manifests
