"""Pod sandbox operations: run, stop, remove, status, list.

RunPodSandbox: reserve the name, write a PENDING record, create the netns and run
CNI ADD (result kept in the record) while the isolation mode prepares what needs no
network, boot the agent (isolation mode), SetupSandbox, then READY. The work runs as a
task of its own: when the caller gives up (deadline), the task finishes anyway and a
retry with the same name gets that pod instead of booting a second one (DESIGN.md,
State and recovery). A failure undoes every step.

The pod's isolation mode is its runtime handler's, except for a pod that asks for host
namespaces under the default handler mapped to ``vm`` (kubelet's system pods): that one
runs in ``host`` isolation or is refused, as ``runtime.host_namespace_pods`` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time

from criv import failpoints, metrics
from criv.errors import (
    AlreadyExists,
    CrivError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from criv.sandbox import isostate, userns
from criv.sandbox.cleanup import PodCleanup
from criv.sandbox.context import SandboxContext
from criv.sandbox.events import EventKind
from criv.sandbox.logs import LogFollowers
from criv.sandbox.network import PodNetwork
from criv.sandbox.records import PodRecord
from criv.sandbox.rootfs import unmount_all_under
from criv.sandbox.specs import PodFilter, PodSpec, match_pod
from criv.sandbox.states import ContainerState, PodState
from criv.sandbox.steps import together
from criv.sandbox.transitions import apply_info, set_state
from criv.sandbox.watcher import AgentWatcher

log = logging.getLogger("criv.sandbox.pods")

AGENT_CONNECT_TIMEOUT = 20.0
# StopPodSandbox kills what kubelet left running: no grace (kubelet gave it already).
POD_STOP_CONTAINER_TIMEOUT = 0
# A SIGKILLed container is gone in well under a second; an agent that has not said so by
# then is stuck (or lying), and what runs it is destroyed instead.
POD_STOP_KILL_WAIT = 10.0
POD_STOP_LOG_DRAIN = 5.0


class PodService:
    def __init__(
        self,
        ctx: SandboxContext,
        network: PodNetwork,
        cleanup: PodCleanup,
        watcher: AgentWatcher,
        logs: LogFollowers,
    ) -> None:
        self._ctx = ctx
        self._network = network
        self._cleanup = cleanup
        self._watcher = watcher
        self._logs = logs
        self._running: dict[str, asyncio.Task[str]] = {}  # reserved name -> run in flight
        self._undelivered: dict[str, str] = {}  # reserved name -> id whose caller gave up

    def mode_for(self, handler: str) -> str:
        cfg = self._ctx.config.runtime
        mode = cfg.handlers.get(handler)
        if mode is None:
            known = ", ".join(repr(h) for h in sorted(cfg.handlers))
            raise NotFound(f"runtime handler {handler!r} is not configured (known: {known})")
        if mode == "host" and cfg.host_pods == "reject":
            raise PermissionDenied(
                f"runtime handler {handler!r} runs pods in host isolation, "
                "which this node refuses (runtime.host_pods: reject)"
            )
        if mode not in self._ctx.isolations:
            raise FailedPrecondition(
                f"runtime handler {handler!r} wants {mode!r} isolation, not available here"
            )
        return mode

    def route(self, spec: PodSpec) -> tuple[str, str]:
        """The pod's isolation mode, and why when it is not its handler's."""
        mode = self.mode_for(spec.handler)
        if mode != "vm" or not spec.host_namespaces:
            return mode, ""
        asked = ", ".join(spec.host_namespaces)
        if spec.handler != "":  # a RuntimeClass that asks for a VM gets one, or nothing
            if spec.host_network:
                raise InvalidArgument(
                    f"runtime handler {spec.handler!r} runs pods in VMs, which cannot share "
                    "the host's network namespace; use a handler mapped to host isolation"
                )
            return mode, ""
        cfg = self._ctx.config.runtime
        if cfg.host_namespace_pods == "reject" or cfg.host_pods == "reject":
            raise FailedPrecondition(
                f"the pod asks for host namespaces ({asked}) under the default runtime "
                'handler "", which runs pods in VMs, and this node refuses such pods '
                "(runtime.host_namespace_pods: reject); set runtime.host_namespace_pods: "
                "host (with runtime.host_pods: allow) or give the pod a RuntimeClass whose "
                "handler maps to host"
            )
        if "host" not in self._ctx.isolations:
            raise FailedPrecondition("host isolation is not available here")
        return "host", f"{asked} under the default handler: runtime.host_namespace_pods: host"

    # -- run ---------------------------------------------------------------------------

    async def run(self, spec: PodSpec) -> str:
        mode, reason = self.route(spec)
        userns.refuse_unless_supported(mode, spec.handler, spec.userns)
        name = spec.reserved_name
        undelivered = self._undelivered.pop(name, None)
        if undelivered is not None and self._ctx.pods.get(undelivered) is not None:
            return undelivered
        task = self._running.get(name)
        if task is None:
            holder = self._ctx.pod_names.holder(name)
            if holder is not None:
                raise AlreadyExists(
                    f"pod sandbox name {name!r} is reserved for {holder}; remove it first"
                )
            pod_id = self._new_id()
            self._ctx.pod_names.reserve(name, pod_id)
            task = asyncio.create_task(
                self._run(pod_id, mode, reason, spec), name=f"run-{pod_id[:12]}"
            )
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
            if not any(p.id[:12] == pid[:12] for p in self._ctx.pods.all()):
                return pid

    async def _run(self, pod_id: str, mode: str, reason: str, spec: PodSpec) -> str:
        ctx = self._ctx
        paths = ctx.paths(pod_id)
        if reason:
            log.info("pod %s (%s) runs in %s isolation: %s", spec.name, pod_id[:12], mode, reason)
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
            isolation_reason=reason,
            config=spec.config,
            labels=dict(spec.labels),
            annotations=dict(spec.annotations),
            log_directory=spec.log_directory,
            host_network=spec.host_network,
            port_mappings=spec.port_mappings,
            resources=dict(spec.resources),
            netns="" if spec.host_network else self._network.netns_for(pod_id),
        )
        try:
            await asyncio.to_thread(paths.state.mkdir, parents=True, exist_ok=True, mode=0o700)
            await ctx.pods.add(pod)
            async with ctx.locks.hold(pod_id):
                with metrics.pod_start(mode) as start:
                    await self._bring_up(pod_id)
                    start.kind = isostate.start_kind(ctx.pods.must(pod_id).isolation_state)
                    return pod_id
        except BaseException as e:
            log.warning("RunPodSandbox %s (%s) failed: %s", spec.name, pod_id[:12], e)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._cleanup.discard_pod(pod_id, spec.reserved_name))
            raise

    async def _bring_up(self, pod_id: str) -> str:
        ctx = self._ctx
        pod = ctx.pods.must(pod_id)
        iso = ctx.isolation(pod)
        paths = ctx.paths(pod_id)
        failpoints.hit("run_pod.after_record")
        # what the isolation can do before the pod has a network runs alongside CNI ADD;
        # both have finished (either may have failed) before anything is undone
        _, pod = await together(iso.prepare(pod, paths), self._attach_network(pod))
        failpoints.hit("run_pod.after_network")
        state = await iso.boot(pod, paths)
        failpoints.hit("run_pod.after_boot")
        pod = await ctx.pods.update(pod_id, lambda r: dataclasses.replace(r, isolation_state=state))
        failpoints.hit("run_pod.after_boot_recorded")
        client = await iso.connect(pod, paths, AGENT_CONNECT_TIMEOUT)
        ctx.runtime(pod_id).client = client
        failpoints.hit("run_pod.after_connect")
        t0 = time.monotonic()
        await client.setup_sandbox(
            pod_id,
            pod.config,
            iso.pod_files_dir(paths),
            list(pod.ips),
            iso.guest_network(pod),
            identity=iso.guest_identity(pod),
        )
        log.info("pod %s cold path: setup sandbox %.3fs", pod_id[:12], time.monotonic() - t0)
        failpoints.hit("run_pod.after_setup")
        await ctx.pods.update(pod_id, lambda r: dataclasses.replace(r, state=PodState.READY))
        failpoints.hit("run_pod.after_ready")
        self._watcher.start(pod_id)
        return pod_id

    async def _attach_network(self, pod: PodRecord) -> PodRecord:
        """CNI ADD in the pod's netns, its result recorded; the updated record."""
        if pod.host_network:
            return pod
        t0 = time.monotonic()
        att = await self._network.attach(pod)
        log.info("pod %s cold path: cni add %.3fs", pod.id[:12], time.monotonic() - t0)
        failpoints.hit("run_pod.after_cni_add")
        return await self._ctx.pods.update(
            pod.id,
            lambda r: dataclasses.replace(
                r, cni_network=att.cni_network, cni_result=att.cni_result, ips=att.ips,
                network_ready=True,
            ),
        )  # fmt: skip

    # -- stop / remove -------------------------------------------------------------

    async def stop(self, pod_id: str) -> None:
        ctx = self._ctx
        full = ctx.pods.resolve(pod_id)
        if full is None:
            return  # idempotent: a missing pod is stopped
        async with ctx.locks.hold(full):
            pod = ctx.pods.get(full)
            if pod is None:
                return
            t0 = time.monotonic()
            stopped = await self._stop_containers(pod)
            failpoints.hit("stop_pod.after_containers")
            t1 = time.monotonic()
            # An agent that could not stop its containers gets no second chance to stall
            # the stop: what runs it is destroyed.
            await self._cleanup.stop_agent(pod, graceful=stopped)
            log.info(
                "pod %s stopped: containers %.1fs, agent %.1fs%s", full[:12], t1 - t0,
                time.monotonic() - t1, "" if stopped else " (destroyed: containers did not stop)",
            )  # fmt: skip
            failpoints.hit("stop_pod.after_agent")
            if pod.state is not PodState.NOTREADY:
                await ctx.pods.update(
                    full, lambda r: dataclasses.replace(r, state=PodState.NOTREADY)
                )
            failpoints.hit("stop_pod.after_record")
            # Last: a failed CNI DEL raises to kubelet, which retries StopPodSandbox.
            await self._cleanup.release_network(ctx.pods.must(full))

    async def _stop_containers(self, pod: PodRecord) -> bool:
        """Kill what still runs; False if the agent failed to stop one of them."""
        ctx = self._ctx
        client = ctx.client_of(pod.id)
        live = [c for c in ctx.containers_of(pod.id) if c.state is not ContainerState.EXITED]
        failed: list[str] = []

        async def one(cid: str) -> None:
            if client is not None:
                try:
                    info = await asyncio.wait_for(
                        client.stop_container(cid, POD_STOP_CONTAINER_TIMEOUT), POD_STOP_KILL_WAIT
                    )
                    await apply_info(ctx, cid, info)
                except (CrivError, TimeoutError) as e:
                    failed.append(cid)
                    log.warning("stopping container %s: %s", cid[:12], e or "no answer")
            c = ctx.containers.get(cid)
            if c is not None and c.state is not ContainerState.EXITED:
                await set_state(
                    ctx, cid, ContainerState.EXITED, exit_code=137 if c.started_at_ns else 255,
                    reason="Error", message="stopped with its pod sandbox",
                    finished_at_ns=time.time_ns(),
                )  # fmt: skip

        await asyncio.gather(*(one(c.id) for c in live))
        # The logs' last lines must reach the host before the agent goes away.
        await asyncio.gather(
            *(self._logs.drain(c, POD_STOP_LOG_DRAIN) for c in ctx.containers_of(pod.id))
        )
        return not failed

    async def remove(self, pod_id: str) -> None:
        ctx = self._ctx
        full = ctx.pods.resolve(pod_id)
        if full is None:
            return
        await self.stop(full)
        failpoints.hit("remove_pod.after_stop")
        async with ctx.locks.hold(full):
            pod = ctx.pods.get(full)
            if pod is None:
                return
            for c in ctx.containers_of(full):
                async with ctx.locks.hold(c.id):  # lock order: pod, then container
                    if ctx.containers.get(c.id) is None:
                        continue  # a RemoveContainer got there first
                    await self._cleanup.remove_container_files(c)
                ctx.bus.publish(EventKind.DELETED, c.id, full)
            failpoints.hit("remove_pod.after_containers")
            paths = ctx.paths(full)
            iso = ctx.isolations.get(pod.isolation)
            if iso is not None:
                await iso.forget(pod, paths)
            await unmount_all_under(paths.state)
            failpoints.hit("remove_pod.after_unmount")
            await ctx.pods.delete(full, remove_dir=paths.state)
            failpoints.hit("remove_pod.after_record")
            with contextlib.suppress(OSError):
                await asyncio.to_thread(paths.run.rmdir)
            ctx.rt.pop(full, None)
            ctx.pod_names.release(pod.reserved_name, full)

    # -- status / list ---------------------------------------------------------------

    def status(self, pod_id: str) -> PodRecord:
        return self._ctx.pod(pod_id)

    def matching(self, f: PodFilter) -> list[PodRecord]:
        return sorted(
            (p for p in self._ctx.pods.all() if match_pod(f, p)), key=lambda p: p.created_at_ns
        )
