"""`criv image pull REF`: pre-pull a container image through the running daemon.

The pull goes through criv's CRI ImageService on its socket, exactly as kubelet's would:
the daemon holds the state dir's lock and owns the image store, so the CLI never writes
it. CRI's PullImage is one unary call that says nothing until the image is stored, so
the display is a spinner with the elapsed time, then the result; per-layer progress
would need an RPC CRI does not have. Credentials come from the daemon's
``registries.auth_file``, as for kubelet's pulls without a pull secret.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from criv.progress import fmt_duration
from criv_agent.api.runtime.v1 import api_pb2, api_pb2_grpc

CONNECT_TIMEOUT_SECONDS = 5.0


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def pull(socket: Path, ref: str, timeout: float, console: Console | None = None) -> int:
    console = console or Console(highlight=False, soft_wrap=True)
    channel = grpc.insecure_channel(f"unix:{socket}")
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_SECONDS)
        except grpc.FutureTimeoutError:
            console.print(
                f"criv: nothing serves unix://{socket}: start criv first "
                "(systemctl start criv, or criv serve --daemon)",
                highlight=False,
            )
            return 1
        images = api_pb2_grpc.ImageServiceStub(channel)
        req = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref))
        t0 = time.monotonic()
        call = images.PullImage.future(req, timeout=timeout)
        tty = console.is_terminal and not console.is_dumb_terminal
        if tty:
            with Progress(
                SpinnerColumn(),
                TextColumn(f"pulling {ref} through criv"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            ):
                _wait(call)
        else:
            console.print(f"pulling {ref} through unix://{socket} ...", highlight=False)
            _wait(call)
        took = fmt_duration(time.monotonic() - t0)
        try:
            image_id = call.result().image_ref
        except grpc.RpcError as e:
            console.print(
                f"criv: pull of {ref} failed after {took}: {e.code().name}: {e.details()}",
                highlight=False,
                markup=False,
            )
            return 1
        status = images.ImageStatus(
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image_id)), timeout=30
        ).image
        console.print(
            f"pulled {ref} in {took}: {image_id} ({_size(status.size)})",
            highlight=False,
            markup=False,
        )
        return 0
    finally:
        channel.close()


def _wait(call: grpc.Future) -> None:
    # polling keeps Ctrl-C responsive (a blocking result() would hold it off)
    try:
        while not call.done():
            time.sleep(0.1)
    except KeyboardInterrupt:
        call.cancel()  # the daemon stops pulling; what it fetched stays for a retry
        raise
