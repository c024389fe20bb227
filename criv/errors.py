"""The one error hierarchy of criv.

Every error criv raises on purpose is a :class:`CrivError` subclass carrying the gRPC
status code it maps to. The CRI servicers never build gRPC errors themselves: the
interceptor in :mod:`criv.cri.wire` turns a ``CrivError`` into its status and any other
exception into INTERNAL (logged with the request).
"""

from __future__ import annotations

import grpc

# A status message rides in a gRPC trailer (percent-encoded, 8 KiB by default on the
# client) and in criv's log; one that quotes a huge request value is clipped.
MAX_MESSAGE_BYTES = 1024


def clip_message(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    raw = message.encode(errors="replace")
    if len(raw) <= limit:
        return message
    return raw[:limit].decode(errors="ignore") + f"... ({len(raw)} bytes)"


class CrivError(Exception):
    """Base class; ``code`` is the gRPC status the error maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        message = clip_message(message)
        super().__init__(message)
        self.message = message


class InvalidArgument(CrivError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CrivError):
    code = grpc.StatusCode.NOT_FOUND


class AmbiguousId(InvalidArgument):
    """An id prefix that matches more than one object (containerd: "ambiguous")."""


class AlreadyExists(CrivError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CrivError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(CrivError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(CrivError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CrivError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(CrivError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(CrivError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(CrivError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Internal(CrivError):
    code = grpc.StatusCode.INTERNAL


class ConfigError(CrivError):
    """The configuration is invalid; criv refuses to start. ``key`` names the culprit."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key {key!r}: {message}")
        self.key = key


# Image errors: the registry said no, or what it sent is unusable.
class ImageError(CrivError):
    code = grpc.StatusCode.UNKNOWN


class RegistryAuthError(ImageError):
    """The registry refused our credentials (names the registry and its status)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class RegistryError(ImageError):
    """The registry or the network failed; carries the registry's message."""

    code = grpc.StatusCode.UNAVAILABLE


class ImageNotFound(ImageError):
    code = grpc.StatusCode.NOT_FOUND


class DigestMismatch(ImageError):
    code = grpc.StatusCode.DATA_LOSS


class UnsafeLayer(ImageError):
    """A layer entry would land outside the layer root; the pull is refused."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ImageLimitExceeded(ImageError):
    """A registry or an image crossed a bound of ``image_limits`` (a tar header, a
    layer's expanded size, entries, layers, a blob or manifest size); the message names
    the limit and its config key. The pull is refused and leaves nothing behind."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


# Agent / sandbox errors.
class AgentError(CrivError):
    """The agent channel failed or the agent answered with an error."""

    code = grpc.StatusCode.UNAVAILABLE


# Faults outside criv: a host command or the hypervisor that does not answer.
class CommandTimeout(DeadlineExceeded):
    """A host command (mount, crun, a CNI plugin...) ran past its deadline and was
    killed with its process group; the message names the command."""


class HypervisorTimeout(Unavailable):
    """A libvirt call did not answer within its deadline (libvirtd hung or overloaded);
    the caller is released, the call's thread is left to finish or hang."""


# VM-image pods: the SSH session to the guest (criv.vmimage.ssh).
class SSHUnavailable(Unavailable):
    """The guest's SSH server did not answer within the connect timeout, refused the
    connection or the key, or the session broke; the message names the address."""


class HostKeyMismatch(FailedPrecondition):
    """The guest's SSH host key is not the one pinned for the pod; criv refuses to talk
    to it (a guest must not swap its key after the first pin)."""
