"""paramiko's bounds for a hostile SSH server (criv.vmimage.sshwire) and exit codes."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace
from typing import Any

import paramiko
import pytest
from paramiko.message import Message

from criv.errors import SSHUnavailable
from criv.vmimage import sshwire
from criv.vmimage.sshcommand import exit_code
from criv.vmimage.sshconn import one_command_per_connection


def _exit_signal(name: str) -> Message:
    m = Message()
    m.add_string("exit-signal")
    m.add_boolean(False)
    m.add_string(name)
    m.add_boolean(False)
    m.add_string("")
    m.add_string("")
    m.rewind()
    return m


def _chan(status: int = -1) -> Any:
    return SimpleNamespace(status_event=threading.Event(), exit_status=status)


def test_exit_signal_becomes_128_plus_n() -> None:
    for name, code in [("KILL", 137), ("TERM", 143), ("SIGSEGV", 139), ("RTMIN+3", 255)]:
        chan = _chan()
        sshwire._handle_request(chan, _exit_signal(name))
        assert chan.status_event.is_set()
        assert exit_code(chan, "h:22") == code
    chan = _chan()
    sshwire._handle_request(chan, _exit_signal("X" * 10_000))
    assert sshwire.exit_signal(chan) == "X" * sshwire.MAX_SIGNAL_NAME


def test_exit_status_bounds() -> None:
    assert exit_code(_chan(0), "h:22") == 0
    assert exit_code(_chan(255), "h:22") == 255
    with pytest.raises(SSHUnavailable, match="without an exit status"):
        exit_code(_chan(-1), "h:22")
    with pytest.raises(SSHUnavailable, match="not 0-255"):
        exit_code(_chan(2**32 - 1), "h:22")


def test_other_requests_go_to_paramiko(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    base = dict(sshwire._base_handlers)
    base[paramiko.common.MSG_CHANNEL_REQUEST] = lambda chan, m: seen.append(m.get_text())
    monkeypatch.setattr(sshwire, "_base_handlers", base)
    m = Message()
    m.add_string("exit-status")
    m.add_boolean(False)
    m.add_int(3)
    m.rewind()
    sshwire._handle_request(_chan(), m)
    assert seen == ["exit-status"]  # handed over from the start of the request


def test_channel_over_its_window_is_a_protocol_error() -> None:
    fed: list[int] = []
    feed = sshwire._bounded(lambda chan, m: fed.append(1))
    ok = SimpleNamespace(in_buffer=b"x" * sshwire.WINDOW, in_stderr_buffer=b"")
    feed(ok, Message())  # type: ignore[arg-type]
    over = SimpleNamespace(
        in_buffer=b"x" * sshwire.WINDOW, in_stderr_buffer=b"x" * (3 * sshwire.MAX_PACKET_DATA)
    )
    with pytest.raises(paramiko.SSHException, match="past the channel window"):
        feed(over, Message())  # type: ignore[arg-type]
    assert fed == [1]


def test_packet_and_banner_bounds() -> None:
    a, b = socket.socketpair()
    try:
        p = sshwire._BoundedPacketizer(a)
        with pytest.raises(paramiko.SSHException, match="packet"):
            p.read_all(sshwire.MAX_PACKET + 1)

        def flood() -> None:
            try:
                while True:
                    b.sendall(b"x" * 65536)
            except OSError:
                pass

        threading.Thread(target=flood, daemon=True).start()
        with pytest.raises(paramiko.SSHException, match="banner"):
            p.readline(5)
    finally:
        a.close()
        b.close()


def test_dropbear_versions_that_get_a_connection_per_command() -> None:
    assert one_command_per_connection("SSH-2.0-dropbear_2022.83")
    assert one_command_per_connection("SSH-2.0-dropbear_2024.85")
    assert not one_command_per_connection("SSH-2.0-dropbear_2024.86")
    assert not one_command_per_connection("SSH-2.0-dropbear_2025.88")
    assert not one_command_per_connection("SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3")
