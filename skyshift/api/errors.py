"""SkyShift errors and their gRPC status codes, in one place for server and client alike."""
from __future__ import annotations

from typing import Dict, Type

import grpc


class SkyShiftError(Exception):
    """Base of every error the API reports. `code` is the gRPC status it travels as."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidError(SkyShiftError):
    """The request or object is malformed; the message names the field path."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field


class NotFoundError(SkyShiftError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(SkyShiftError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ConflictError(SkyShiftError):
    """The object changed since it was read: re-read it and retry."""

    code = grpc.StatusCode.ABORTED


class PreconditionError(SkyShiftError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class GoneError(SkyShiftError):
    """The requested revision is compacted or outside the watch cache: re-list."""

    code = grpc.StatusCode.OUT_OF_RANGE


class LimitError(SkyShiftError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(SkyShiftError):
    """Transient: the call may be retried."""

    code = grpc.StatusCode.UNAVAILABLE


class UnauthenticatedError(SkyShiftError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(SkyShiftError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineError(SkyShiftError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InternalError(SkyShiftError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: Dict[grpc.StatusCode, Type[SkyShiftError]] = {
    cls.code: cls
    for cls in (
        NotFoundError, AlreadyExistsError, ConflictError, PreconditionError, GoneError,
        LimitError, UnavailableError, UnauthenticatedError, PermissionDeniedError,
        DeadlineError, InternalError,
    )
}

_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def from_status(code: grpc.StatusCode, message: str) -> SkyShiftError:
    """The exception a client raises for a gRPC status."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, problem = message.partition(": ")
        return InvalidError(field, problem) if problem else InvalidError("", message)
    cls = _BY_CODE.get(code, SkyShiftError)
    error = cls(message)
    error.code = code
    return error


def from_rpc_error(error: grpc.RpcError) -> SkyShiftError:
    return from_status(error.code(), error.details() or "")


def code_from_int(value: int) -> grpc.StatusCode:
    return _CODE_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)


def is_retryable(error: BaseException) -> bool:
    return isinstance(error, UnavailableError)
