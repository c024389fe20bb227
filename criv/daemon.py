"""The criv daemon: one grpc.aio server on a unix socket serving CRI v1.

Start-up takes two exclusive locks (state dir and socket), so a second criv on the same
socket or state dir refuses to start instead of stealing either. The streaming server
(exec/attach/port-forward URLs) starts before CRI is served and stops after it, so no URL
is handed out that nothing serves. SIGTERM/SIGINT stop accepting calls, let in-flight
calls finish (bounded grace), end live streaming sessions, then remove the socket.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import tempfile
from collections.abc import Callable
from contextlib import ExitStack, suppress
from pathlib import Path

import grpc

from criv import __version__
from criv.config import Config
from criv.cri.admin import images_handler
from criv.cri.image_service import ImageService
from criv.cri.runtime_service import RuntimeService
from criv.cri.wire import cri_server
from criv.errors import ConfigError, FailedPrecondition
from criv.image.manager import ImageManager
from criv.metrics import MetricsServer
from criv.ops.metricsource import sandbox_snapshot
from criv.sandbox.manager import SandboxManager
from criv.sandbox.streams import SandboxStreamLink
from criv.sdnotify import Notifier
from criv.state.runtime_state import RuntimeState
from criv.streaming.agent_backend import AgentStreamingBackend
from criv.streaming.server import StreamingServer
from criv.streaming.service import StreamingService
from criv_agent.api.runtime.v1 import api_pb2_grpc

log = logging.getLogger("criv.daemon")

SHUTDOWN_GRACE_SECONDS = 30.0


def _lock(path: Path, what: str, stack: ExitStack) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = ""
        with suppress(OSError):
            holder = f" (pid {path.read_text().strip()})"
        raise FailedPrecondition(
            f"another criv is already running on this {what}{holder}: {path} is locked"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    stack.callback(os.close, fd)


def listen_unix(server: grpc.aio.Server, sock: Path) -> None:
    """Bind ``sock`` with mode 0660 from its first moment: gRPC binds with the umask's
    mode, so the socket is bound in a fresh 0700 directory beside it (nobody else can
    reach it there), chmod'ed, then renamed into place."""
    private = Path(tempfile.mkdtemp(prefix=".criv-", dir=sock.parent))
    try:
        tmp = private / "s"
        server.add_insecure_port(f"unix:{tmp}")
        os.chmod(tmp, 0o660)
        os.replace(tmp, sock)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(private / "s")
        os.rmdir(private)


class Daemon:
    def __init__(self, config: Config, on_ready: Callable[[], None] | None = None) -> None:
        self.config = config
        self.socket_path = config.socket_path
        self._stop = asyncio.Event()
        # `criv serve --daemon` tells its waiting parent; systemd hears READY=1 either way
        self._on_ready = on_ready
        self._systemd = Notifier.from_environ()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        cfg = self.config
        with ExitStack() as stack:
            state_dir = Path(cfg.state_dir)
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
            Path(cfg.run_dir).mkdir(parents=True, exist_ok=True, mode=0o711)
            _lock(state_dir / "criv.lock", f"state dir {state_dir}", stack)
            sock = self.socket_path
            _lock(sock.with_name(sock.name + ".lock"), f"socket {sock}", stack)

            runtime_state = RuntimeState(state_dir)
            images = ImageManager(cfg)
            await images.start()
            sandboxes = SandboxManager.create(cfg, images, runtime_state)
            streaming = StreamingServer(
                cfg.streaming, AgentStreamingBackend(SandboxStreamLink(sandboxes.ctx))
            )
            metrics: MetricsServer | None = None
            try:
                await sandboxes.start()
                await streaming.start()
                if cfg.metrics.address:
                    loop = asyncio.get_running_loop()
                    server = MetricsServer(cfg.metrics.address, sandbox_snapshot(sandboxes, loop))
                    try:
                        await asyncio.to_thread(server.start)
                    except OSError as e:  # the port is taken, or the address is not ours
                        raise ConfigError("metrics.address", f"cannot listen there: {e}") from e
                    metrics = server
                await self._serve(runtime_state, images, sandboxes, StreamingService(streaming))
            finally:
                if metrics is not None:
                    await asyncio.to_thread(metrics.stop)
                # After CRI stopped (no new URLs) and before the agents' connections go:
                # live sessions end, their agent streams close, exec'd processes are killed.
                await streaming.stop()
                await sandboxes.close()
                await images.close()

    async def _serve(
        self,
        runtime_state: RuntimeState,
        images: ImageManager,
        sandboxes: SandboxManager,
        streaming: StreamingService,
    ) -> None:
        sock = self.socket_path
        sock.parent.mkdir(parents=True, exist_ok=True)
        if sock.exists() or sock.is_symlink():
            sock.unlink()  # stale: we hold the socket lock, so nobody serves it
        server = cri_server()
        # mypy sees the generated servicer's methods as abstract; fill_unimplemented
        # gives every RPC criv lacks a body at import time.
        runtime = RuntimeService(  # type: ignore[abstract]
            self.config, runtime_state, sandboxes, streaming
        )
        api_pb2_grpc.add_RuntimeServiceServicer_to_server(runtime, server)
        api_pb2_grpc.add_ImageServiceServicer_to_server(ImageService(images), server)
        server.add_generic_rpc_handlers((images_handler(images, sandboxes),))  # criv's CLI
        listen_unix(server, sock)
        await server.start()
        log.info("criv %s serving CRI v1 on unix://%s", __version__, sock)
        # ready = pods re-adopted and the socket served, so kubelet (ordered after) finds both
        self._systemd.notify("READY=1", f"STATUS=serving CRI v1 on unix://{sock}")
        if self._on_ready is not None:
            self._on_ready()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._stop.wait()
            log.info("shutting down: letting in-flight calls finish")
            self._systemd.notify("STOPPING=1")
            sandboxes.end_event_streams()  # kubelet's GetContainerEvents never ends itself
            await server.stop(SHUTDOWN_GRACE_SECONDS)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            with suppress(FileNotFoundError):
                sock.unlink()
            log.info("criv stopped")
