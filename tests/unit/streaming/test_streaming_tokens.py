"""Tokens, request validation, status documents, resize parsing, WebSocket accept key."""

from __future__ import annotations

import json
import re

import pytest

from criv.errors import InvalidArgument, ResourceExhausted
from criv.streaming import remotecommand as rc
from criv.streaming.requests import ExecRequest, PortForwardRequest
from criv.streaming.service import StreamingService
from criv.streaming.tokens import TokenCache, new_token
from criv.streaming.websocket import accept_key


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_format() -> None:
    for _ in range(100):
        assert re.fullmatch(r"[A-Za-z0-9_-]{8}", new_token())


def test_tokens_are_single_use_and_expire() -> None:
    clock = FakeClock()
    cache = TokenCache(clock=clock)
    req = ExecRequest("c1", ["true"])
    tok = cache.insert(req)
    assert cache.consume(tok) == req
    assert cache.consume(tok) is None  # reused
    assert cache.consume("AAAAAAAA") is None  # unknown
    tok = cache.insert(req)
    clock.now += 60.5
    assert cache.consume(tok) is None  # expired
    assert len(cache) == 0


def test_expired_tokens_are_purged_on_insert_and_capacity_holds() -> None:
    clock = FakeClock()
    cache = TokenCache(capacity=3, clock=clock)
    for _ in range(3):
        cache.insert(PortForwardRequest("s"))
    with pytest.raises(ResourceExhausted, match="maximum number of in-flight requests"):
        cache.insert(PortForwardRequest("s"))
    clock.now += 61
    cache.insert(PortForwardRequest("s"))
    assert len(cache) == 1


class _FakeServer:
    def __init__(self) -> None:
        self.requests: list[object] = []

    def url_for(self, request: object) -> str:
        self.requests.append(request)
        return "http://127.0.0.1:1/x"


def test_service_validation() -> None:
    svc = StreamingService(_FakeServer())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="container_id"):
        svc.exec_url("", ["ls"])
    with pytest.raises(InvalidArgument, match="cmd"):
        svc.exec_url("c", [])
    with pytest.raises(InvalidArgument, match="tty and stderr"):
        svc.exec_url("c", ["ls"], tty=True, stderr=True)
    with pytest.raises(InvalidArgument, match="one of stdin"):
        svc.attach_url("c", stdout=False, stderr=False)
    with pytest.raises(InvalidArgument, match="pod_sandbox_id"):
        svc.port_forward_url("")
    assert svc.exec_url("c", ["ls"], tty=True, stderr=False).startswith("http://")
    assert svc.attach_url("c", stdin=True, stdout=False, stderr=False)
    assert svc.port_forward_url("s", [80])


def test_status_documents_are_exact() -> None:
    assert rc.exit_status(rc.V4, ["true"], 0) == b'{"metadata":{},"status":"Success"}'
    doc = rc.exit_status(rc.V5, ["sh", "-c", "exit 7"], 7)
    assert doc.startswith(b'{"metadata":{},"status":"Failure","message":"command terminated')
    parsed = json.loads(doc)
    assert parsed["reason"] == "NonZeroExitCode"
    assert parsed["details"] == {"causes": [{"reason": "ExitCode", "message": "7"}]}
    assert rc.exit_status(rc.V3, ["true"], 0) == b""
    assert rc.exit_status(rc.V2, ["x"], 3).startswith(b"command terminated with non-zero exit")
    err = json.loads(rc.internal_error_status(rc.V4, "boom"))
    assert list(err) == ["metadata", "status", "message", "reason", "details", "code"]
    assert err["code"] == 500 and err["message"] == "Internal error occurred: boom"


def test_resize_parser_handles_split_and_packed_objects() -> None:
    p = rc.ResizeParser()
    assert p.feed(b'{"Width":100,') == []
    assert p.feed(b'"Height":40}\n{"width":1,"HEIGHT":2}\n') == [(100, 40), (1, 2)]
    assert p.feed(b" \n") == []
    with pytest.raises(ValueError):
        p.feed(b'{"Width":70000,"Height":1}')
    with pytest.raises(ValueError):
        rc.ResizeParser().feed(b"[1,2]")


def test_websocket_accept_vector() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
