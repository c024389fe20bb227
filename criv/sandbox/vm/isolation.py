"""``vm`` isolation: each pod is a libvirt/QEMU VM whose guest runs criv-agent.

Boot (docs/vm.md): :mod:`.coldpath` prepares what needs no pod network (vsock backend,
share + virtiofsd, tap, the start-up probes of :mod:`.host`) alongside CNI ADD, then the
transient domain starts with the pod's MAC and the tap joins the pod netns. The agent
listens on guest vsock ports 1024 (gRPC, behind the guest's splice forwarder) and 1025
(data streams); the backend exposes them as unix sockets (:mod:`.layout`), so criv dials
them as in host mode (:mod:`.ready` tells when). Orphans: :mod:`.sweep`.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import time
import uuid
from pathlib import Path

from criv import failpoints
from criv.agent.client import AgentClient
from criv.agent.types import GuestIdentity, GuestInterface, GuestNetwork, GuestRoute
from criv.config import Config
from criv.errors import AgentError, CrivError, InvalidArgument
from criv.hypervisor.driver import Hypervisor
from criv.hypervisor.hostsetup import QEMU_USER
from criv.hypervisor.libvirtbase import qemu_pid
from criv.hypervisor.spec import SHARE_TAG, domain_name
from criv.network.tap import delete_tap, guest_addressing, pod_link
from criv.network.tap import tap_name as pod_tap_name
from criv.sandbox import propagation
from criv.sandbox.isolation import PodPaths
from criv.sandbox.isostate import IsolationState, VmState
from criv.sandbox.records import MountRecord, PodRecord
from criv.sandbox.states import PodState
from criv.sandbox.vm import coldpath, virtiofs
from criv.sandbox.vm import share as shares
from criv.sandbox.vm.backend import VsockBackends
from criv.sandbox.vm.clone import start_pod_domain
from criv.sandbox.vm.console import console_tail
from criv.sandbox.vm.host import VmHost
from criv.sandbox.vm.layout import (
    console_log,
    control_socket,
    data_socket,
    vhost_socket,
)
from criv.sandbox.vm.podvm import pod_vm
from criv.sandbox.vm.ready import http2_answers
from criv.sandbox.vm.spares import SpareVms, is_spare_name, spare_console, vm_domain
from criv.sandbox.vm.sweep import sweep_vm_orphans
from criv.sandbox.vm.tapmoves import TapMoves
from criv.sandbox.vm.template import Templates, template_root
from criv.state.runtime_state import RuntimeState

log = logging.getLogger("criv.sandbox.vm")

# Boot to the agent's first answer: ~2.5 s under TCG when idle; far more on 2 busy cores.
VM_CONNECT_TIMEOUT = 90.0
VM_EXIT_TIMEOUT = 10.0
# how often a booting VM's agent is checked for (a bare HTTP/2 hello: see .ready)
READY_POLL_INTERVAL = 0.025
READY_PROBE_TIMEOUT = 0.5


def _open_to_qemu(paths: PodPaths) -> None:
    """QEMU (unprivileged, group ``criv-qemu``) reaches the pod's vhost-user sockets: the
    run dir and the vsock socket are group-owned; virtiofsd sets its socket's group."""
    gid = grp.getgrnam(QEMU_USER).gr_gid
    os.chown(paths.run, 0, gid)
    os.chmod(paths.run, 0o750)
    os.chown(vhost_socket(paths), 0, gid)
    os.chmod(vhost_socket(paths), 0o660)


def _state(pod: PodRecord) -> VmState | None:
    st = pod.isolation_state
    return st if isinstance(st, VmState) else None


def _domain(pod: PodRecord) -> str:
    return vm_domain(pod.id, _state(pod))


class VmIsolation:
    mode = "vm"
    # a VM that stops takes its containers with it
    containers_die_with_agent = True

    def __init__(self, config: Config, runtime_state: RuntimeState) -> None:
        self._config = config
        self._owner = str(Path(config.state_dir).resolve())
        self._run_root = Path(config.run_dir) / "p"
        self._host = VmHost(config, runtime_state)
        self.host = self._host  # shared with vm-image isolation (criv.sandbox.modes)
        self._backends = VsockBackends()
        self._prepared: dict[str, coldpath.Prepared] = {}  # pod id -> its prepared steps
        self._taps = TapMoves()  # a booted pod's tap on its way into the pod netns
        self._templates = Templates(template_root(config), self._host, self._owner)
        self._spares = SpareVms(
            Path(config.run_dir) / "spares",
            self._host,
            self._templates,
            config.vm.spare_vms if config.vm.template == "auto" else 0,
            self._owner,
        )
        if self.mode in config.runtime.handlers.values():
            self._host.start_probes()  # in the background: not in the first pod's latency

    # -- boot ------------------------------------------------------------------------

    async def prepare(self, pod: PodRecord, paths: PodPaths) -> None:
        """The boot's steps that need no pod network, run alongside CNI ADD (coldpath)."""
        if pod.host_network:
            raise InvalidArgument("a vm pod cannot use the host network; use the host handler")
        try:
            self._prepared[pod.id] = await coldpath.prepare(
                self._host, self._backends, self._owner, pod, paths
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.destroy(pod, paths))
            raise

    async def boot(self, pod: PodRecord, paths: PodPaths) -> IsolationState:
        prep = self._prepared.pop(pod.id, None)
        if prep is None:  # not prepared beforehand: the same steps, now
            await self.prepare(pod, paths)
            prep = self._prepared.pop(pod.id)
        try:
            st = await self._boot(pod, paths, prep)
            log.info("pod %s cold path: %s", pod.id[:12], prep.clock.line())
            return st
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.destroy(pod, paths))
            raise

    async def _boot(self, pod: PodRecord, paths: PodPaths, prep: coldpath.Prepared) -> VmState:
        name = domain_name(pod.id)
        clock, tap, mac, mtu = prep.clock, prep.tap, "", 0
        if tap:
            with clock.step("pod link"):
                link = await pod_link(Path(pod.netns))  # eth0, made by CNI ADD
            mac, mtu = link.mac, link.mtu
        hv = await self._host.hypervisor()  # connected while preparing
        await asyncio.to_thread(_open_to_qemu, paths)
        vm = pod_vm(self._config, self._owner, pod, paths, prep, mac, mtu)
        self._host.stops.pop(name, None)
        templates = self._templates if self._config.vm.template == "auto" else None
        started = await start_pod_domain(hv, vm, templates, self._spares, self._host, clock)
        name = started.info.name  # a spare keeps its own
        try:
            failpoints.hit("vm_boot.after_domain")
            if tap:  # QEMU holds it open now; it keeps working in the pod netns
                self._taps.start(pod.id, Path(pod.netns), tap)
        except BaseException:
            # the pod's record does not name this domain yet: destroy() would miss a spare
            await asyncio.shield(self._forget_domain(hv, name))
            raise
        return VmState(
            domain=name,
            uuid=started.info.uuid,
            accel=prep.accel.accel,
            accel_reason=prep.accel.reason,
            console_log=str(started.console_log),
            vcpus=vm.size.vcpus,
            max_vcpus=max(started.domain.max_vcpus, vm.size.vcpus),
            memory_mib=vm.size.memory_mib,
            max_memory_mib=started.domain.memory_mib,
            vsock="backend",
            cid=prep.cid,
            backend_pid=prep.backend_pid,
            backend_start_time=prep.backend_start,
            virtiofsd_pid=prep.virtiofsd_pid,
            tap=tap,
            mac=mac,
            mtu=mtu,
            template=started.template,
        )

    def _console(self, pod: PodRecord, paths: PodPaths) -> Path:
        """The pod VM's console log: a spare's stays in the spare's directory."""
        name = _domain(pod)
        return spare_console(self._spares.root, name) if is_spare_name(name) else console_log(paths)

    async def _forget_domain(self, hv: Hypervisor, name: str) -> None:
        await hv.destroy_quietly(name, VM_EXIT_TIMEOUT)
        await self._spares.release(name)

    # -- agent -----------------------------------------------------------------------

    async def alive(self, pod: PodRecord) -> bool:
        name = _domain(pod)
        if name in self._host.stops:
            return False

        def check() -> bool:  # reads libvirt's pid file and /proc
            qemu = qemu_pid(name)
            if qemu <= 0:
                return False
            if self._backends.pid(pod.id, _state(pod)) <= 0:
                # no way back in: QEMU's vhost-user device does not reconnect
                log.error(
                    "pod %s: its vsock backend is gone while its VM (QEMU pid %d) runs: "
                    "the agent cannot be reached; StopPodSandbox destroys the VM",
                    pod.id[:12], qemu,
                )  # fmt: skip
                return False
            return True

        return await asyncio.to_thread(check)

    async def connect(self, pod: PodRecord, paths: PodPaths, timeout: float) -> AgentClient:
        control = control_socket(paths)
        console = self._console(pod, paths)
        timeout = max(timeout, VM_CONNECT_TIMEOUT) if pod.state is PodState.PENDING else timeout
        t0 = time.monotonic()
        deadline = t0 + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not await self.alive(pod):
                why = self._host.stops.get(_domain(pod), "gone")
                tail = await asyncio.to_thread(console_tail, console)
                raise AgentError(
                    f"VM of pod {pod.id[:12]} stopped ({why}); console log {console}:\n{tail}"
                )
            if await http2_answers(control, READY_PROBE_TIMEOUT):
                await self._taps.wait(pod.id)  # the boot's tap move, if it still runs
                # a fresh channel each time: a failed one would wait out its backoff
                client = AgentClient(f"unix:{control}")
                try:
                    await client.health(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
                    if pod.state is PodState.PENDING:
                        log.info(
                            "pod %s cold path: agent %.3fs", pod.id[:12], time.monotonic() - t0
                        )
                    return client
                except CrivError as e:
                    last = e
                    await client.close()
                except BaseException:
                    await client.close()
                    raise
            await asyncio.sleep(READY_POLL_INTERVAL)
        raise AgentError(
            f"agent of pod {pod.id[:12]} did not answer in {timeout:.0f}s ({last}); "
            f"console log {console}"
        )

    async def vcpus(self, pod: PodRecord) -> tuple[int, int]:
        """(live vCPUs, most vCPUs) of the pod's VM, as libvirt sees them."""
        hv = await self._host.hypervisor()
        return await hv.vcpus(_domain(pod))

    async def set_vcpus(self, pod: PodRecord, count: int) -> int:
        """Hot-plug or unplug the pod VM's vCPUs (UpdatePodSandboxResources); the live count."""
        hv = await self._host.hypervisor()
        return await hv.set_vcpus(_domain(pod), count)

    async def memory(self, pod: PodRecord) -> int:
        """MiB the pod VM's guest has now, behind its balloon."""
        hv = await self._host.hypervisor()
        return await hv.memory(_domain(pod))

    async def memory_use(self, pod: PodRecord) -> tuple[int, int]:
        """(MiB the guest has, MiB of it in use), as the guest's balloon driver says."""
        hv = await self._host.hypervisor()
        return await hv.memory_use(_domain(pod))

    async def set_memory(self, pod: PodRecord, mib: int) -> None:
        """Set the pod VM's balloon target (UpdatePodSandboxResources)."""
        hv = await self._host.hypervisor()
        await hv.set_memory(_domain(pod), mib)

    def guest_network(self, pod: PodRecord) -> GuestNetwork | None:
        st = _state(pod)
        if st is None or not st.mac:
            return None
        addresses, routes = guest_addressing(pod.cni_result)
        return GuestNetwork(
            interfaces=(GuestInterface(st.mac, tuple(addresses), st.mtu),),
            routes=tuple(GuestRoute(d, g) for d, g in routes),
        )

    def guest_identity(self, pod: PodRecord) -> GuestIdentity | None:
        """What the guest takes on at SetupSandbox: a clone of a template wakes with the
        template's clock, RNG state and machine-id, and its share and NIC hot-plugged."""
        return GuestIdentity(
            entropy=os.urandom(64),
            host_time_ns=time.time_ns(),
            # stable per pod: derived from the sandbox id
            machine_id=uuid.uuid5(uuid.NAMESPACE_URL, f"urn:criv:sandbox:{pod.id}").hex,
            share_tag=SHARE_TAG,
            wait_seconds=20,
        )

    # -- stop / destroy ---------------------------------------------------------------

    async def stop(
        self, pod: PodRecord, paths: PodPaths, client: AgentClient | None, timeout: int
    ) -> None:
        name = _domain(pod)
        if client is not None and await self.alive(pod):
            try:
                # the agent stops the containers and exits; the guest init then powers off
                await client.shutdown(timeout)
            except CrivError as e:
                log.warning("pod %s: agent shutdown failed: %s", pod.id[:12], e)
        with contextlib.suppress(CrivError):
            hv = await self._host.hypervisor()
            if not await hv.wait_stopped(name, VM_EXIT_TIMEOUT):
                log.warning("pod %s: VM still up after the agent left: destroying", pod.id[:12])
        await self.destroy(pod, paths)

    async def destroy(self, pod: PodRecord, paths: PodPaths) -> None:
        name = _domain(pod)
        self._prepared.pop(pod.id, None)
        await self._taps.cancel(pod.id)
        hv = await self._host.hypervisor()
        await hv.destroy(name)
        await hv.wait_stopped(name, VM_EXIT_TIMEOUT)
        await self._backends.stop(pod.id, paths)
        await virtiofs.stop(paths)  # exits with QEMU; not if QEMU never connected
        await delete_tap(pod_tap_name(pod.id))  # only if it never reached the pod netns
        await shares.teardown(paths)

        def clean() -> None:
            if paths.run.is_dir():
                for s in paths.run.iterdir():
                    if s.is_socket() or s.suffix == ".json":
                        s.unlink()
            with contextlib.suppress(OSError):
                paths.run.rmdir()

        await asyncio.to_thread(clean)
        self._host.stops.pop(name, None)  # nothing to remember once it is gone for good

    async def forget(self, pod: PodRecord, paths: PodPaths) -> None:
        """A pod that took a spare VM keeps its console log in the spare's directory
        while it is stopped, as any pod keeps its own: it goes with the pod."""
        await self._spares.release(_domain(pod))

    # -- containers' files --------------------------------------------------------------

    async def share(self, paths: PodPaths, cid: str, mount: MountRecord, name: str) -> str:
        propagation.refuse_in_vm(mount.propagation, mount.container_path)
        await asyncio.to_thread(propagation.check_source, mount.host_path, mount.propagation)
        return await shares.share(
            paths,
            cid,
            Path(mount.host_path),
            name,
            mount.readonly,
            recursive_ro=mount.recursive_read_only,
            host_to_container=mount.propagation == propagation.HOST_TO_CONTAINER,
        )

    def pod_files_dir(self, paths: PodPaths) -> str:
        return ""  # the agent keeps them guest-local: the share is read-only to it

    async def check_image(
        self, pod: PodRecord, paths: PodPaths, cid: str, image_id: str, layer_dirs: list[Path]
    ) -> None:
        pass  # any image runs

    async def unshare(self, paths: PodPaths, cid: str) -> None:
        await shares.unshare(paths, cid)

    def agent_path(self, paths: PodPaths, host_path: Path) -> str:
        return shares.agent_path(paths, host_path)

    def data_endpoint(self, paths: PodPaths) -> str:
        return str(data_socket(paths))

    # -- start-up sweep / close ------------------------------------------------------------

    async def sweep(self, pods: list[PodRecord]) -> None:
        live = [p for p in pods if p.isolation == self.mode and p.state is not PodState.NOTREADY]
        keep = {await asyncio.to_thread(self._backends.pid, p.id, _state(p)) for p in live}
        domains = {_domain(p) for p in live} | self._spares.names()
        await sweep_vm_orphans(
            self._host, self._backends, self._owner, self._run_root, pods, live, domains, keep
        )
        # a NOTREADY pod's console stays until the pod is removed, in a spare's dir too
        recorded = {_domain(p) for p in pods if p.isolation == self.mode}
        for name in await self._spares.sweep(domains | recorded):
            log.warning("removed the directory of orphan spare %s", name)
        await asyncio.to_thread(self._templates.prune)

    async def close(self) -> None:
        """Drop criv's side (libvirt connection); VMs and backends keep running (template
        builds do not: their VMs are destroyed)."""
        await self._spares.close()
        await self._templates.close()
        self._backends.forget_all()
        await self._host.close()
