"""``criv-agent``: serve the agent API for one pod.

    criv-agent --control unix:PATH --data unix:PATH --state-dir DIR [--crun crun]
    criv-agent --control vsock:1024 --data vsock:1025 ...   (in a VM's guest)

The control socket carries the gRPC service, the data socket the byte streams
(datastream.py). The agent makes itself a child subreaper so that container inits, once
crun has exited, become its children and their exit statuses reach it. SIGTERM/SIGINT
stop the agent but leave containers running (a later agent adopts them);
ShutdownSandbox stops everything and then the agent exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from criv_agent.runtime import Runtime

PR_SET_CHILD_SUBREAPER = 36
REAP_SWEEP = 30.0  # s between orphan sweeps (SIGCHLD reaps at once; this is the backstop)
SPARE_TIMEOUT = 30.0  # the spare holder's Python start; under TCG about a second
log = logging.getLogger("criv_agent")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="criv-agent", description=__doc__.split("\n")[1])
    p.add_argument("--control", required=True, help="unix:PATH or vsock:PORT")
    p.add_argument("--data", required=True, help="unix:PATH or vsock:PORT")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--crun", default="crun", help="crun binary (default: from PATH)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    # the VM's own agent (criv puts it on the guest's kernel command line): after
    # ShutdownSandbox it powers the VM off itself (poweroff.py); never on a host
    p.add_argument("--power-off-on-shutdown", action="store_true")
    # under TCG (criv passes it then): helpers load at fixed addresses (fixedlayout.py)
    p.add_argument("--fixed-helper-layout", action="store_true")
    return p.parse_args(argv)


def set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


async def serve(args: argparse.Namespace) -> bool:
    """Serve until ShutdownSandbox (True) or a signal (False)."""
    from criv_agent.spare import SpareHolder

    # the pod's namespace holder, started now (beside the imports) and waiting for orders
    # before the agent serves: a VM template snapshotted after that holds it (spare.py).
    # Not for an agent that restarts beside its pod (the record is there)
    spare: SpareHolder | None = None
    if not os.path.exists(os.path.join(args.state_dir, "sandbox.json")):
        spare = SpareHolder()
        await spare.start()

    import grpc

    from criv_agent import address
    from criv_agent.api.agent.v1 import agent_pb2_grpc
    from criv_agent.cpuonline import CpuOnliner
    from criv_agent.datastream import DataServer
    from criv_agent.identity import IdentityTaker
    from criv_agent.pagecache import drop_clean_pages
    from criv_agent.runtime import Runtime
    from criv_agent.service import AgentService
    from criv_agent.vsock_splice import Forwarder
    from criv_agent.warmup import warm_when_idle

    public = address.parse(args.control)
    data = address.parse(args.data)
    os.makedirs(args.state_dir, mode=0o700, exist_ok=True)
    # grpcio cannot listen on AF_VSOCK: serve on a local unix socket behind a forwarder
    control = public
    if public.scheme == "vsock":
        control = address.Address("unix", path=os.path.join(args.state_dir, "control.sock"))
    runtime = Runtime(args.state_dir, args.crun)
    await runtime.load()
    # a vsock control address means the agent runs in a VM's guest, a unix one on the host
    in_vm = public.scheme == "vsock"

    server = grpc.aio.server()
    service = AgentService(runtime, IdentityTaker(in_vm=in_vm))
    agent_pb2_grpc.add_AgentServicer_to_server(service, server)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(control.path)
    os.makedirs(os.path.dirname(control.path) or ".", exist_ok=True)
    server.add_insecure_port(str(control))
    data_server = DataServer(runtime)
    data_listener = await asyncio.start_server(data_server.handle, sock=address.listen(data))
    if spare is not None and await spare.wait_ready(SPARE_TIMEOUT):
        runtime.pod.spare = spare
    await server.start()
    os.chmod(control.path, 0o600)
    forwarder: Forwarder | None = None
    if public.scheme == "vsock":
        path = control.path

        def dial() -> socket.socket:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            return s

        listener = address.listen(public)
        forwarder = Forwarder(listener, dial)
        forwarder.start()
    # in a VM (vsock) only: vCPUs the host hot-plugs come up offline (cpuonline.py)
    onliner = CpuOnliner()
    warming: asyncio.Future[None] | None = None
    if in_vm:
        drop_clean_pages()  # before the host saves a template of this VM (pagecache.py)
        onliner.start()
        # a spare VM's agent warms its own code paths before its pod comes (warmup.py)
        warming = asyncio.ensure_future(warm_when_idle(service.first_call, control.path))
    log.info("criv-agent serving control=%s data=%s", public, data)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGCHLD, runtime.reap_orphans)
    reaping = asyncio.ensure_future(_reap_periodically(runtime))
    waiters = [asyncio.ensure_future(stop.wait()),
               asyncio.ensure_future(runtime.shutdown_requested.wait())]  # fmt: skip
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in [*waiters, reaping]:
        w.cancel()
    if warming is not None:
        warming.cancel()
    # let the ShutdownSandbox answer (or other in-flight calls) go out first
    if forwarder is not None:
        forwarder.close()
    onliner.close()
    await server.stop(grace=2)
    data_listener.close()
    await data_server.close()
    runtime.close()
    if spare is not None:
        await spare.close()
    for path in (control.path, data.path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    log.info("criv-agent stopped")
    return runtime.shutdown_requested.is_set()


async def _reap_periodically(runtime: Runtime) -> None:
    # SIGCHLD can coalesce: a slow sweep catches what a signal missed. OOM kills of a
    # container's children come as inotify events (oomwatch.py); the counters of a running
    # container no watch covers (cgroup v1, no inotify) are polled each second. An idle
    # guest wakes for neither: under TCG every wake-up is emulated work in every pod.
    loop = asyncio.get_running_loop()
    swept = loop.time()
    while True:
        if runtime.polls_ooms():
            await asyncio.sleep(1)
        else:
            runtime.oom_poll_wanted.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(runtime.oom_poll_wanted.wait(), REAP_SWEEP)
        runtime.poll_ooms()
        if loop.time() - swept >= 5:
            runtime.reap_orphans()
            swept = loop.time()


def main(argv: list[str] | None = None) -> None:
    # gRPC's fork handlers are not wanted: the agent forks only to exec (crun, holder)
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    set_subreaper()
    if args.fixed_helper_layout:
        # before the spare holder and any helper starts: they inherit it
        from criv_agent.fixedlayout import fix_helper_layout

        fix_helper_layout()
    shut_down = asyncio.run(serve(args))
    if shut_down and args.power_off_on_shutdown:
        from criv_agent.poweroff import power_off

        log.info("powering the VM off")
        logging.shutdown()
        err = power_off()
        log.error("%s; exiting (the init powers off)", err)


if __name__ == "__main__":
    main()
