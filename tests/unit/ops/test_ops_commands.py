"""The operator commands' pieces without a daemon: table rendering, /proc facts, the
console follower (rotation, escapes), debug's refusal, namespaces and audit records, and
the vsock backend's reset counter."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from criv.config import Config
from criv.cri.client import ContainerView, PodView
from criv.errors import FailedPrecondition, Unimplemented
from criv.ops import console, debug, procinfo, tables
from criv.ops.podproc import HostProcess
from criv.vsock.backend import CountingDevice
from criv.vsock.device import RX, TX
from criv.vsock.eventloop import Loop
from tests.unit.vsock.vsock_fakes import FakeDriver, GuestMemory


def pod(mode: str = "vm", **st: Any) -> PodView:
    return PodView(
        id="ab" * 32, name="web", namespace="prod", state="ready", ips=["10.0.0.5"],
        created_at_ns=1, mode=mode, info={"isolationState": st, "stateDir": "/s/ab"},
        status={},
    )  # fmt: skip


def test_human_units() -> None:
    assert tables.human_bytes(None) == "-"
    assert tables.human_bytes(512) == "512B"
    assert tables.human_bytes(83 * 1024 * 1024) == "83.0Mi"
    assert tables.human_duration(None) == "-"
    assert tables.human_duration(59) == "59s"
    assert tables.human_duration(3725) == "1h02m"
    assert tables.human_duration(90000) == "1d01h"


def test_pod_table_shows_the_vm_process() -> None:
    p = pod()
    proc = HostProcess("qemu", 4242, procinfo.Memory(rss_kib=85000, pss_kib=80000), 65.0)
    out = tables.render(tables.POD_HEADER, tables.pod_rows([p], {p.id: proc}))
    header, row = out.splitlines()
    assert header.split()[:2] == ["POD", "ID"]
    assert row.split() == [p.id[:13], "web", "prod", "vm", "ready", "10.0.0.5", "4242",
                           "83.0Mi", "1m05s"]  # fmt: skip
    gone = tables.pod_rows([p], {p.id: HostProcess("qemu", 0, None, None)})
    assert gone[0][-3:] == ["-", "-", "-"]


def test_container_rows_use_the_vm_pid_for_vm_pods() -> None:
    p = pod()
    c = ContainerView(
        id="cd" * 32, name="app", pod_id=p.id, state="running", image="busybox",
        created_at_ns=1, started_at_ns=10**9, pid=7, working_set_bytes=2048, info={}, status={},
    )  # fmt: skip
    procs: dict[str, HostProcess | None] = {p.id: HostProcess("qemu", 4242, None, None)}
    (row,) = tables.container_rows([c], {p.id: p}, procs, now_ns=11 * 10**9)
    assert row[1:] == ["app", "web", "prod", "vm", "running", "10.0.0.5", "4242", "2.0Ki", "10s"]


def test_proc_facts_of_a_real_process(tmp_path: Path) -> None:
    mem = procinfo.memory(os.getpid())
    assert mem is not None and mem.rss_kib > 0 and mem.pss_kib > 0
    assert procinfo.memory(0) is None
    assert procinfo.arg_after(["x", "--a", "1", "--b=2"], "--a") == "1"
    assert procinfo.arg_after(["x", "--a", "1", "--b=2"], "--b") == "2"
    assert procinfo.arg_after(["x", "--a"], "--a") is None
    status = tmp_path / "vsock.json"
    status.write_text(json.dumps({"rx_bytes": 9}))
    code = "import sys, time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code, "--status-file", str(status)])
    try:
        from criv.procscan import process_start_time

        for _ in range(500):  # until the child has exec'd (its argv is the new one)
            if "--status-file" in procinfo.argv(proc.pid):
                break
            time.sleep(0.01)
        start = process_start_time(proc.pid)
        assert start is not None
        assert procinfo.vsock_status(proc.pid, start) == {"rx_bytes": 9}
        assert procinfo.vsock_status(proc.pid, start + 1) == {}  # not the recorded process
        up = procinfo.uptime_seconds(proc.pid)
        assert up is not None and up >= 0
    finally:
        proc.kill()
        proc.wait()


def test_sanitize_and_tail() -> None:
    assert console.sanitize(b"ok\r\n\x1b]0;owned\x07\tx\n") == b"ok\n\\x1b]0;owned\\x07\tx\n"
    assert console.tail_lines(b"a\nb\nc\n", 2) == b"b\nc\n"
    assert console.tail_lines(b"a\nb\nc", 2) == b"b\nc"
    assert console.tail_lines(b"a\n", 0) == b""


def test_follower_survives_rotation_and_truncation(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"old line\nlast line\n")
    f = console.Follower(log)
    try:
        assert f.open_at_tail(10) == b"last line\n"
        with log.open("ab") as w:
            w.write(b"more\n")
        assert f.read_new() == b"more\n"
        assert f.read_new() == b""
        log.rename(tmp_path / "console.log.0")  # virtlogd rotates
        assert f.read_new() == b""
        log.write_bytes(b"after rotation\n")
        assert f.read_new() == b"after rotation\n"
        log.write_bytes(b"")  # truncated in place
        with log.open("ab") as w:
            w.write(b"x\n")
        assert f.read_new() == b"x\n"
    finally:
        f.close()


def test_follow_drains_then_stops_with_the_pod(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"")
    f = console.Follower(log)
    f.open_at_tail(0)
    got: list[bytes] = []
    now = [0.0]

    def clock() -> float:
        now[0] += 10  # every check is due
        return now[0]

    def still_running() -> bool:
        with log.open("ab") as w:
            w.write(b"power off\n")  # written as the VM went away
        return False

    console.follow(f, got.append, still_running, clock)
    f.close()
    assert b"".join(got) == b"power off\n"


def test_console_refuses_rw_and_host_pods() -> None:
    with pytest.raises(FailedPrecondition, match="--rw is not supported"):
        console.console_command(Config(), "x", rw=True, lines=1, no_follow=True, raw=False)
    with pytest.raises(FailedPrecondition, match="no VM console"):
        console.console_path(pod("host"))
    assert console.console_path(pod(console_log="/s/c.log")) == Path("/s/c.log")


def test_debug_refuses_vm_pods_and_dead_agents() -> None:
    with pytest.raises(Unimplemented, match="host-mode pods only"):
        debug.agent_pid(pod("vm"))
    with pytest.raises(FailedPrecondition, match="no running agent"):
        debug.agent_pid(pod("host", pid=os.getpid(), start_time=1))


def test_debug_enters_agent_net_and_holder_uts_ipc() -> None:
    assert debug.nsenter_argv(10, 11, ["sh"]) == [
        "nsenter", "--net=/proc/10/ns/net", "--uts=/proc/11/ns/uts", "--ipc=/proc/11/ns/ipc",
        "--", "sh",
    ]  # fmt: skip
    assert debug.nsenter_argv(10, 0, ["id"]) == ["nsenter", "--net=/proc/10/ns/net", "--", "id"]


def test_debug_does_not_take_the_agents_spare_holder_for_the_pods() -> None:
    """A spare holder (criv_agent/spare.py) waits in the agent's namespaces: no holder."""
    import criv_agent.spare

    argv = [sys.executable, "-S", "-E", criv_agent.spare.HOLDER, "--spare"]
    spare = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert spare.stdout is not None and spare.stdout.readline() == b"spare\n"
        assert debug.holder_of(os.getpid()) == 0
    finally:
        spare.kill()
        spare.wait()


def test_audit_records_are_private_json_lines(tmp_path: Path) -> None:
    cfg = Config(state_dir=str(tmp_path))
    debug.audit(cfg, "debug-start", pod="p1", command=["sh"])
    debug.audit(cfg, "debug-end", pod="p1", exitStatus=0)
    path = debug.audit_path(cfg)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first["event"] == "debug-start" and first["pod"] == "p1"
    assert first["uid"] == os.getuid() and first["command"] == ["sh"]
    assert second["event"] == "debug-end" and second["exitStatus"] == 0


def test_vsock_device_counts_a_reset_when_its_last_queue_stops(tmp_path: Path) -> None:
    mem = GuestMemory()
    rx, tx = FakeDriver(mem), FakeDriver(mem)
    dev = CountingDevice(Loop(), 3, str(tmp_path / "h.sock"))
    for i in range(2):  # e.g. a guest reboot: the driver starts, then stops the device
        dev.start_queue(RX, rx.device_queue())
        dev.start_queue(TX, tx.device_queue())
        dev.stop_queue(RX)
        assert dev.resets == i  # not yet: TX still runs
        dev.stop_queue(TX)
        assert dev.resets == i + 1
    dev.stop_queue(RX)  # stopping what is not running is no reset
    assert dev.resets == 2


def test_debug_takes_its_options_anywhere_and_a_command_for_sh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from criv.ops import cli

    calls: list[tuple[str, str, list[str]]] = []
    monkeypatch.setattr(
        debug, "debug_command", lambda cfg, pod, cmd: calls.append((cfg.socket, pod, cmd)) or 0
    )
    cfg = tmp_path / "config.yaml"
    cfg.write_text("socket: /tmp/other.sock\n")
    ap = argparse.ArgumentParser()
    cli.register(ap.add_subparsers())
    for argv in (
        ["debug", "p1", "--config", str(cfg), "-c", "ip addr --help"],
        ["debug", "--config", str(cfg), "p1"],
    ):
        args = ap.parse_args(argv)
        args.func(args)
    assert calls == [
        ("/tmp/other.sock", "p1", ["/bin/sh", "-c", "ip addr --help"]),
        ("/tmp/other.sock", "p1", []),
    ]
