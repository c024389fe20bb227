"""The spare namespace holder (criv_agent/spare.py) and how a pod's holder is started from
it or, without one, anew (Sandbox.start_holder). The holder is a fake that speaks the
real one's protocol without namespaces (no root needed); the real holder.py is run only
for what needs no privilege: its orders, a bad order, EOF."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from criv_agent import holder, podsandbox, sandbox, spare
from criv_agent.api.runtime.v1 import api_pb2
from criv_agent.errors import InvalidArgument
from criv_agent.sandbox import Sandbox
from criv_agent.spare import SpareHolder, check_hostname, order_line

POD = api_pb2.NamespaceMode.POD
REAL_HOLDER = spare.HOLDER

FAKE = textwrap.dedent("""\
    import os, signal, sys
    log = open(os.environ["FAKE_HOLDER_LOG"], "ab", buffering=0)
    if sys.argv[1:] == ["--spare"]:
        if os.environ.get("FAKE_SPARE") == "broken":
            sys.exit("no spare today")
        print("spare", flush=True)
        line = sys.stdin.buffer.readline()
        if not line:
            sys.exit(0)
        log.write(b"orders " + line)
        name = line.split(b" ", 1)[1].strip()
    else:
        log.write(("argv " + " ".join(sys.argv[1:]) + "\\n").encode())
        name = sys.argv[1].encode()
    if name == b"fail":
        sys.exit("sethostname: Invalid argument")
    print("ready", flush=True)
    os.close(1)
    signal.pause()
""")


@pytest.fixture
def fake_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """holder.py replaced by the fake; yields the file where it records its orders
    (``orders LINE``) or arguments (``argv ...``). Kills what is left at the end."""
    script = tmp_path / "criv_agent" / "holder.py"
    script.parent.mkdir()
    script.write_text(FAKE)
    log = tmp_path / "holder-calls"
    log.touch()
    monkeypatch.setattr(spare, "HOLDER", str(script))
    monkeypatch.setattr(sandbox, "HOLDER", str(script))
    monkeypatch.setenv("FAKE_HOLDER_LOG", str(log))
    yield log
    for pid in _processes_running(str(script)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def own_ipc(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake does not unshare: let it pass for a holder with an IPC namespace of its
    own."""
    monkeypatch.setattr(sandbox, "_own_ipc_ns", lambda: -1)


def _processes_running(path: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if path.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
    return out


def _sandbox(tmp_path: Path, hostname: str = "podhost", share_pid: bool = True) -> Sandbox:
    cfg = api_pb2.PodSandboxConfig(hostname=hostname)
    opts = cfg.linux.security_context.namespace_options
    opts.ipc = POD
    opts.pid = POD if share_pid else api_pb2.NamespaceMode.CONTAINER
    d = tmp_path / "sb"
    d.mkdir(parents=True, exist_ok=True)
    return Sandbox("sb1", str(d), cfg)


async def _stop(sb: Sandbox) -> None:
    """Stop the holder and let the loop see it go (its pipes, before the loop closes)."""
    pid = sb.holder_pid
    sb.stop_holder()
    while os.path.exists(f"/proc/{pid}"):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)


async def _ready_spare() -> SpareHolder:
    s = SpareHolder()
    await s.start()
    assert await s.wait_ready(10)
    return s


# --- the spare's orders and the hostname -------------------------------------------------


def test_order_lines_round_trip() -> None:
    assert order_line("web-0.svc", True) == b"pid web-0.svc\n"
    assert order_line("", False) == b"- \n"
    assert holder.parse_order(order_line("web-0.svc", True)) == (b"web-0.svc", True)
    assert holder.parse_order(order_line("", False)) == (b"", False)
    assert holder.parse_order(order_line("a" * 64, False)) == (b"a" * 64, False)


@pytest.mark.parametrize(
    "line",
    [b"pid web", b"pid web\nx\n", b"web\n", b"all web\n", b"pid a\x00b\n", b"- a b\n",
     b"- " + b"a" * 65 + b"\n", b"pid \xc3\xa9\n"],
)  # fmt: skip
def test_the_holder_refuses_bad_orders(line: bytes) -> None:
    with pytest.raises(ValueError):
        holder.parse_order(line)


def test_hostnames_as_the_host_checks_them() -> None:
    for ok in ["", "podhost", "web-0", "a.b-c.d", "A1", "a" * 63, ".".join(["a" * 31] * 2)]:
        assert check_hostname(ok) == ok
    for bad in ["a\nb", "a\n", "a\x00b", "-x", "--spare", "a b", "a..b", "x-", "é", "a" * 64,
                ".".join(["a" * 32] * 2)]:  # fmt: skip
        with pytest.raises(InvalidArgument):
            check_hostname(bad)


def test_the_real_holder_waits_for_orders_and_exits_at_eof() -> None:
    r = subprocess.run([sys.executable, "-S", "-E", REAL_HOLDER, "--spare"],
                       input=b"", capture_output=True, timeout=30)  # fmt: skip
    assert (r.returncode, r.stdout, r.stderr) == (0, b"spare\n", b"")


def test_the_real_holder_refuses_an_order_that_is_not_one_line() -> None:
    order = b"pid " + b"a" * 200 + b"\n"
    r = subprocess.run([sys.executable, "-S", "-E", REAL_HOLDER, "--spare"],
                       input=order, capture_output=True, timeout=30)  # fmt: skip
    assert (r.returncode, r.stdout, r.stderr) == (1, b"spare\n", b"orders: not one line\n")


# --- the pod's holder from the spare, or anew ---------------------------------------------


async def test_the_pod_takes_the_spare(tmp_path: Path, fake_holder: Path, own_ipc: None) -> None:
    s = await _ready_spare()
    proc = s._proc
    assert proc is not None
    sb = _sandbox(tmp_path)
    await sb.start_holder(s)
    assert sb.holder_pid == proc.pid
    assert sb.holder_alive()
    assert fake_holder.read_bytes() == b"orders pid podhost\n"
    assert s.take() is None  # used once
    await sb.start_holder(s)  # alive: nothing to do
    assert fake_holder.read_bytes() == b"orders pid podhost\n"
    await _stop(sb)


async def test_without_a_spare_the_holder_starts_anew(
    tmp_path: Path, fake_holder: Path, own_ipc: None
) -> None:
    sb = _sandbox(tmp_path, share_pid=False)
    await sb.start_holder(None)
    assert sb.holder_alive()
    assert fake_holder.read_bytes() == b"argv podhost\n"
    await _stop(sb)
    sb2 = _sandbox(tmp_path / "2")
    await sb2.start_holder(SpareHolder())  # a spare that never started: the same
    assert fake_holder.read_bytes().splitlines()[1] == b"argv podhost --pid"
    await _stop(sb2)


@pytest.mark.parametrize("reaped", [True, False])
async def test_a_dead_spare_is_passed_over(
    tmp_path: Path, fake_holder: Path, own_ipc: None, reaped: bool
) -> None:
    s = await _ready_spare()
    proc = s._proc
    assert proc is not None
    proc.kill()
    if reaped:
        await proc.wait()  # known dead; else found dead when given its orders
    sb = _sandbox(tmp_path)
    await sb.start_holder(s)
    assert sb.holder_pid not in (0, proc.pid)
    assert sb.holder_alive()
    assert fake_holder.read_bytes() == b"argv podhost --pid\n"
    assert proc.returncode is not None
    await _stop(sb)


async def test_a_spare_that_does_not_start_is_not_kept(
    fake_holder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SPARE", "broken")
    s = SpareHolder()
    await s.start()
    proc = s._proc
    assert not await s.wait_ready(10)
    assert s.take() is None
    assert proc is not None and proc.returncode is not None


async def test_a_holder_failing_its_orders_says_why(
    tmp_path: Path, fake_holder: Path, own_ipc: None
) -> None:
    s = await _ready_spare()
    proc = s._proc
    assert proc is not None
    sb = _sandbox(tmp_path, hostname="fail")
    with pytest.raises(OSError, match="namespace holder failed: sethostname: Invalid argument"):
        await sb.start_holder(s)
    assert proc.returncode == 1
    assert sb.holder_pid == 0
    assert b"sethostname" in Path(sb.path("holder.log")).read_bytes()


async def test_a_bad_hostname_reaches_no_holder(
    tmp_path: Path, fake_holder: Path, own_ipc: None
) -> None:
    s = await _ready_spare()
    proc = s._proc
    sb = _sandbox(tmp_path, hostname="evil\npid x")
    with pytest.raises(InvalidArgument):
        await sb.start_holder(s)
    assert fake_holder.read_bytes() == b""
    assert proc is not None and proc.returncode is None
    await s.close()  # still the spare, untouched
    assert proc.returncode == -signal.SIGKILL
    # SetupSandbox refuses it before the pod's files are written
    pods = podsandbox.PodSandbox(str(tmp_path / "state"))
    with pytest.raises(InvalidArgument):
        await pods.setup("sb1", sb.config, str(tmp_path / "pod"), ["10.0.0.1"])
    assert not (tmp_path / "pod").exists()


async def test_a_spare_is_never_taken_for_the_pods_holder(
    tmp_path: Path, fake_holder: Path
) -> None:
    """A recorded holder pid that now names a spare (the holder died, the pid came back):
    the spare shares the agent's namespaces, so it is no holder."""
    s = await _ready_spare()
    assert s._proc is not None
    sb = _sandbox(tmp_path)
    sb.holder_pid = s._proc.pid
    assert not sb.holder_alive()
    await s.close()


async def test_a_pod_without_a_holder_lets_the_spare_go(tmp_path: Path, fake_holder: Path) -> None:
    pods = podsandbox.PodSandbox(str(tmp_path / "state"))
    os.makedirs(tmp_path / "state")
    pods.spare = await _ready_spare()
    proc = pods.spare._proc
    cfg = api_pb2.PodSandboxConfig(hostname="podhost")
    opts = cfg.linux.security_context.namespace_options
    opts.network = opts.ipc = api_pb2.NamespaceMode.NODE  # host network and IPC
    opts.pid = api_pb2.NamespaceMode.CONTAINER
    await pods.setup("sb1", cfg, str(tmp_path / "pod"), [])
    assert proc is not None and proc.returncode is not None
    assert fake_holder.read_bytes() == b""


async def test_a_spare_that_cannot_be_started_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spare, "holder_argv", lambda *a: ["/nonexistent/python", *a])
    s = SpareHolder()
    await s.start()  # logged, not raised: the agent serves without one
    assert not await s.wait_ready(1)
    assert s.take() is None
