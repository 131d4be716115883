"""Label and field selectors: parsing and matching.

Label selector: comma-separated requirements `a=b`, `a==b`, `a!=b`, `a in (x,y)`,
`a notin (x)`, `a` (exists), `!a` (does not exist); all must hold.
Field selector: `path=value` or `path!=value` over dotted field paths of the object, e.g.
`metadata.name=web`, `spec.cluster=c1`, `status.phase!=RUNNING`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from google.protobuf.message import Message

from skyshift.api.errors import InvalidError

_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET_RE = re.compile(rf"^\s*(?P<key>{_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)\s*$")
_EQ_RE = re.compile(rf"^\s*(?P<key>{_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>{_VALUE})\s*$")
_EXISTS_RE = re.compile(rf"^\s*(?P<neg>!?)\s*(?P<key>{_KEY})\s*$")


@dataclasses.dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: Tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present


def _split_top_level(text: str) -> List[str]:
    """Split on commas outside parentheses."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p for p in (p.strip() for p in parts) if p]


class LabelSelector:
    def __init__(self, requirements: Sequence[Requirement] = ()):
        self.requirements = tuple(requirements)

    @classmethod
    def parse(cls, text: str, field: str = "label_selector") -> "LabelSelector":
        requirements = []
        for part in _split_top_level(text or ""):
            match = _SET_RE.match(part)
            if match:
                values = tuple(v.strip() for v in match["values"].split(",") if v.strip())
                if not values:
                    raise InvalidError(field, f"{part!r}: the value set is empty")
                requirements.append(Requirement(match["key"], "In" if match["op"] == "in" else "NotIn", values))
                continue
            match = _EQ_RE.match(part)
            if match:
                operator = "NotIn" if match["op"] == "!=" else "In"
                requirements.append(Requirement(match["key"], operator, (match["value"],)))
                continue
            match = _EXISTS_RE.match(part)
            if match:
                requirements.append(Requirement(match["key"], "DoesNotExist" if match["neg"] else "Exists"))
                continue
            raise InvalidError(field, f"cannot parse {part!r}: expected a=b, a!=b, a in (x,y), a notin (x), a or !a")
        return cls(requirements)

    @classmethod
    def from_terms(cls, match_labels: Mapping[str, str], match_expressions=(), field: str = "selector") -> "LabelSelector":
        """From `match_labels` plus `match_expressions` (objects with key, operator, values)."""
        requirements = [Requirement(k, "In", (v,)) for k, v in sorted(match_labels.items())]
        for index, expression in enumerate(match_expressions):
            operator = expression.operator
            if operator not in ("In", "NotIn", "Exists", "DoesNotExist"):
                raise InvalidError(f"{field}.match_expressions[{index}].operator",
                                   f"unknown operator {operator!r} (In, NotIn, Exists, DoesNotExist)")
            requirements.append(Requirement(expression.key, operator, tuple(expression.values)))
        return cls(requirements)

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def empty(self) -> bool:
        return not self.requirements

    def __str__(self) -> str:
        return ",".join(f"{r.key} {r.operator} {list(r.values)}" for r in self.requirements)


def _field_getter(path: str, root_descriptor, field: str) -> Callable[[Message], str]:
    names = path.split(".")
    descriptor = root_descriptor
    steps: List[Tuple[str, Optional[object]]] = []
    for index, name in enumerate(names):
        fd = descriptor.fields_by_name.get(name) if descriptor is not None else None
        if fd is None or fd.is_repeated:
            raise InvalidError(field, f"{path!r} is not a selectable field")
        steps.append((name, fd))
        descriptor = fd.message_type
        if descriptor is not None and index == len(names) - 1:
            raise InvalidError(field, f"{path!r} is not a scalar field")

    def get(message: Message) -> str:
        value = message
        for name, _ in steps:
            value = getattr(value, name)
        last = steps[-1][1]
        if last.enum_type is not None:
            return last.enum_type.values_by_number[value].name
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)

    return get


class FieldSelector:
    def __init__(self, terms: Sequence[Tuple[Callable[[Message], str], bool, str]] = (), text: str = ""):
        self.terms = tuple(terms)
        self.text = text
        self.equalities: Dict[str, str] = {}

    @classmethod
    def parse(cls, text: str, descriptor, field: str = "field_selector") -> "FieldSelector":
        terms = []
        equalities = {}
        for part in _split_top_level(text or ""):
            match = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(==|=|!=)\s*(.*?)\s*$", part)
            if not match:
                raise InvalidError(field, f"cannot parse {part!r}: expected path=value or path!=value")
            path, operator, value = match.groups()
            terms.append((_field_getter(path, descriptor, field), operator != "!=", value))
            if operator != "!=":
                equalities[path] = value
        selector = cls(terms, text)
        selector.equalities = equalities
        return selector

    def matches(self, message: Message) -> bool:
        return all((get(message) == value) == equal for get, equal, value in self.terms)

    def empty(self) -> bool:
        return not self.terms
