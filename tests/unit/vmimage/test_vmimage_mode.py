"""vm-image isolation without a VM: the in-process data endpoint (LOG from the console
in CRI format, attach refused, port-forward dialled by the handler), the console's host
key pin, and the agent's one-container rule and seed from the pod's CNI result."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from criv.agent.datastream import open_data_stream
from criv.agent.hostdata import AttachSession, HostDataServer
from criv.agent.logstream import StreamRefused, open_stream
from criv.errors import FailedPrecondition, InvalidArgument, Unavailable
from criv.sandbox.records import PodRecord
from criv.sandbox.states import PodState
from criv.sandbox.vmimage import machine
from criv.sandbox.vmimage.agent import VmImageAgent
from criv.sandbox.vmimage.boxstate import BoxState
from criv.sandbox.vmimage.console import ConsoleLog
from criv.sandbox.vmimage.container import VmContainer
from criv.sandbox.vmimage.provision import PodIdentity, pod_ip, seed_config
from criv.sandbox.vmimage.sshready import DEFAULT_WAIT
from criv.vmimage.sshkeys import generate_host_key
from criv_agent.api.agent.v1 import agent_pb2
from criv_agent.datastream import FollowedLog

pytestmark = pytest.mark.timeout(30)

CNI = {
    "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x", "mac": "aa:bb:cc:dd:ee:ff"}],
    "ips": [{"address": "10.88.0.7/16", "gateway": "10.88.0.1", "interface": 0}],
    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/24", "gw": "10.88.0.254"}],
}


class Handler:
    def __init__(self, src: FollowedLog | None) -> None:
        self.src = src
        self.dialled: list[int] = []

    def log_source(self, container_id: str) -> FollowedLog | None:
        return self.src if container_id == "c1" else None

    def has_exec(self, exec_id: str) -> bool:
        return False

    async def run_exec(
        self, exec_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        raise AssertionError("no exec")

    async def dial(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.dialled.append(port)
        raise ConnectionRefusedError("nothing listens")

    async def attach(self, container_id: str) -> AttachSession:
        raise FailedPrecondition(f"container {container_id} is exited, not running")


async def test_console_is_served_as_the_cri_log(tmp_path: Path) -> None:
    key = generate_host_key()
    console = tmp_path / "console.log"
    console.write_bytes(b"SeaBIOS\r\nbooting\n" + key.public_line.encode() + b"\nhalf")
    log = ConsoleLog(console, tmp_path / "serial.log")
    log.start()
    server = HostDataServer(tmp_path / "d.sock", Handler(log))
    await server.start()
    try:
        await asyncio.wait_for(log.pinned.wait(), 5)
        assert log.pin == key.pin
        req = agent_pb2.StreamOpen(kind=agent_pb2.StreamOpen.LOG, container_id="c1")
        reader, writer = await open_stream(str(tmp_path / "d.sock"), req)
        with console.open("ab") as f:
            f.write(b" line\n")
        await asyncio.sleep(0.5)
        await log.finish()  # the VM stopped: the stream ends after the rest
        got = (await asyncio.wait_for(reader.read(), 5)).decode()
        writer.close()
        lines = got.splitlines()
        assert [ln.split(" ", 3)[1:] for ln in lines] == [
            ["stdout", "F", "SeaBIOS"],
            ["stdout", "F", "booting"],
            ["stdout", "F", key.public_line],
            ["stdout", "F", "half line"],
        ]
        assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z ", ln) for ln in lines)
        # unknown container, attach and a refused port-forward are refused with a reason
        with pytest.raises(StreamRefused, match="not found"):
            bad = agent_pb2.StreamOpen(kind=agent_pb2.StreamOpen.LOG, container_id="c2")
            await open_stream(str(tmp_path / "d.sock"), bad)
        with pytest.raises(StreamRefused, match="c1 is exited, not running"):
            await open_data_stream(str(tmp_path / "d.sock"), "stdio", container_id="c1")
        with pytest.raises(StreamRefused, match="port 2222"):
            await open_data_stream(str(tmp_path / "d.sock"), "port_forward", port=2222)
    finally:
        await server.close()
        await log.finish()
    assert not (tmp_path / "d.sock").exists()


def _pod() -> PodRecord:
    return PodRecord(
        id="a" * 64, name="web", namespace="default", uid="u", attempt=0,
        state=PodState.READY, created_at_ns=1, handler="vm-image", isolation="vm-image",
        config=b"", netns="/run/netns/x", cni_result=CNI,
    )  # fmt: skip


async def test_one_container_per_pod_and_the_seed(tmp_path: Path) -> None:
    agent = VmImageAgent(_pod(), tmp_path / "state", tmp_path / "root", None)  # type: ignore[arg-type]
    disk = machine.BaseDisk(tmp_path / "base.qcow2", "qcow2")
    agent.reserve("c1", disk)
    agent.reserve("c1b", disk)  # nothing created yet: the last reservation counts
    cfg = seed_config(_pod(), agent.identity, "c" * 64, "ssh-ed25519 AAAA k", "root")
    assert cfg.addresses == ("10.88.0.7/16",) and cfg.gateway == "10.88.0.1"
    assert [(r.to, r.via) for r in cfg.routes] == [("192.168.0.0/24", "10.88.0.254")]
    assert cfg.hostname == "web" and cfg.instance_id == "criv-" + "c" * 32
    assert pod_ip(_pod()) == "10.88.0.7"
    assert agent.identity == PodIdentity("web")

    agent.keeper.box = VmContainer(
        cid="c1", base=disk, dir=tmp_path, overlay=tmp_path / "o", seed=tmp_path / "s",
        uefi_vars=tmp_path / "v", user="root", created_at_ns=1,
    )  # fmt: skip
    with pytest.raises(InvalidArgument, match="one container"):
        agent.reserve("c2", disk)
    assert [i.container_id for i in await agent.list_containers()] == ["c1"]
    info = await agent.stop_container("c1", 0)  # never started: no VM to stop
    assert (info.state.value, info.exit_code) == ("exited", 137)
    agent.reserve("c2", disk)  # the first one exited: kubelet's next attempt may come


async def test_exec_without_a_host_key_is_unavailable_not_a_hang(tmp_path: Path) -> None:
    agent = VmImageAgent(_pod(), tmp_path / "state", tmp_path / "root", None)  # type: ignore[arg-type]
    (tmp_path / "console.log").write_bytes(b"SeaBIOS\nno key here\n")
    console = ConsoleLog(tmp_path / "console.log", tmp_path / "serial.log")
    agent.keeper.box = VmContainer(
        cid="c1", base=machine.BaseDisk(tmp_path / "b", "qcow2"), dir=tmp_path,
        overlay=tmp_path / "o", seed=tmp_path / "s", uefi_vars=tmp_path / "v", user="root",
        created_at_ns=1, state=BoxState.RUNNING, console=console,
        started_at_ns=time.time_ns() - int((DEFAULT_WAIT - 0.3) * 1e9),
    )  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="no SSH host key") as e:
        await agent.exec_sync("c1", ["true"], 0)
    assert time.monotonic() - t0 < 5
    assert "no key here" in str(e.value)  # the console tail says why
    await console.finish()


def test_how_a_vm_ended(tmp_path: Path) -> None:
    def box() -> VmContainer:
        return VmContainer(
            cid="c1", base=machine.BaseDisk(tmp_path / "b", "qcow2"), dir=tmp_path,
            overlay=tmp_path / "o", seed=tmp_path / "s", uefi_vars=tmp_path / "v", user="root",
            created_at_ns=1, state=BoxState.RUNNING,
        )  # fmt: skip

    firmware = "Booting from Hard Disk...\nBoot failed: not a bootable disk\nNo bootable device."
    b = box()
    b.exited("shutdown", firmware, booted=False)  # the reset ended the domain
    assert (b.exit_code, b.reason) == (255, "BootFailed") and firmware in b.message
    b = box()
    b.exited("shutdown", "criv-test-disk: ready\n" + firmware, booted=True)  # the guest's words
    assert (b.exit_code, b.reason, b.message) == (0, "Completed", "the VM powered off")
    b = box()
    b.exited("reset", "Booting from Hard Disk...", booted=False)  # a boot loader's triple fault
    assert (b.exit_code, b.reason) == (255, "BootFailed") and "Booting from" in b.message
    b = box()
    b.exited("reset", "login:", booted=True)
    assert (b.exit_code, b.reason) == (0, "Rebooted")
    b = box()
    b.exited("crashed", "kernel panic", booted=False)
    assert (b.exit_code, b.reason) == (255, "VMExited")
    assert b.message.endswith("before its SSH host key appeared; console tail:\nkernel panic")
    b = box()
    b.state = BoxState.STOPPING
    b.exited("destroyed", "", booted=True)
    assert (b.exit_code, b.reason) == (137, "Killed")
