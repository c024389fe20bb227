"""Container stats as kubelet reads them: the agent's cumulative samples, plus the CPU
rate (``usage_nano_cores``) that only two samples in a row can give."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from criv.agent.types import AgentStats


@dataclass(frozen=True)
class ContainerSample:
    stats: AgentStats
    nano_cores: int | None  # None until a second sample gives a rate


class CpuRates:
    """The last (timestamp, cumulative CPU ns) per container, to turn into a rate."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}

    def sample(self, s: AgentStats) -> ContainerSample:
        prev = self._last.get(s.container_id)
        cur = (s.timestamp_ns, s.cpu_usage_core_nanoseconds)
        nano = None
        if prev is not None and cur[0] > prev[0] and cur[1] >= prev[1]:
            nano = (cur[1] - prev[1]) * 1_000_000_000 // (cur[0] - prev[0])
        self._last[s.container_id] = cur
        return ContainerSample(s, nano)

    def forget_all_but(self, live: Iterable[str]) -> None:
        keep = set(live)
        for cid in [k for k in self._last if k not in keep]:
            del self._last[cid]
