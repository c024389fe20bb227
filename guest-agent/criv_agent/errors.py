"""Agent errors. Each carries the gRPC status code name it maps to; service.py maps them
to the wire in one place, and no other module imports grpc for errors."""

from __future__ import annotations


class AgentError(Exception):
    """Base class; ``code`` is a ``grpc.StatusCode`` member name."""

    code = "INTERNAL"


class InvalidArgument(AgentError):
    code = "INVALID_ARGUMENT"


class NotFound(AgentError):
    code = "NOT_FOUND"


class AlreadyExists(AgentError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(AgentError):
    code = "FAILED_PRECONDITION"


class Unavailable(AgentError):
    code = "UNAVAILABLE"


class DeadlineExceeded(AgentError):
    code = "DEADLINE_EXCEEDED"


class RuntimeFailure(AgentError):
    """crun (or the kernel) refused what we asked."""

    code = "INTERNAL"
