"""The one place where criv errors meet the gRPC wire.

:class:`ErrorInterceptor` wraps every RPC handler: a :class:`~criv.errors.CrivError`
becomes its own status code and message; anything else becomes INTERNAL and is logged
with the method and the request, so a bug never takes the daemon down. A request that
does not parse (bad wire format, invalid UTF-8) is refused with INVALID_ARGUMENT. It
also counts every call by RPC and status code and times it (criv/metrics.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message

from criv import metrics
from criv.errors import CrivError, InvalidArgument

log = logging.getLogger("criv.cri")

_MAX_LOGGED_REQUEST = 2000
# Credentials that may ride in a request (PullImage's AuthConfig): never logged.
_SECRET_FIELDS = frozenset({"password", "auth", "identity_token", "registry_token"})


def _redacted(msg: Message) -> Message:
    copy = type(msg)()
    copy.CopyFrom(msg)
    _redact(copy)
    return copy


def _redact(msg: Message) -> None:
    for field, value in msg.ListFields():
        if field.name in _SECRET_FIELDS and isinstance(value, str):
            setattr(msg, field.name, "<redacted>")
        elif field.message_type is not None:
            if field.is_repeated:
                items = value.values() if hasattr(value, "values") else value
                for item in items:
                    if isinstance(item, Message):
                        _redact(item)
            else:
                _redact(value)


def _describe(request: Any) -> str:
    if isinstance(request, Message):
        text = text_format.MessageToString(_redacted(request), as_one_line=True)
    else:
        text = repr(request)
    return text[:_MAX_LOGGED_REQUEST]


class _Undecodable:
    """What a request that does not parse becomes: the RPC answers INVALID_ARGUMENT
    (gRPC itself would answer UNKNOWN with the parser's exception)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:
            return _Undecodable(e)

    return parse


def _refuse_undecodable(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(f"the request is not a valid message: {request.error}")


def _code_of(context: grpc.aio.ServicerContext, e: BaseException | None) -> str:
    """The status the caller gets, for the request metrics."""
    if e is None:
        return "OK"
    if not isinstance(e, Exception):
        return "CANCELLED"  # the caller went away (or criv is stopping)
    if isinstance(e, CrivError):
        return str(e.code.name)
    if isinstance(e, (grpc.aio.AbortError, grpc.RpcError)):
        code = context.code()  # set by context.abort
        return str(code.name) if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return "INTERNAL"


async def _abort(
    context: grpc.aio.ServicerContext, method: str, request: Any, e: Exception
) -> None:
    if isinstance(e, CrivError):
        log.info("%s failed: %s: %s", method, e.code.name, e.message)
        await context.abort(e.code, e.message)
    log.exception("%s: internal error; request: %s", method, _describe(request))
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")


def _wrap_unary(method: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    rpc = method.rpartition("/")[2]

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        t0 = time.monotonic()
        failed: BaseException | None = None
        try:
            _refuse_undecodable(request)
            return await fn(request, context)
        except (grpc.aio.AbortError, grpc.RpcError) as e:  # already a status: pass it on
            failed = e
            raise
        except BaseException as e:
            failed = e
            if not isinstance(e, Exception):
                raise  # cancelled: nobody to answer
            await _abort(context, method, request, e)
            raise  # unreachable: abort raises
        finally:
            metrics.cri_request(rpc, _code_of(context, failed), time.monotonic() - t0)

    return handler


def _wrap_stream(method: str, fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
    rpc = method.rpartition("/")[2]

    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        t0 = time.monotonic()
        failed: BaseException | None = None
        try:
            _refuse_undecodable(request)
            async for item in fn(request, context):
                yield item
        except (grpc.aio.AbortError, grpc.RpcError) as e:
            failed = e
            raise
        except BaseException as e:
            failed = e
            if not isinstance(e, Exception):
                raise
            await _abort(context, method, request, e)
        finally:
            metrics.cri_request(rpc, _code_of(context, failed), time.monotonic() - t0)

    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, handler.unary_unary),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method, handler.unary_stream),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


MAX_MESSAGE = 16 * 1024 * 1024  # kubelet's own limit for CRI messages


def cri_server() -> grpc.aio.Server:
    """criv's CRI server, empty: every call through :class:`ErrorInterceptor`, messages up
    to ``MAX_MESSAGE`` each way (bench/grpcfloor.py builds its floor on the same)."""
    return grpc.aio.server(
        interceptors=[ErrorInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )


def fill_unimplemented(servicer_cls: type, service_name: str, missing: dict[str, str]) -> None:
    """Give every RPC the servicer does not define an UNIMPLEMENTED answer naming why.

    The generated base class would answer "Method not implemented!"; criv says which
    part is missing instead (``missing`` maps RPC name to that explanation).
    """
    for name, why in missing.items():
        if name in servicer_cls.__dict__:
            continue

        def make(rpc: str, reason: str) -> Callable[..., Any]:
            async def unimplemented(self: Any, request: Any, context: Any) -> Any:
                await context.abort(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"{service_name}.{rpc} is not implemented by criv: {reason}",
                )

            return unimplemented

        setattr(servicer_cls, name, make(name, why))
