"""sd_notify: the datagram systemd expects, and NOTIFY_SOCKET kept from criv's children."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from criv.sdnotify import Notifier


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(5)
    yield s, str(path)
    s.close()


def test_sends_fields_as_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    s, path = receiver
    assert Notifier(path).notify("READY=1", "STATUS=serving")
    assert s.recv(1024) == b"READY=1\nSTATUS=serving"


def test_abstract_socket() -> None:
    name = f"criv-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        assert Notifier("@" + name).notify("STOPPING=1")
        assert s.recv(1024) == b"STOPPING=1"


def test_no_systemd_or_bad_address_is_a_quiet_no(tmp_path: Path) -> None:
    assert not Notifier("").notify("READY=1")
    assert not Notifier("relative/path").notify("READY=1")
    assert not Notifier(str(tmp_path / "nobody-listens")).notify("READY=1")


def test_taken_out_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # children (agents, crun) must not inherit it: crun would forward container
    # notifications and fail to start containers
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    n = Notifier.from_environ()
    assert n.address == "/run/systemd/notify"
    assert "NOTIFY_SOCKET" not in os.environ
