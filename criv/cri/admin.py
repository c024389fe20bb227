"""criv's own RPCs beside CRI on its socket, for its CLI: what CRI has no call for.

- ``/criv.admin.v1.Images/ImportLayout``: import the image of a local OCI image layout
  into the store under a reference (`criv vm-image import`): request
  ``{"layout": "/abs/path", "ref": "repo:tag"}``, answer ``{"id": "sha256:..."}``;
- ``/criv.admin.v1.Images/CommitContainer``: flatten a stopped vm-image container's disk
  into a containerDisk image under a reference (`criv vm-image commit`,
  :mod:`criv.sandbox.vmimage.commit`), its layout written in the CLI's scratch dir:
  request ``{"container": "ID", "ref": "repo:tag", "workdir": "/state/.vm-image-...",
  "name": ""}``, answer ``{"id", "ref", "layout", "disk", "seconds"}``.

The daemon owns the store (it holds the state dir's lock and the image index) and the
containers, so the CLI asks it rather than writing the store itself. Messages are small
JSON objects (no generated code). Errors are CrivErrors mapped by the same interceptor
as CRI's. The socket is root's (0660), the same trust as CRI itself, which can already
run privileged pods.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from criv.errors import CrivError, InvalidArgument, Unavailable
from criv.image.importer import import_layout

if TYPE_CHECKING:
    from criv.image.manager import ImageManager
    from criv.sandbox.manager import SandboxManager

SERVICE = "criv.admin.v1.Images"
IMPORT_LAYOUT = f"/{SERVICE}/ImportLayout"
COMMIT_CONTAINER = f"/{SERVICE}/CommitContainer"
_MAX_FIELD = 4096


def _decode(data: bytes) -> dict[str, Any]:
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def _field(request: dict[str, Any], key: str, rpc: str, empty: bool = False) -> str:
    v = request.get(key, "" if empty else None)
    if not isinstance(v, str) or (not v and not empty) or len(v) > _MAX_FIELD:
        raise InvalidArgument(f"{rpc}: {key!r} must be a non-empty string")
    return v


def images_handler(images: ImageManager, sandboxes: SandboxManager) -> grpc.GenericRpcHandler:
    async def import_(request: dict[str, Any], context: grpc.aio.ServicerContext) -> dict[str, Any]:
        rpc = "ImportLayout"
        layout, ref = Path(_field(request, "layout", rpc)), _field(request, "ref", rpc)
        return {"id": await import_layout(images, layout, ref)}

    async def commit(request: dict[str, Any], context: grpc.aio.ServicerContext) -> dict[str, Any]:
        from criv.sandbox.vmimage.commit import commit_container  # the CLI imports this module

        rpc = "CommitContainer"
        c = await commit_container(
            sandboxes.ctx, images, _field(request, "container", rpc), _field(request, "ref", rpc),
            Path(_field(request, "workdir", rpc)), _field(request, "name", rpc, empty=True),
        )  # fmt: skip
        return {
            "id": c.image_id, "ref": c.ref, "layout": str(c.layout), "disk": c.disk_name,
            "seconds": round(c.seconds, 3),
        }  # fmt: skip

    def unary(fn: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=_decode, response_serializer=_encode
        )

    return grpc.method_handlers_generic_handler(
        SERVICE, {"ImportLayout": unary(import_), "CommitContainer": unary(commit)}
    )


class RemoteError(CrivError):
    """An error the daemon answered, with its status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def call_daemon(
    socket: Path, method: str, request: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Call one of criv's admin RPCs on the criv serving ``socket``; its answer, which
    holds at least a string ``id``."""
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=5.0)
        except grpc.FutureTimeoutError:
            raise Unavailable(
                f"nothing serves unix://{socket}: start criv first (criv serve --daemon)"
            ) from None
        call = channel.unary_unary(
            method, request_serializer=_encode, response_deserializer=_decode
        )
        try:
            answer = call(request, timeout=timeout)
        except grpc.RpcError as e:
            raise RemoteError(e.code(), f"{e.code().name}: {e.details()}") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("id"), str):
        raise Unavailable(f"unexpected answer from criv: {answer!r}")
    return answer


def import_via_daemon(socket: Path, layout: Path, ref: str, timeout: float) -> str:
    """Ask the criv serving ``socket`` to import ``layout`` as ``ref``; the image id."""
    answer = call_daemon(socket, IMPORT_LAYOUT, {"layout": str(layout), "ref": ref}, timeout)
    return str(answer["id"])
