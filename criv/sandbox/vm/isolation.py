"""``vm`` isolation: each pod is a libvirt/QEMU VM whose guest runs criv-agent.

Boot (docs/vm.md): guest image (or ``vm.kernel``/``vm.initrd``), KVM or TCG from the probe,
the pod's shared directory (9p; QEMU runs in the host mount namespace, ``namespaces = []``
in qemu.conf, so bind mounts criv adds there later reach the guest), a tap for the pod's CNI eth0
(:mod:`criv.network.tap`), the userspace vsock backend (its own session: it outlives criv,
like the domain), then the transient domain. The agent listens on guest vsock ports 1024
(gRPC, behind the guest's splice forwarder) and 1025 (data streams); the backend exposes
them as ``<run>/vs.1024`` and ``<run>/vs.1025``, so criv dials unix sockets as in host mode.

Everything a pod's VM owns is named from the sandbox id (domain, tap, backend socket
paths), so teardown and the start-up sweep work without any state saved mid-boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from criv.agent.client import AgentClient
from criv.agent.types import GuestInterface, GuestNetwork, GuestRoute
from criv.commands import run_command
from criv.config import Config
from criv.errors import AgentError, CrivError, FailedPrecondition, Internal, InvalidArgument
from criv.guestimage import DEFAULT_CACHE_ROOT, cached_image
from criv.hypervisor.driver import Hypervisor
from criv.hypervisor.hostsetup import qemu_conf_issues
from criv.hypervisor.kvm import AccelChoice, choose_accel
from criv.hypervisor.sizing import PodResources, vm_size
from criv.hypervisor.spec import PodVm, domain_name, pod_domain
from criv.mounts import is_mounted
from criv.network.tap import (
    attach_tap,
    create_tap,
    delete_tap,
    guest_addressing,
    host_taps,
    pod_link,
    tap_name,
)
from criv.sandbox.host import process_start_time
from criv.sandbox.isolation import PodPaths
from criv.sandbox.records import PodRecord
from criv.sandbox.rootfs import unmount_all_under
from criv.sandbox.states import PodState
from criv.state.runtime_state import RuntimeState
from criv.vsock.process import BackendError, VsockBackendProcess

log = logging.getLogger("criv.sandbox.vm")

# Where images/init mounts the 9p tag "criv" in the guest, and the agent's guest-local state.
GUEST_SHARED = "/run/criv/shared"
GUEST_AGENT_STATE = "/run/criv/agent"
CONTROL_PORT = 1024
DATA_PORT = 1025
# Boot to the agent's first answer: ~2.5 s under TCG when idle; far more on 2 busy cores.
VM_CONNECT_TIMEOUT = 90.0
VM_EXIT_TIMEOUT = 10.0
BACKEND_READY_TIMEOUT = 10.0
VSOCK_DESCRIPTION = "userspace vhost-user-vsock backend (python -m criv.vsock), one per VM"


def _cid(sandbox_id: str) -> int:
    # The backend is per VM, so CIDs need not be unique host-wide; derived for debugging.
    return 3 + int(sandbox_id[:7], 16)


def _console_tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


def _qemu_pid(name: str) -> int:
    """The domain's QEMU pid from libvirt's pid file, checked against its command line."""
    try:
        pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return 0
    return pid if f"guest={name}".encode() in cmd and process_start_time(pid) else 0


class VmIsolation:
    mode = "vm"
    # a VM that stops takes its containers with it
    containers_die_with_agent = True

    def __init__(self, config: Config, runtime_state: RuntimeState) -> None:
        self._config = config
        self._state = runtime_state
        self._owner = str(Path(config.state_dir).resolve())
        self._run_root = Path(config.run_dir) / "p"
        self._hv: Hypervisor | None = None
        self._hv_lock = asyncio.Lock()
        self._accel: AccelChoice | None = None
        self._accel_lock = asyncio.Lock()  # pods booting together probe once
        self._backends: dict[str, VsockBackendProcess] = {}
        self._stops: dict[str, str] = {}  # domain name -> why libvirt saw it stop
        self._publish()

    # -- host facts ------------------------------------------------------------------

    def _publish(self) -> None:
        accel = self._accel
        self._state.publish(
            "vm",
            {
                "accel": accel.accel if accel else "not probed yet (at the first vm pod)",
                "accelReason": accel.reason if accel else "",
                "vsock": VSOCK_DESCRIPTION,
                "libvirtUri": self._config.vm.libvirt_uri,
                "machine": self._config.vm.machine,
            },
        )

    async def _hypervisor(self) -> Hypervisor:
        async with self._hv_lock:
            if self._hv is None:
                hv = Hypervisor(self._config.vm.libvirt_uri)
                await hv.connect()
                hv.add_stop_listener(self._on_stop)
                self._hv = hv
            return self._hv

    def _on_stop(self, name: str, reason: str) -> None:
        self._stops[name] = reason
        if reason != "shutdown":
            log.warning("domain %s stopped: %s", name, reason)

    def _image(self) -> tuple[Path, Path]:
        vm = self._config.vm
        if vm.kernel:
            return Path(vm.kernel), Path(vm.initrd)
        cache = Path(vm.guest_image_cache) if vm.guest_image_cache else None
        cache = cache or Path(self._config.state_dir) / "cache" / "guest-image"
        img = cached_image(cache) or (
            cached_image(DEFAULT_CACHE_ROOT) if cache != DEFAULT_CACHE_ROOT else None
        )
        if img is None:
            raise FailedPrecondition(
                f"no guest image for this criv in {cache}: run `criv image build` "
                "(or set vm.kernel and vm.initrd)"
            )
        return img.kernel, img.initrd

    async def _choose_accel(self, kernel: Path, initrd: Path) -> AccelChoice:
        async with self._accel_lock:
            if self._accel is None:
                probe = Path(self._config.run_dir) / "kvm-probe.json"
                self._accel = await asyncio.to_thread(
                    choose_accel, self._config.vm.accel, probe, kernel, initrd
                )
                self._publish()
            return self._accel

    # -- boot ------------------------------------------------------------------------

    def _sockets(self, paths: PodPaths) -> tuple[Path, Path]:
        """(vhost-user socket QEMU connects to, hybrid socket; ports are ``<hybrid>.P``)."""
        return paths.run / "v.sock", paths.run / "vs"

    def console_log(self, paths: PodPaths) -> Path:
        return paths.state / "console.log"

    async def boot(self, pod: PodRecord, paths: PodPaths) -> dict[str, Any]:
        if pod.host_network:
            raise InvalidArgument("a vm pod cannot use the host network; use the host handler")
        if self._config.vm.vsock == "kernel":
            raise FailedPrecondition(
                "vm.vsock=kernel is not supported yet; use auto or backend (userspace backend)"
            )
        if issues := await asyncio.to_thread(qemu_conf_issues):
            raise FailedPrecondition(
                "libvirt's qemu.conf is not set up for vm pods (" + "; ".join(issues)
                + "): run `criv doctor --fix`, then restart libvirtd"
            )  # fmt: skip
        kernel, initrd = await asyncio.to_thread(self._image)
        accel = await self._choose_accel(kernel, initrd)
        hv = await self._hypervisor()
        name = domain_name(pod.id)
        try:
            return await self._boot(pod, paths, hv, name, kernel, initrd, accel)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.destroy(pod, paths))
            raise

    async def _boot(
        self,
        pod: PodRecord,
        paths: PodPaths,
        hv: Hypervisor,
        name: str,
        kernel: Path,
        initrd: Path,
        accel: AccelChoice,
    ) -> dict[str, Any]:
        vhost, hybrid = self._sockets(paths)
        console = self.console_log(paths)

        def prepare() -> None:
            for d in (paths.run, paths.state, paths.shared):
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
            for s in paths.run.iterdir():
                if s.is_socket():
                    s.unlink()

        await asyncio.to_thread(prepare)
        tap, mac, mtu = "", "", 0
        if pod.netns:
            link = await pod_link(Path(pod.netns))
            tap, mac, mtu = tap_name(pod.id), link.mac, link.mtu
            await create_tap(tap, self._owner)
        cid = _cid(pod.id)
        backend = VsockBackendProcess(
            str(vhost),
            str(hybrid),
            cid,
            listen_ports=[CONTROL_PORT, DATA_PORT],
            status_file=str(paths.run / "vsock.json"),
            log_path=str(paths.state / "vsock.log"),
        )
        try:
            await asyncio.to_thread(backend.start)
            self._backends[pod.id] = backend
            await asyncio.to_thread(backend.wait_ready, BACKEND_READY_TIMEOUT)
        except (BackendError, OSError) as e:
            raise Internal(f"pod {pod.id[:12]}: vsock backend did not start: {e}") from e
        assert backend.pid is not None
        size = vm_size(
            PodResources(**pod.resources),
            self._config.vm.vcpus,
            self._config.vm.memory_mib,
            os.cpu_count() or 1,
        )
        vm = PodVm(
            sandbox_id=pod.id,
            kernel=kernel,
            initrd=initrd,
            size=size,
            accel=accel.accel,
            console_log=console,
            shared_dir=paths.shared,
            tap=tap,
            mac=mac,
            mtu=mtu,
            vsock_socket=vhost,
            machine=self._config.vm.machine,
            agent_args=[
                "--control", f"vsock:{CONTROL_PORT}", "--data", f"vsock:{DATA_PORT}",
                "--state-dir", GUEST_AGENT_STATE, "--crun", "crun",
            ],
            owner=self._owner,
        )  # fmt: skip
        self._stops.pop(name, None)
        info = await hv.create(pod_domain(vm))
        if tap:
            # QEMU holds the tap open now; it keeps working in the pod netns
            await attach_tap(Path(pod.netns), tap)
        return {
            "domain": name,
            "uuid": info.uuid,
            "accel": accel.accel,
            "accel_reason": accel.reason,
            "console_log": str(console),
            "vcpus": size.vcpus,
            "memory_mib": size.memory_mib,
            "vsock": "backend",
            "cid": cid,
            "backend_pid": backend.pid,
            "backend_start_time": process_start_time(backend.pid) or 0,
            "tap": tap,
            "mac": mac,
            "mtu": mtu,
        }

    # -- agent -----------------------------------------------------------------------

    def alive(self, pod: PodRecord) -> bool:
        name = domain_name(pod.id)
        if name in self._stops or not _qemu_pid(name):
            return False
        return self._backend_pid(pod) > 0

    def _backend_pid(self, pod: PodRecord) -> int:
        b = self._backends.get(pod.id)
        if b is not None:
            return (b.pid or 0) if b.alive() else 0
        pid = int(pod.isolation_state.get("backend_pid", 0))
        start = pod.isolation_state.get("backend_start_time")
        if pid > 0 and start and process_start_time(pid) == start:
            return pid
        return 0

    async def connect(self, pod: PodRecord, paths: PodPaths, timeout: float) -> AgentClient:
        _, hybrid = self._sockets(paths)
        control = Path(f"{hybrid}.{CONTROL_PORT}")
        client = AgentClient(f"unix:{control}")
        timeout = max(timeout, VM_CONNECT_TIMEOUT) if pod.state is PodState.PENDING else timeout
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.alive(pod):
                await client.close()
                why = self._stops.get(domain_name(pod.id), "gone")
                tail = _console_tail(self.console_log(paths))
                raise AgentError(
                    f"VM of pod {pod.id[:12]} stopped ({why}); console log "
                    f"{self.console_log(paths)}:\n{tail}"
                )
            if control.exists():
                try:
                    await client.health(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
                    return client
                except CrivError as e:
                    last = e
            await asyncio.sleep(0.1)
        await client.close()
        raise AgentError(
            f"agent of pod {pod.id[:12]} did not answer in {timeout:.0f}s ({last}); "
            f"console log {self.console_log(paths)}"
        )

    def guest_network(self, pod: PodRecord) -> GuestNetwork | None:
        mac = str(pod.isolation_state.get("mac", ""))
        if not mac:
            return None
        addresses, routes = guest_addressing(pod.cni_result)
        return GuestNetwork(
            interfaces=(
                GuestInterface(mac, tuple(addresses), int(pod.isolation_state.get("mtu", 0))),
            ),
            routes=tuple(GuestRoute(d, g) for d, g in routes),
        )

    # -- stop / destroy ---------------------------------------------------------------

    async def stop(
        self, pod: PodRecord, paths: PodPaths, client: AgentClient | None, timeout: int
    ) -> None:
        name = domain_name(pod.id)
        if client is not None and self.alive(pod):
            try:
                # the agent stops the containers and exits; the guest init then powers off
                await client.shutdown(timeout)
            except CrivError as e:
                log.warning("pod %s: agent shutdown failed: %s", pod.id[:12], e)
        with contextlib.suppress(CrivError):
            hv = await self._hypervisor()
            if not await hv.wait_stopped(name, VM_EXIT_TIMEOUT):
                log.warning("pod %s: VM still up after the agent left: destroying", pod.id[:12])
        await self.destroy(pod, paths)

    async def destroy(self, pod: PodRecord, paths: PodPaths) -> None:
        name = domain_name(pod.id)
        hv = await self._hypervisor()
        await hv.destroy(name)
        await hv.wait_stopped(name, VM_EXIT_TIMEOUT)
        await self._stop_backend(pod, paths)
        await delete_tap(tap_name(pod.id))  # only if it never reached the pod netns
        await unmount_all_under(paths.shared)

        def clean() -> None:
            if paths.run.is_dir():
                for s in paths.run.iterdir():
                    if s.is_socket() or s.suffix == ".json":
                        s.unlink()
            with contextlib.suppress(OSError):
                paths.run.rmdir()

        await asyncio.to_thread(clean)
        self._stops.pop(name, None)  # nothing to remember once it is gone for good

    async def _stop_backend(self, pod: PodRecord, paths: PodPaths) -> None:
        b = self._backends.pop(pod.id, None)
        if b is not None:
            await asyncio.to_thread(b.stop)
        vhost, _ = self._sockets(paths)
        # after a criv restart (or a crash mid-boot): find it by its socket path
        for pid in await asyncio.to_thread(_backend_pids, f"{vhost}"):
            _kill_group(pid)

    # -- containers' files --------------------------------------------------------------

    async def share(self, paths: PodPaths, cid: str, host_path: Path, name: str) -> str:
        """Bind ``host_path`` under the pod's shared dir; the guest path it has there."""
        target = paths.shared / "c" / cid / name

        def prepare() -> None:
            if not host_path.exists():
                raise InvalidArgument(f"mount source {host_path} does not exist")
            target.parent.mkdir(parents=True, exist_ok=True)
            if host_path.is_dir():
                target.mkdir(exist_ok=True)
            else:
                target.touch(exist_ok=True)

        await asyncio.to_thread(prepare)
        if not await asyncio.to_thread(is_mounted, target):
            rc, out = await run_command("mount", "--bind", str(host_path), str(target))
            if rc != 0:
                raise Internal(f"cannot bind {host_path} into the pod's shared dir: {out}")
        return self.agent_path(paths, target)

    def agent_path(self, paths: PodPaths, host_path: Path) -> str:
        try:
            rel = host_path.relative_to(paths.shared)
        except ValueError:
            raise Internal(f"{host_path} is not in the pod's shared dir") from None
        return f"{GUEST_SHARED}/{rel}" if str(rel) != "." else GUEST_SHARED

    def data_endpoint(self, paths: PodPaths) -> str:
        return f"{self._sockets(paths)[1]}.{DATA_PORT}"

    # -- start-up sweep ----------------------------------------------------------------

    async def sweep(self, pods: list[PodRecord]) -> None:
        """Domains, backends and host-netns taps of this criv that no live pod owns."""
        live = [p for p in pods if p.isolation == "vm" and p.state is not PodState.NOTREADY]
        names = {domain_name(p.id) for p in live}
        try:
            hv = await self._hypervisor()
            domains = await hv.list_domains()
        except CrivError as e:
            log.warning("cannot list libvirt domains (%s); skipping the VM sweep", e)
            domains = []
        for d in domains:
            if d.owner == self._owner and d.name not in names and self._hv is not None:
                log.warning("destroying orphan domain %s", d.name)
                with contextlib.suppress(CrivError):
                    await self._hv.destroy(d.name)
        keep = {self._backend_pid(p) for p in live}
        for pid in await asyncio.to_thread(_backend_pids, f"{self._run_root}/"):
            if pid not in keep:
                log.warning("killing orphan vsock backend pid %d", pid)
                _kill_group(pid)
        prefixes = {tap_name(p.id) for p in pods}
        for tap in await asyncio.to_thread(host_taps, self._owner):
            if tap not in prefixes:
                log.warning("deleting orphan tap %s", tap)
                await delete_tap(tap)

    async def close(self) -> None:
        """Drop criv's side (libvirt connection); VMs and backends keep running."""
        # not stopped: the next criv finds each backend by pid (it has a session of its own)
        self._backends.clear()
        if self._hv is not None:
            await self._hv.close()
            self._hv = None


def _backend_pids(socket_prefix: str) -> list[int]:
    """Backend processes whose ``--socket`` starts with ``socket_prefix``."""
    want = socket_prefix.encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            args = (d / "cmdline").read_bytes().split(b"\0")
            if b"criv.vsock" in args and args[args.index(b"--socket") + 1].startswith(want):
                found.append(int(d.name))
    return found


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
