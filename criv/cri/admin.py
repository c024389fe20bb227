"""criv's own RPCs beside CRI on its socket, for its CLI: what CRI has no call for.

``/criv.admin.v1.Images/ImportLayout``: import the image of a local OCI image layout into
the store under a reference (`criv vm-image import`). The daemon owns the store (it holds
the state dir's lock and the image index), so the CLI asks it rather than writing the
store itself. Messages are small JSON objects (no generated code): request
``{"layout": "/abs/path", "ref": "repo:tag"}``, answer ``{"id": "sha256:..."}``. Errors
are CrivErrors mapped by the same interceptor as CRI's. The socket is root's (0660), the
same trust as CRI itself, which can already run privileged pods.
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

SERVICE = "criv.admin.v1.Images"
IMPORT_LAYOUT = f"/{SERVICE}/ImportLayout"
_MAX_FIELD = 4096


def _decode(data: bytes) -> dict[str, Any]:
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def _field(request: dict[str, Any], key: str) -> str:
    v = request.get(key)
    if not isinstance(v, str) or not v or len(v) > _MAX_FIELD:
        raise InvalidArgument(f"ImportLayout: {key!r} must be a non-empty string")
    return v


def images_handler(images: ImageManager) -> grpc.GenericRpcHandler:
    async def import_(request: dict[str, Any], context: grpc.aio.ServicerContext) -> dict[str, Any]:
        layout, ref = Path(_field(request, "layout")), _field(request, "ref")
        return {"id": await import_layout(images, layout, ref)}

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ImportLayout": grpc.unary_unary_rpc_method_handler(
                import_, request_deserializer=_decode, response_serializer=_encode
            )
        },
    )


class RemoteError(CrivError):
    """An error the daemon answered, with its status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def import_via_daemon(socket: Path, layout: Path, ref: str, timeout: float) -> str:
    """Ask the criv serving ``socket`` to import ``layout`` as ``ref``; the image id."""
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=5.0)
        except grpc.FutureTimeoutError:
            raise Unavailable(
                f"nothing serves unix://{socket}: start criv first (criv serve --daemon)"
            ) from None
        call = channel.unary_unary(
            IMPORT_LAYOUT, request_serializer=_encode, response_deserializer=_decode
        )
        try:
            answer = call({"layout": str(layout), "ref": ref}, timeout=timeout)
        except grpc.RpcError as e:
            raise RemoteError(e.code(), f"{e.code().name}: {e.details()}") from None
    image_id = answer.get("id") if isinstance(answer, dict) else None
    if not isinstance(image_id, str):
        raise Unavailable(f"unexpected answer from criv: {answer!r}")
    return image_id
