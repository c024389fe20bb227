"""Pod sandbox operations: run, stop, remove, status, list.

RunPodSandbox: reserve the name, write a PENDING record, create the netns and run
CNI ADD (result cached in the record), boot the agent (isolation mode), SetupSandbox,
then READY. The work runs as a task of its own: when the caller gives up (deadline),
the task finishes anyway and a retry with the same name gets that pod instead of
booting a second one (DESIGN.md, State and recovery). A failure undoes every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import shutil
import time
from pathlib import Path

from criv.agent.types import AgentContainerState
from criv.errors import (
    AgentError,
    AlreadyExists,
    CrivError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from criv.network.cni import PodNetworkRequest, PortMapping
from criv.network.netns import create_netns, delete_netns, netns_path
from criv.sandbox.core import SandboxCore
from criv.sandbox.events import EventKind
from criv.sandbox.records import ContainerRecord, PodRecord
from criv.sandbox.rootfs import unmount_all_under, unmount_rootfs
from criv.sandbox.specs import PodFilter, PodSpec, match_pod
from criv.sandbox.states import ContainerState, PodState

log = logging.getLogger("criv.sandbox.pods")

AGENT_CONNECT_TIMEOUT = 20.0
# StopPodSandbox kills what kubelet left running: no grace (kubelet gave it already).
POD_STOP_CONTAINER_TIMEOUT = 0
AGENT_SHUTDOWN_TIMEOUT = 10


def network_request(pod: PodRecord) -> PodNetworkRequest:
    return PodNetworkRequest(
        sandbox_id=pod.id,
        netns=pod.netns,
        pod_name=pod.name,
        pod_namespace=pod.namespace,
        pod_uid=pod.uid,
        port_mappings=[
            PortMapping(p.host_port, p.container_port, p.protocol, p.host_ip)
            for p in pod.port_mappings
        ],
    )


class PodOps(SandboxCore):
    _running: dict[str, asyncio.Task[str]]
    _undelivered: dict[str, str]

    def _init_pods(self) -> None:
        self._running = {}  # reserved name -> RunPodSandbox task in flight
        self._undelivered = {}  # reserved name -> id whose caller gave up

    def mode_for(self, handler: str) -> str:
        mode = self.config.runtime.handlers.get(handler)
        if mode is None:
            known = ", ".join(repr(h) for h in sorted(self.config.runtime.handlers))
            raise NotFound(f"runtime handler {handler!r} is not configured (known: {known})")
        if mode == "host" and self.config.runtime.host_pods == "reject":
            raise PermissionDenied(
                f"runtime handler {handler!r} runs pods in host isolation, "
                "which this node refuses (runtime.host_pods: reject)"
            )
        if mode not in self.isolations:
            raise FailedPrecondition(
                f"runtime handler {handler!r} wants {mode!r} isolation, not available here"
            )
        return mode

    async def run_pod(self, spec: PodSpec) -> str:
        mode = self.mode_for(spec.handler)
        if mode == "vm" and spec.host_network:
            raise InvalidArgument(
                f"runtime handler {spec.handler!r} runs pods in VMs, which cannot share the "
                "host's network namespace; use a handler mapped to host isolation"
            )
        name = spec.reserved_name
        undelivered = self._undelivered.pop(name, None)
        if undelivered is not None and self.pods.get(undelivered) is not None:
            return undelivered
        task = self._running.get(name)
        if task is None:
            holder = self.pod_names.holder(name)
            if holder is not None:
                raise AlreadyExists(
                    f"pod sandbox name {name!r} is reserved for {holder}; remove it first"
                )
            pod_id = self._new_id()
            self.pod_names.reserve(name, pod_id)
            task = asyncio.create_task(self._run_pod(pod_id, mode, spec), name=f"run-{pod_id[:12]}")
            self._running[name] = task
            task.add_done_callback(lambda _t: self._running.pop(name, None))
        try:
            pod_id = await asyncio.shield(task)
            # This caller got it: an earlier caller's gave-up hand-over is void.
            if self._undelivered.get(name) == pod_id:
                del self._undelivered[name]
            return pod_id
        except asyncio.CancelledError:
            # The caller gave up: the pod comes up anyway and goes to its retry.
            task.add_done_callback(lambda t: self._keep_for_retry(name, t))
            raise

    def _keep_for_retry(self, name: str, task: asyncio.Task[str]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._undelivered[name] = task.result()

    def _new_id(self) -> str:
        while True:
            pid = secrets.token_hex(32)
            # Run dirs and netns names use the first 12 characters: keep them unique.
            if not any(p.id[:12] == pid[:12] for p in self.pods.all()):
                return pid

    async def _run_pod(self, pod_id: str, mode: str, spec: PodSpec) -> str:
        paths = self.paths(pod_id)
        pod = PodRecord(
            id=pod_id,
            name=spec.name,
            namespace=spec.namespace,
            uid=spec.uid,
            attempt=spec.attempt,
            state=PodState.PENDING,
            created_at_ns=time.time_ns(),
            handler=spec.handler,
            isolation=mode,
            config=spec.config,
            labels=dict(spec.labels),
            annotations=dict(spec.annotations),
            log_directory=spec.log_directory,
            host_network=spec.host_network,
            port_mappings=spec.port_mappings,
            resources=dict(spec.resources),
            netns="" if spec.host_network else str(netns_path(self.config.run_dir, pod_id)),
        )
        try:
            await asyncio.to_thread(paths.state.mkdir, parents=True, exist_ok=True, mode=0o700)
            await self.pods.add(pod)
            async with self.lock(pod_id):
                return await self._bring_up(pod_id)
        except BaseException as e:
            log.warning("RunPodSandbox %s (%s) failed: %s", spec.name, pod_id[:12], e)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._teardown_failed(pod_id, spec.reserved_name))
            raise

    async def _bring_up(self, pod_id: str) -> str:
        pod = self.pods.must(pod_id, "pod sandbox")
        iso = self.isolation(pod)
        paths = self.paths(pod_id)
        if not pod.host_network:
            await create_netns(self._netns(pod))
            net, result = await self.cni.add(network_request(pod))
            pod = await self.pods.update(
                pod_id,
                lambda r: dataclasses.replace(
                    r,
                    cni_network={
                        "name": net.name,
                        "cniVersion": net.cni_version,
                        "plugins": net.plugins,
                    },
                    cni_result=result.raw,
                    ips=tuple(result.ips),
                    network_ready=True,
                ),
            )
        state = await iso.boot(pod, paths)
        pod = await self.pods.update(
            pod_id, lambda r: dataclasses.replace(r, isolation_state=state)
        )
        client = await iso.connect(pod, paths, AGENT_CONNECT_TIMEOUT)
        self.rt[pod_id].client = client
        await client.setup_sandbox(
            pod_id,
            pod.config,
            iso.agent_path(paths, paths.shared),
            list(pod.ips),
            iso.guest_network(pod),
        )
        await self.pods.update(pod_id, lambda r: dataclasses.replace(r, state=PodState.READY))
        self.start_watcher(pod_id)
        return pod_id

    def _netns(self, pod: PodRecord) -> Path:
        return Path(pod.netns)

    async def _teardown_failed(self, pod_id: str, name: str) -> None:
        pod = self.pods.get(pod_id)
        if pod is not None:
            with contextlib.suppress(Exception):
                await self._stop_agent(pod, graceful=False)
            with contextlib.suppress(Exception):
                await self._teardown_network(pod)
            await self.pods.delete(pod_id, remove_dir=self.paths(pod_id).state)
        self.rt.pop(pod_id, None)
        self.pod_names.release(name, pod_id)

    # -- watcher: agent events keep container records current ---------------------

    def start_watcher(self, pod_id: str) -> None:
        rt = self.rt[pod_id]
        if rt.watcher is None or rt.watcher.done():
            rt.watcher = self.spawn(self._watch(pod_id), f"watch-{pod_id[:12]}")

    async def _watch(self, pod_id: str) -> None:
        backoff = 0.1
        while True:
            pod = self.pods.get(pod_id)
            client = self.client_of(pod_id)
            if pod is None or client is None or pod.state is not PodState.READY:
                return
            try:
                async for ev in client.events():
                    backoff = 0.1
                    if self.containers.get(ev.container_id) is None:
                        continue
                    info = ev.info
                    if info is None or info.state is not AgentContainerState.EXITED:
                        with contextlib.suppress(CrivError):
                            info = await client.container_status(ev.container_id)
                    if info is not None:
                        await self.apply_info(ev.container_id, info)
            except CrivError as e:
                log.debug("pod %s: event stream ended: %s", pod_id[:12], e)
            pod = self.pods.get(pod_id)
            if pod is None or pod.state is not PodState.READY:
                return
            if not self.isolation(pod).alive(pod):
                await self._agent_lost(pod)
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _agent_lost(self, pod: PodRecord) -> None:
        iso = self.isolation(pod)
        if iso.containers_die_with_agent:
            await self._vm_lost(pod)
            return
        log.error("pod %s: agent is gone; its containers are in an unknown state", pod.id[:12])
        for c in self.containers_of(pod.id):
            if c.state is ContainerState.RUNNING:
                await self.set_state(
                    c.id, ContainerState.UNKNOWN, reason="AgentGone",
                    message="the pod's agent exited; the container's fate is unknown",
                )  # fmt: skip
            elif c.state is ContainerState.CREATED:
                await self.set_state(
                    c.id, ContainerState.EXITED, exit_code=255, reason="AgentGone",
                    message="the pod's agent exited before the container started",
                    finished_at_ns=time.time_ns(),
                )  # fmt: skip

    async def _vm_lost(self, pod: PodRecord) -> None:
        """The pod's VM stopped under criv (QEMU killed, guest crash): whatever ran in it
        is over. Containers EXITED, the sandbox NOTREADY; kubelet stops and removes it."""
        log.error("pod %s: its VM stopped unexpectedly; see %s", pod.id[:12],
                  self.paths(pod.id).state / "console.log")  # fmt: skip
        now = time.time_ns()
        for c in self.containers_of(pod.id):
            if c.state is not ContainerState.EXITED:
                await self.set_state(
                    c.id, ContainerState.EXITED, exit_code=137 if c.started_at_ns else 255,
                    reason="VMExited", message="the pod's VM stopped unexpectedly",
                    finished_at_ns=now,
                )  # fmt: skip
        async with self.lock(pod.id):
            if (p := self.pods.get(pod.id)) is not None and p.state is PodState.READY:
                await self.pods.update(
                    pod.id,
                    lambda r: dataclasses.replace(
                        r, state=PodState.NOTREADY, message="the pod's VM stopped unexpectedly"
                    ),
                )

    # -- stop / remove -------------------------------------------------------------

    async def stop_pod(self, pod_id: str) -> None:
        full = self.pods.resolve(pod_id)
        if full is None:
            return  # idempotent: a missing pod is stopped
        async with self.lock(full):
            pod = self.pods.get(full)
            if pod is None:
                return
            await self._stop_containers(pod)
            await self._stop_agent(pod, graceful=True)
            if pod.state is not PodState.NOTREADY:
                await self.pods.update(
                    full, lambda r: dataclasses.replace(r, state=PodState.NOTREADY)
                )
            # Last: a failed CNI DEL raises to kubelet, which retries StopPodSandbox;
            # network_ready stays set until DEL succeeds.
            await self._teardown_network(self.pods.must(full, "pod sandbox"))

    async def _stop_containers(self, pod: PodRecord) -> None:
        client = self.client_of(pod.id)
        live = [c for c in self.containers_of(pod.id) if c.state is not ContainerState.EXITED]

        async def one(cid: str) -> None:
            if client is not None:
                try:
                    info = await client.stop_container(cid, POD_STOP_CONTAINER_TIMEOUT)
                    await self.apply_info(cid, info)
                except CrivError as e:
                    log.warning("stopping container %s: %s", cid[:12], e)
            c = self.containers.get(cid)
            if c is not None and c.state is not ContainerState.EXITED:
                await self.set_state(
                    cid, ContainerState.EXITED, exit_code=137 if c.started_at_ns else 255,
                    reason="Error", message="stopped with its pod sandbox",
                    finished_at_ns=time.time_ns(),
                )  # fmt: skip

        await asyncio.gather(*(one(c.id) for c in live))
        # The logs' last lines must reach the host before the agent goes away.
        await asyncio.gather(*(self.drain_log(c, 5.0) for c in self.containers_of(pod.id)))

    async def _stop_agent(self, pod: PodRecord, graceful: bool) -> None:
        rt = self.rt.get(pod.id)
        if rt is not None:
            if rt.watcher is not None:
                rt.watcher.cancel()
                with contextlib.suppress(BaseException):
                    await rt.watcher
                rt.watcher = None
            for cid in list(rt.followers):
                await self.stop_follower(pod.id, cid)
        iso = self.isolations.get(pod.isolation)
        client = rt.client if rt is not None else None
        if iso is not None:
            if graceful:
                await iso.stop(pod, self.paths(pod.id), client, AGENT_SHUTDOWN_TIMEOUT)
            else:
                await iso.destroy(pod, self.paths(pod.id))
        if rt is not None and rt.client is not None:
            await rt.client.close()
            rt.client = None

    async def _teardown_network(self, pod: PodRecord) -> None:
        if pod.host_network or not pod.netns:
            return
        if pod.network_ready:
            await self.cni.delete(pod.cni_network, pod.cni_result or None, network_request(pod))
            await self.pods.update(pod.id, lambda r: dataclasses.replace(r, network_ready=False))
        await delete_netns(self._netns(pod))

    async def remove_pod(self, pod_id: str) -> None:
        full = self.pods.resolve(pod_id)
        if full is None:
            return
        await self.stop_pod(full)
        async with self.lock(full):
            pod = self.pods.get(full)
            if pod is None:
                return
            containers = self.containers_of(full)
            for c in containers:
                await self._remove_container_files(c)
                self.bus.publish(EventKind.DELETED, c.id, full)
            paths = self.paths(full)
            await unmount_all_under(paths.state)
            await self.pods.delete(full, remove_dir=paths.state)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(paths.run.rmdir)
            self.rt.pop(full, None)
            for c in containers:
                self.forget_lock(c.id)
            self.pod_names.release(f"{pod.name}_{pod.namespace}_{pod.uid}_{pod.attempt}", full)
        self.forget_lock(full)

    async def _remove_container_files(self, c: ContainerRecord) -> None:
        await self.stop_follower(c.sandbox_id, c.id)
        await self.unshare_container(c.sandbox_id, c.id)
        await unmount_rootfs(self.container_dir(c.sandbox_id, c.id))
        # Only now that the overlay is off may its layers go (if their image was removed).
        # Before the record: if this fails, RemoveContainer fails and is retried.
        await self.images.release(c.id)
        await self.containers.delete(c.id, remove_dir=self.container_dir(c.sandbox_id, c.id))
        self.container_names.release(self.container_name_of(c), c.id)

    async def unshare_container(self, pod_id: str, cid: str) -> None:
        """Undo ``Isolation.share`` (vm pods' binds under the shared dir) before the
        container's own mounts go: a bind of the rootfs keeps the overlay busy."""
        d = self.paths(pod_id).shared / "c" / cid
        if await asyncio.to_thread(d.exists):
            await unmount_all_under(d)
            await asyncio.to_thread(shutil.rmtree, d, True)

    def container_name_of(self, c: ContainerRecord) -> str:
        pod = self.pods.get(c.sandbox_id)
        if pod is None:
            return ""
        return f"{c.name}_{pod.name}_{pod.namespace}_{pod.uid}_{c.attempt}"

    # -- status / list ---------------------------------------------------------------

    def pod_status(self, pod_id: str) -> PodRecord:
        return self.pod(pod_id)

    def list_pods(self, f: PodFilter) -> list[PodRecord]:
        return sorted(
            (p for p in self.pods.all() if match_pod(f, p)), key=lambda p: p.created_at_ns
        )

    async def check_agent(self, pod: PodRecord) -> None:
        """Raise AgentError if a READY pod's agent does not answer (used by status)."""
        client = self.client_of(pod.id)
        if client is None:
            raise AgentError(f"pod {pod.id[:12]}: no agent connection")
        await client.health()
