"""Status helpers (pure; the API server uses them too): conditions (`status.conditions`, repeated pb.Condition) and observed_generation.

A condition's last_transition_time changes only when its status changes, so re-computing the
same conditions on every reconcile leaves the object byte-for-byte equal and causes no write.
"""
from __future__ import annotations

from typing import Optional

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from skyshift.v1 import objects_pb2 as pb

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"


def now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def get_condition(conditions, type_: str) -> Optional[pb.Condition]:
    for condition in conditions:
        if condition.type == type_:
            return condition
    return None


def is_true(conditions, type_: str) -> bool:
    condition = get_condition(conditions, type_)
    return condition is not None and condition.status == TRUE


def set_condition(conditions, type_: str, status: str, reason: str = "", message: str = "",
                  generation: int = 0) -> bool:
    """Add or update the condition `type_` in the repeated field `conditions`; returns whether
    anything changed. last_transition_time is set only when the status changes."""
    condition = get_condition(conditions, type_)
    if condition is None:
        condition = conditions.add(type=type_)
    before = pb.Condition()
    before.CopyFrom(condition)
    if condition.status != status:
        condition.status = status
        condition.last_transition_time.CopyFrom(now())
    condition.reason = reason
    condition.message = message
    condition.observed_generation = generation
    return condition != before


def remove_condition(conditions, type_: str) -> bool:
    for index, condition in enumerate(conditions):
        if condition.type == type_:
            del conditions[index]
            return True
    return False


def observe_generation(obj: Message) -> None:
    """Record in status that the current spec (metadata.generation) has been acted upon."""
    obj.status.observed_generation = obj.metadata.generation


def is_observed(obj: Message) -> bool:
    """Whether status reflects the current spec."""
    return obj.status.observed_generation >= obj.metadata.generation
