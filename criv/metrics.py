"""criv's Prometheus metrics: every family in one place, served when ``metrics.address``
is set (docs/operations.md, Metrics).

This module imports nothing of criv, so every layer can record into it. Counters and
histograms are recorded where things happen (the CRI interceptor, the agent client, the
image puller, pod start, the start-up sweep); what is a state rather than an event (pods
running, each vsock backend's counters) is read at scrape time through a snapshot
callable the daemon supplies (:class:`SandboxCollector`).

The HTTP server is prometheus_client's own (a thread of its own), so a scrape never
waits for criv's event loop except to take the sandbox snapshot, which is bounded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from threading import Thread
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("criv.metrics")
T = TypeVar("T")

# A registry of criv's own (not the library's global one): tests read it, and nothing
# another library registers leaks into criv's endpoint. Process metrics (RSS, fds, CPU)
# of the daemon itself come along.
REGISTRY = CollectorRegistry()
# No *_created series: they double the output and say little.
disable_created_metrics()  # type: ignore[no-untyped-call]
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Latencies of CRI calls and pod starts span milliseconds (List*) to minutes (a cold VM
# boot under TCG, a big pull): buckets cover that range.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_POD_START_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120)

CRI_REQUESTS = Counter(
    "criv_cri_requests",
    "CRI calls answered, by RPC and gRPC status code",
    ["rpc", "code"],
    registry=REGISTRY,
)
CRI_LATENCY = Histogram(
    "criv_cri_request_duration_seconds",
    "Time to answer a CRI call (a streaming RPC: how long its stream was open), by RPC",
    ["rpc"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
POD_START = Histogram(
    "criv_pod_start_duration_seconds",
    "Time from RunPodSandbox's record to a READY pod, by isolation mode and start kind "
    "('template': a vm pod cloned from its template; 'cold': booted)",
    ["mode", "start"],
    buckets=_POD_START_BUCKETS,
    registry=REGISTRY,
)
POD_START_FAILURES = Counter(
    "criv_pod_start_failures",
    "RunPodSandbox bring-ups that failed (and were undone), by isolation mode",
    ["mode"],
    registry=REGISTRY,
)
TEMPLATE_HITS = Counter(
    "criv_template_hits",
    "Pod VMs started as clones of their template VM (vm.template: auto)",
    registry=REGISTRY,
)
TEMPLATE_MISSES = Counter(
    "criv_template_misses",
    "Pod VMs that wanted a template and booted cold (none yet, or it did not load)",
    registry=REGISTRY,
)
AGENT_RPC_ERRORS = Counter(
    "criv_agent_rpc_errors",
    "Agent calls that failed, by agent RPC and gRPC status code",
    ["method", "code"],
    registry=REGISTRY,
)
IMAGE_PULLS = Counter(
    "criv_image_pulls",
    "Image pulls finished, by result (ok, error)",
    ["result"],
    registry=REGISTRY,
)
IMAGE_PULL_BYTES = Counter(
    "criv_image_pull_bytes",
    "Bytes of blobs (configs, layers) downloaded from registries",
    registry=REGISTRY,
)
IMAGE_PULL_DURATION = Histogram(
    "criv_image_pull_duration_seconds",
    "Time of an image pull (shared pulls of one reference count once), by result",
    ["result"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
SWEEPS = Counter(
    "criv_startup_sweeps",
    "Start-up sweeps of leaked resources run, by sweeper (network, an isolation mode) "
    "and result (ok, error)",
    ["sweeper", "result"],
    registry=REGISTRY,
)
SWEPT = Counter(
    "criv_swept_resources",
    "Leaked resources removed by recovery's own sweep at start-up, by kind",
    ["kind"],
    registry=REGISTRY,
)


def cri_request(rpc: str, code: str, seconds: float) -> None:
    CRI_REQUESTS.labels(rpc=rpc, code=code).inc()
    CRI_LATENCY.labels(rpc=rpc).observe(seconds)


@dataclass
class PodStart:
    kind: str = "cold"  # "template" once the bring-up knows it cloned one


@contextmanager
def pod_start(mode: str) -> Iterator[PodStart]:
    """Time a pod's bring-up: observed (by the start kind the caller sets) when it
    succeeds, counted as a failure when it raises (a cancellation, criv stopping, is
    neither)."""
    t0 = time.monotonic()
    start = PodStart()
    try:
        yield start
    except Exception:
        POD_START_FAILURES.labels(mode=mode).inc()
        raise
    POD_START.labels(mode=mode, start=start.kind).observe(time.monotonic() - t0)


async def timed_pull(pull: Awaitable[T]) -> T:
    """Await an image pull, counting and timing it by result."""
    t0 = time.monotonic()
    result = "error"
    try:
        value = await pull
        result = "ok"
        return value
    finally:
        IMAGE_PULLS.labels(result=result).inc()
        IMAGE_PULL_DURATION.labels(result=result).observe(time.monotonic() - t0)


@contextmanager
def sweep(sweeper: str) -> Iterator[None]:
    result = "error"
    try:
        yield
        result = "ok"
    finally:
        SWEEPS.labels(sweeper=sweeper, result=result).inc()


# -- state read at scrape time ---------------------------------------------------------


@dataclass(frozen=True)
class PodSample:
    """One pod sandbox as the scrape sees it."""

    sandbox: str  # short id
    name: str
    namespace: str
    mode: str
    ready: bool
    # the vm pod's vsock backend status file (criv/vsock/backend.py), when it has one
    vsock: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    modes: list[str]  # every isolation mode this criv runs (a gauge of 0 is shown too)
    pods: list[PodSample]


def _int(d: dict[str, Any], key: str) -> int | None:
    v = d.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


class SandboxCollector(Collector):
    """Pods running per mode and each vsock backend's counters, from a snapshot."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on the snapshot; nothing to check at register time

    def collect(self) -> Iterable[Metric]:
        try:
            snap = self._snapshot()
        except Exception as e:
            # A scrape must not fail: the other families are still worth having.
            log.warning("metrics: no sandbox snapshot: %s", e)
            return
        running = GaugeMetricFamily(
            "criv_sandboxes_running",
            "Pod sandboxes READY, by isolation mode (mode=vm: VMs running)",
            labels=["mode"],
        )
        counts = dict.fromkeys(snap.modes, 0)
        for p in snap.pods:
            if p.ready:
                counts[p.mode] = counts.get(p.mode, 0) + 1
        for mode, n in sorted(counts.items()):
            running.add_metric([mode], n)
        yield running

        labels = ["sandbox", "pod", "namespace"]
        nbytes = CounterMetricFamily(
            "criv_vsock_backend_bytes",
            "Payload bytes through a vm pod's vsock backend, by direction (to_guest, from_guest)",
            labels=[*labels, "direction"],
        )
        resets = CounterMetricFamily(
            "criv_vsock_backend_device_resets",
            "Times a vm pod's vsock device was stopped by the guest or QEMU (reboot, "
            "driver reset), every open stream closed",
            labels=labels,
        )
        conns = CounterMetricFamily(
            "criv_vsock_backend_connections",
            "Streams a vm pod's vsock backend opened (control, data, exec, logs)",
            labels=labels,
        )
        broken = GaugeMetricFamily(
            "criv_vsock_backend_broken",
            "1 when a vm pod's vsock device stopped all processing (a bad ring)",
            labels=labels,
        )
        for p in snap.pods:
            if not p.vsock:
                continue
            who = [p.sandbox, p.name, p.namespace]
            for key, direction in (("rx_bytes", "to_guest"), ("tx_bytes", "from_guest")):
                if (b := _int(p.vsock, key)) is not None:
                    nbytes.add_metric([*who, direction], b)
            if (r := _int(p.vsock, "device_resets")) is not None:
                resets.add_metric(who, r)
            if (c := _int(p.vsock, "conns_total")) is not None:
                conns.add_metric(who, c)
            broken.add_metric(who, 1 if p.vsock.get("broken") else 0)
        yield from (nbytes, resets, conns, broken)


# -- the endpoint ----------------------------------------------------------------------


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) -> (host, port); ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{address!r}: unbalanced brackets")
        host = host[1:-1]
    return host, int(port)


class MetricsServer:
    """prometheus_client's HTTP server on ``address``, with the sandbox collector."""

    def __init__(self, address: str, snapshot: Callable[[], Snapshot]) -> None:
        self.host, self.port = parse_address(address)
        self._collector = SandboxCollector(snapshot)
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    def start(self) -> None:
        REGISTRY.register(self._collector)
        try:
            self._server, self._thread = start_http_server(
                self.port, addr=self.host, registry=REGISTRY
            )
        except BaseException:
            REGISTRY.unregister(self._collector)
            raise
        self.port = self._server.server_port  # the real one when 0 was asked
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
            REGISTRY.unregister(self._collector)
