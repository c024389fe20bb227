"""Container record changes that publish CRI events: from what the agent reports
(:func:`apply_info`) or from what criv decides (:func:`set_state`)."""

from __future__ import annotations

import dataclasses

from criv.agent.types import AgentContainerInfo, AgentContainerState
from criv.sandbox.context import SandboxContext
from criv.sandbox.events import EventKind
from criv.sandbox.records import ContainerRecord
from criv.sandbox.states import CONTAINER_TRANSITIONS, ContainerState

_AGENT_STATES = {
    AgentContainerState.CREATED: ContainerState.CREATED,
    AgentContainerState.RUNNING: ContainerState.RUNNING,
    AgentContainerState.EXITED: ContainerState.EXITED,
    AgentContainerState.UNKNOWN: ContainerState.UNKNOWN,
}


def merge_info(rec: ContainerRecord, info: AgentContainerInfo) -> ContainerRecord:
    """The record updated with what the agent reports; an illegal state change from
    the agent (say, RUNNING back to CREATED) is ignored rather than trusted."""
    state = _AGENT_STATES[info.state]
    if state not in CONTAINER_TRANSITIONS[rec.state]:
        state = rec.state
    if state is rec.state is ContainerState.EXITED:
        return rec  # final: nothing the agent says later changes how it ended
    return dataclasses.replace(
        rec,
        state=state,
        started_at_ns=info.started_at_ns or rec.started_at_ns,
        finished_at_ns=info.finished_at_ns or rec.finished_at_ns,
        exit_code=info.exit_code if state is ContainerState.EXITED else rec.exit_code,
        reason=info.reason or rec.reason,
        message=info.message or rec.message,
        pid=info.pid,
        resources=info.resources or rec.resources,
        user=info.user or rec.user,
    )


async def apply_info(
    ctx: SandboxContext, cid: str, info: AgentContainerInfo
) -> ContainerRecord | None:
    if ctx.containers.get(cid) is None:
        return None
    old, new = await ctx.containers.update_pair(cid, lambda r: merge_info(r, info))
    publish_transition(ctx, old, new)
    return new


async def set_state(
    ctx: SandboxContext, cid: str, state: ContainerState, *, exit_code: int = 0,
    reason: str = "", message: str = "", finished_at_ns: int = 0,
) -> ContainerRecord | None:  # fmt: skip
    old = ctx.containers.get(cid)
    if old is None or old.state is state:
        return old

    def fn(r: ContainerRecord) -> ContainerRecord:
        if state not in CONTAINER_TRANSITIONS[r.state]:
            return r
        return dataclasses.replace(
            r,
            state=state,
            exit_code=exit_code if state is ContainerState.EXITED else r.exit_code,
            reason=reason or r.reason,
            message=message or r.message,
            finished_at_ns=finished_at_ns or r.finished_at_ns,
        )

    old, new = await ctx.containers.update_pair(cid, fn)
    publish_transition(ctx, old, new)
    return new


def publish_transition(ctx: SandboxContext, old: ContainerRecord, new: ContainerRecord) -> None:
    if old.state is new.state:
        return
    if new.state is ContainerState.RUNNING and old.state is ContainerState.CREATED:
        ctx.bus.publish(EventKind.STARTED, new.id, new.sandbox_id)
    elif new.state is ContainerState.EXITED:
        ctx.bus.publish(EventKind.STOPPED, new.id, new.sandbox_id)
